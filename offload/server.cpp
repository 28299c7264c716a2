// The offload server over TCP (Boost.Asio). One strand per connection; a connection handles one
// frame at a time (read header, read payload, answer, read the next), so replies come back in
// request order and a client pipelines simply by sending ahead. Attends go to one compute thread
// whose decode kernel spreads over all cores: a memory-bound kernel gains nothing from running two
// at once, and serializing keeps each one at full DRAM bandwidth.
#include "offload/server.hpp"

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>
#include <thread>
#include <vector>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "offload/auth_throttle.hpp"
#include "offload/open_files.hpp"
#include "offload/receive_buffer.hpp"
#include "offload/transport.hpp"

namespace longattn::offload {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

bool secrets_equal(const std::string& a, const std::string& b) noexcept {
  // Length is not secret-bearing here (the token file's length is not the secret), but the bytes
  // are compared without an early exit.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const std::size_t n = std::max(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

std::pair<std::string, int> parse_host_port(const std::string& text) {
  const auto colon = text.rfind(':');
  LONGATTN_INVALID(colon != std::string::npos && colon + 1 < text.size(), "'{}' is not HOST:PORT", text);
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  const long port = std::strtol(text.c_str() + colon + 1, &end, 10);
  LONGATTN_INVALID(end && *end == '\0' && port >= 0 && port <= 65535, "'{}': the port must be a number in [0, 65535]", text);
  LONGATTN_INVALID(!host.empty(), "'{}': missing host (use 0.0.0.0 to listen on every interface)", text);
  return {host, static_cast<int>(port)};
}

namespace {

constexpr std::array<const char*, 6> kTypeNames = {"hello", "open", "append", "attend", "drop", "stats"};
constexpr std::array<const char*, 10> kCodeNames = {"none",     "invalid_argument", "unsupported", "io",           "communication",
                                                     "timeout", "out_of_capacity",  "protocol",    "unauthorized", "internal"};

struct Counters {
  std::array<std::atomic<std::uint64_t>, 7> requests{};  // by type index (1..6)
  std::array<std::atomic<std::uint64_t>, 10> errors{};   // by wire code
  std::atomic<std::uint64_t> bytes_in{0}, bytes_out{0}, connections_total{0}, connections_open{0};
  std::atomic<std::uint64_t> kernel_ns{0}, kv_bytes_read{0}, attend_queries{0};
  std::atomic<std::uint64_t> accept_errors{0}, orphans_released{0};
};

// How often the housekeeping tick runs (orphan release, aggregated log lines).
constexpr auto kHousekeepingPeriod = std::chrono::milliseconds(250);
// Accept failures (out of descriptors) are logged at most once per this interval.
constexpr auto kAcceptLogInterval = std::chrono::seconds(10);
// Pause after a failed accept, doubling up to the maximum while it keeps failing: a pending
// connection the process cannot take stays pending, and retrying at once would spin.
constexpr auto kAcceptBackoffMin = std::chrono::milliseconds(50);
constexpr auto kAcceptBackoffMax = std::chrono::milliseconds(1000);

bool out_of_descriptors(const boost::system::error_code& ec) {
  return ec == asio::error::no_descriptors || ec == asio::error::no_buffer_space || ec == asio::error::no_memory ||
         ec.value() == ENFILE;
}

}  // namespace

struct Server::Impl : FrameService {
  ServerOptions opt;
  const Server* owner = nullptr;
  KvStore store;
  asio::io_context io;
  std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> work;
  tcp::acceptor acceptor{io};
  tcp::acceptor metrics_acceptor{io};
  asio::steady_timer accept_backoff{io};
  std::chrono::steady_clock::duration accept_delay = kAcceptBackoffMin;
  std::chrono::steady_clock::time_point accept_logged{};
  std::uint64_t accept_errors_unlogged = 0;
  asio::steady_timer housekeeping{io};
  std::vector<std::thread> io_threads;
  std::unique_ptr<UcxServerTransport> ucx;
  Counters c;
  AuthThrottle auth_throttle;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::atomic<bool> draining_{false}, stopped{false};

  // Compute thread.
  std::thread compute;
  std::mutex cmu;
  std::condition_variable ccv;
  std::deque<std::function<void()>> cq;
  bool compute_stop = false;
  std::atomic<int> in_flight{0};

  // Authenticated connections (bounded by --max-connections) and, per client id, how many of them
  // it has and since when a client id with sequences has none (--orphan-timeout).
  std::atomic<int> authenticated_open{0};
  std::mutex clients_mu;
  std::unordered_map<std::uint64_t, int> connections_of_client;
  std::unordered_map<std::uint64_t, std::chrono::steady_clock::time_point> orphaned_since;

  struct Connection;
  std::mutex conn_mu;
  std::set<std::shared_ptr<Connection>> conns;
  std::deque<std::weak_ptr<Connection>> awaiting_hello;  // TCP connections before hello, oldest first

  explicit Impl(ServerOptions o)
      : opt(std::move(o)), store(KvStoreOptions{opt.memory_limit, opt.per_client_limit, opt.page_tokens}) {}

  spdlog::logger& log() { return logger(Subsystem::offload); }

  void count_error(ErrorCode code) { c.errors[wire_code(code)]++; }

  void submit(std::function<void()> fn) {
    {
      std::lock_guard lock(cmu);
      cq.push_back(std::move(fn));
    }
    ccv.notify_one();
  }

  void compute_loop() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock lock(cmu);
        ccv.wait(lock, [&] { return compute_stop || !cq.empty(); });
        if (cq.empty()) return;
        fn = std::move(cq.front());
        cq.pop_front();
      }
      fn();
    }
  }

  // ---- FrameService: the request logic, the same for every transport ----
  const Limits& limits() const override { return opt.limits; }
  bool draining() const override { return draining_; }
  double hello_timeout_s() const override { return opt.hello_timeout_s; }
  double frame_timeout_s() const override { return opt.frame_timeout_s; }
  int max_unauthenticated() const override { return opt.max_unauthenticated; }
  void on_bytes(std::size_t in, std::size_t out) override {
    c.bytes_in += in;
    c.bytes_out += out;
  }
  void on_connection_opened() override {
    c.connections_total++;
    c.connections_open++;
  }
  void on_connection_closed(const Session& s) override {
    c.connections_open--;
    if (!s.authed) return;
    authenticated_open--;
    std::lock_guard lock(clients_mu);
    auto it = connections_of_client.find(s.client);
    if (it != connections_of_client.end() && --it->second == 0) {
      connections_of_client.erase(it);
      orphaned_since[s.client] = std::chrono::steady_clock::now();
    }
  }

  void check_header(const Session& s, const FrameHeader& h) override {
    if (s.authed) return;
    const std::uint32_t most = max_hello_payload(opt.limits);
    if (h.payload_bytes > most)
      throw Error(ErrorCode::unauthorized,
                  fmt::format("unauthorized: a frame of {} bytes before authentication (at most {} until hello succeeds); send "
                              "hello with the server's token first",
                              h.payload_bytes, most));
  }
  void reserve_receive_buffer(std::size_t bytes) override { store.pool().reserve_buffer(bytes); }
  void release_receive_buffer(std::size_t bytes) noexcept override { store.pool().release_buffer(bytes); }

  std::vector<std::byte> error_frame(std::uint64_t id, const Error& e) {
    count_error(e.code());
    return frame(MsgType::error, kFlagResponse, id, encode(ErrorReply{e.code(), e.what()}));
  }

  std::vector<std::byte> on_bad_header(Session& s, const Error& e) override {
    if (e.code() == ErrorCode::unauthorized) {
      auth_throttle.failed(peer_address(s.peer));  // reported in the aggregate line, not one line per peer
    } else {
      log().warn("connection {}: {}; closing it", s.peer, e.what());
    }
    return error_frame(0, e);
  }

  std::vector<std::byte> on_discarded_frame(Session& s, const FrameHeader& h, const Error& e) override {
    log().info("connection {}: {} request {} refused: {}", s.peer, to_string(h.type), h.request_id, e.what());
    return error_frame(h.request_id, e);
  }

  // Takes one of the --max-connections slots of authenticated connections, if one is free.
  bool take_authenticated_slot() {
    int open = authenticated_open.load();
    while (open < opt.max_connections)
      if (authenticated_open.compare_exchange_weak(open, open + 1)) return true;
    return false;
  }

  void client_connected(std::uint64_t client) {
    std::lock_guard lock(clients_mu);
    connections_of_client[client]++;
    orphaned_since.erase(client);
  }

  void authenticate(Session& s, std::span<const std::byte> payload) {
    const std::string address = peer_address(s.peer);
    if (!auth_throttle.allow(address))
      throw Error(ErrorCode::unauthorized, fmt::format("unauthorized: too many failed authentications from {}; try again in {:.0f} s",
                                                       address, std::ceil(auth_throttle.wait_s(address))));
    const Hello m = decode_hello(payload, opt.limits);
    if (!secrets_equal(m.token, opt.token)) {
      auth_throttle.failed(address);
      throw Error(ErrorCode::unauthorized, "unauthorized: wrong token");
    }
    if (!take_authenticated_slot()) {
      log().warn("refusing connection {}: {} authenticated connections open is the limit (--max-connections)", s.peer,
                 opt.max_connections);
      throw Error(ErrorCode::out_of_capacity,
                  fmt::format("out of capacity: the server has {} connections open, its limit (--max-connections); close idle "
                              "clients, use another server, or raise the limit",
                              opt.max_connections));
    }
    s.authed = true;
    s.client = m.client_id;
    client_connected(m.client_id);
  }

  void on_frame(Session& s, const FrameHeader& h, std::vector<std::byte>& payload, Respond respond) override {
    const auto ti = static_cast<std::size_t>(h.type);
    if (ti < c.requests.size()) c.requests[ti]++;
    const Limits& lim = opt.limits;
    auto reply = [&](std::span<const std::byte> p) { respond(frame(h.type, kFlagResponse, h.request_id, p), false); };
    try {
      if (h.flags & kFlagResponse) throw Error(ErrorCode::protocol, "malformed frame: a reply sent to the server");
      if (h.type == MsgType::error) throw Error(ErrorCode::protocol, "malformed frame: an error frame sent to the server");
      if (!s.authed && h.type != MsgType::hello)
        throw Error(ErrorCode::unauthorized, "unauthorized: send hello with the server's token first");
      if (draining_) throw Error(ErrorCode::communication, "the server is shutting down; use another server");
      switch (h.type) {
        case MsgType::hello: {
          if (!s.authed) authenticate(s, payload);
          reply(encode(HelloReply{kVersion, static_cast<std::uint32_t>(opt.page_tokens), lim.max_payload}));
          return;
        }
        case MsgType::open: {
          store.open(s.client, decode_open(payload, lim));
          reply({});
          return;
        }
        case MsgType::append: {
          const AppendReply r{store.append(s.client, decode_append(payload, lim))};
          reply(encode(r));
          return;
        }
        case MsgType::drop: {
          const bool existed = store.drop(s.client, decode_drop(payload, lim).seq);
          const std::array<std::byte, 1> b{static_cast<std::byte>(existed ? 1 : 0)};
          reply(b);
          return;
        }
        case MsgType::stats: {
          if (!payload.empty()) throw Error(ErrorCode::protocol, "malformed frame: stats request carries a payload");
          const std::string text = owner->metrics_text();
          reply(std::as_bytes(std::span(text.data(), text.size())));
          return;
        }
        case MsgType::attend: {
          auto m = std::make_shared<Attend>(decode_attend(payload, lim));
          auto keep = std::make_shared<std::vector<std::byte>>(std::move(payload));  // m's spans point into it
          in_flight++;
          submit([this, m, keep, client = s.client, peer = s.peer, id = h.request_id, respond] {
            respond(run_attend(client, peer, id, *m), false);
            in_flight--;
          });
          return;
        }
        case MsgType::error: break;
      }
      throw Error(ErrorCode::protocol, "malformed frame: unexpected message type");
    } catch (const Error& e) {
      // Before authentication every error ends the connection.
      const bool fatal = !s.authed || e.code() == ErrorCode::protocol || e.code() == ErrorCode::unauthorized ||
                         (e.code() == ErrorCode::communication && draining_);
      if (e.code() == ErrorCode::unauthorized) {
        // Wrong tokens are counted per address and reported in one line per interval.
        if (h.type != MsgType::hello) auth_throttle.failed(peer_address(s.peer));
      } else if (fatal) {
        log().warn("connection {}: {}; closing it", s.peer, e.what());
      } else {
        log().info("connection {}: {} request {} refused: {}", s.peer, to_string(h.type), h.request_id, e.what());
      }
      respond(error_frame(h.request_id, e), fatal);
    } catch (const std::bad_alloc&) {
      respond(error_frame(h.request_id, Error(ErrorCode::out_of_capacity, "out of capacity: the server could not allocate memory")), false);
    } catch (const std::exception& e) {
      respond(error_frame(h.request_id, Error(ErrorCode::internal, std::string("internal error: ") + e.what())), false);
    }
  }

  // On the compute thread: the reply frame (or error frame) of one attend.
  std::vector<std::byte> run_attend(std::uint64_t client, const std::string& peer, std::uint64_t id, const Attend& m) {
    try {
      const std::size_t rows = static_cast<std::size_t>(m.total_q) * m.q_heads;
      std::vector<float> o(rows * m.head_dim), lse(rows);
      const auto st = store.attend(client, m, o.data(), lse.data(), opt.compute_threads);
      c.kernel_ns += static_cast<std::uint64_t>(st.kernel_seconds * 1e9);
      c.kv_bytes_read += st.kv_bytes_read;
      c.attend_queries += m.total_q;
      return frame(MsgType::attend, kFlagResponse, id, encode_attend_reply(m.total_q, m.q_heads, m.head_dim, o.data(), lse.data()));
    } catch (const Error& e) {
      log().info("connection {}: attend request {} refused: {}", peer, id, e.what());
      return error_frame(id, e);
    } catch (const std::bad_alloc&) {
      return error_frame(id, Error(ErrorCode::out_of_capacity, "out of capacity: the server could not allocate the attend buffers"));
    } catch (const std::exception& e) {
      return error_frame(id, Error(ErrorCode::internal, std::string("internal error: ") + e.what()));
    }
  }

  // ---- orphans and housekeeping ----
  // Sequences whose client id has no connection now.
  std::size_t orphaned_sequences() {
    const auto all = store.list();
    std::lock_guard lock(clients_mu);
    std::size_t n = 0;
    for (const auto& info : all) n += connections_of_client.count(info.client) ? 0 : 1;
    return n;
  }

  void release_orphans(std::chrono::steady_clock::time_point now) {
    if (opt.orphan_timeout_s <= 0) return;
    const auto timeout = std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(opt.orphan_timeout_s));
    std::vector<std::uint64_t> expired;
    {
      std::lock_guard lock(clients_mu);
      for (auto it = orphaned_since.begin(); it != orphaned_since.end();) {
        if (now - it->second >= timeout) {
          expired.push_back(it->first);
          it = orphaned_since.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto client : expired) {
      const std::size_t n = store.drop_client(client);
      if (n == 0) continue;
      c.orphans_released += n;
      log().info("released {} sequence{} of client {}: no connection for {} s (--orphan-timeout)", n, n == 1 ? "" : "s", client,
                 opt.orphan_timeout_s);
    }
  }

  void housekeeping_tick() {
    housekeeping.expires_after(kHousekeepingPeriod);
    housekeeping.async_wait([this](boost::system::error_code ec) {
      if (ec || stopped) return;
      const auto now = std::chrono::steady_clock::now();
      release_orphans(now);
      const std::string summary = auth_throttle.take_summary(now);
      if (!summary.empty()) log().warn("{}", summary);
      if (!draining_) housekeeping_tick();
    });
  }

  // ---- TCP ----
  struct Connection : std::enable_shared_from_this<Connection> {
    Impl* srv;
    tcp::socket sock;
    asio::steady_timer timer;
    std::array<std::byte, kHeaderBytes> hbuf{};
    FrameHeader h;
    ReceiveBuffer payload;
    std::vector<std::byte> out;
    std::vector<std::byte> discard;  // pieces of a payload that had no room
    Session session;
    bool closed = false;
    std::atomic<bool> authenticated{false};  // session.authed, readable from the accepting thread
    std::chrono::steady_clock::time_point frame_started;

    Connection(Impl* s, tcp::socket so) : srv(s), sock(std::move(so)), timer(sock.get_executor()), payload(*s) {
      boost::system::error_code ec;
      auto ep = sock.remote_endpoint(ec);
      session.peer = ec ? "?" : fmt::format("{}:{}", ep.address().to_string(), ep.port());
      sock.set_option(tcp::no_delay(true), ec);
    }

    void arm(std::chrono::steady_clock::duration after, double seconds, const char* waiting_for) {
      timer.expires_after(after);
      timer.async_wait([self = shared_from_this(), seconds, waiting_for](boost::system::error_code ec) {
        if (ec) return;
        self->srv->log().warn("connection {}: no {} within {} s; closing", self->session.peer, waiting_for, seconds);
        self->srv->count_error(ErrorCode::timeout);
        self->close();
      });
    }
    void arm_hello() {
      const double s = srv->opt.hello_timeout_s;
      arm(std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s)), s, "hello");
    }
    // The frame timeout counts from the frame's first byte, whatever part of it is still missing.
    void arm_frame(const char* waiting_for) {
      if (!session.authed) return;  // the hello timeout bounds everything before hello
      const double s = srv->opt.frame_timeout_s;
      const auto deadline = frame_started + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
      const auto left = deadline - std::chrono::steady_clock::now();
      arm(std::max(left, std::chrono::steady_clock::duration::zero()), s, waiting_for);
    }

    void close() {
      if (closed) return;
      closed = true;
      boost::system::error_code ec;
      timer.cancel();
      sock.shutdown(tcp::socket::shutdown_both, ec);
      sock.close(ec);
      payload.release();
      srv->on_connection_closed(session);
      std::lock_guard lock(srv->conn_mu);
      srv->conns.erase(shared_from_this());
    }

    // Between frames an authenticated client may idle as long as it likes; once a frame has
    // started (its first byte), all of it must arrive within the frame timeout. Before hello, the
    // hello timeout bounds everything.
    void read_header() {
      if (closed) return;
      if (!session.authed) {
        arm_hello();
      } else {
        timer.cancel();
      }
      sock.async_read_some(asio::buffer(hbuf), [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
        if (self->read_failed(ec, "")) return;
        self->frame_started = std::chrono::steady_clock::now();
        self->srv->on_bytes(n, 0);
        if (n == self->hbuf.size()) {
          self->on_header();
          return;
        }
        self->arm_frame("complete frame header");
        asio::async_read(self->sock, asio::buffer(self->hbuf.data() + n, self->hbuf.size() - n),
                         [self](boost::system::error_code ec2, std::size_t n2) {
                           if (self->read_failed(ec2, "header cut short: ")) return;
                           self->srv->on_bytes(n2, 0);
                           self->on_header();
                         });
      });
    }

    bool read_failed(const boost::system::error_code& ec, const char* what) {
      if (!ec) return false;
      if (ec != asio::error::eof && ec != asio::error::operation_aborted)
        srv->log().debug("connection {}: {}{}", session.peer, what, ec.message());
      close();
      return true;
    }

    void on_header() {
      try {
        h = decode_header(hbuf, srv->opt.limits);
        srv->check_header(session, h);
      } catch (const Error& e) {
        send(srv->on_bad_header(session, e), true);
        return;
      }
      if (h.payload_bytes == 0) {
        payload.size_for(0);
        on_frame();
        return;
      }
      arm_frame("complete frame");
      try {
        payload.size_for(h.payload_bytes);
      } catch (const Error& e) {
        discard_payload(h.payload_bytes, e);
        return;
      }
      asio::async_read(sock, asio::buffer(payload.bytes()), [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
        if (ec) {
          self->srv->log().debug("connection {}: frame cut short: {}", self->session.peer, ec.message());
          self->close();
          return;
        }
        self->srv->on_bytes(n, 0);
        self->timer.cancel();
        self->on_frame();
      });
    }

    // A payload the memory limit has no room for is read in small pieces and thrown away, then
    // refused; the connection stays in step and usable.
    void discard_payload(std::size_t left, const Error& why) {
      if (left == 0) {
        std::vector<std::byte>().swap(discard);
        timer.cancel();
        send(srv->on_discarded_frame(session, h, why), false);
        return;
      }
      discard.resize(std::min(left, kDiscardPieceBytes));
      sock.async_read_some(asio::buffer(discard), [self = shared_from_this(), left, why](boost::system::error_code ec, std::size_t n) {
        if (self->read_failed(ec, "frame cut short: ")) return;
        self->srv->on_bytes(n, 0);
        self->discard_payload(left - n, why);
      });
    }

    void send(std::vector<std::byte> bytes, bool then_close) {
      out = std::move(bytes);
      asio::async_write(sock, asio::buffer(out), [self = shared_from_this(), then_close](boost::system::error_code ec, std::size_t n) {
        self->srv->on_bytes(0, n);
        if (ec || then_close) {
          self->close();
          return;
        }
        boost::system::error_code e2;
        self->payload.settle(self->sock.available(e2) > 0);
        self->read_header();
      });
    }

    void on_frame() {
      if (session.authed) timer.cancel();
      std::weak_ptr<Connection> weak = shared_from_this();
      srv->on_frame(session, h, payload.bytes(), [weak](std::vector<std::byte> f, bool then_close) {
        auto self = weak.lock();
        if (!self) return;
        asio::post(self->sock.get_executor(), [self, f = std::move(f), then_close]() mutable {
          if (self->closed) return;
          if (self->session.authed) self->timer.cancel();
          self->send(std::move(f), then_close);
        });
      });
      if (session.authed) authenticated = true;
    }
  };

  // Closes the oldest connections still before hello until one more fits under
  // --max-unauthenticated; under conn_mu.
  void make_room_before_hello() {
    while (!awaiting_hello.empty()) {
      auto front = awaiting_hello.front().lock();
      if (!front || front->authenticated) {
        awaiting_hello.pop_front();
        continue;
      }
      break;
    }
    std::size_t waiting = 0;
    for (auto& w : awaiting_hello) {
      auto cn = w.lock();
      waiting += cn && !cn->authenticated ? 1 : 0;
    }
    while (waiting >= static_cast<std::size_t>(opt.max_unauthenticated) && !awaiting_hello.empty()) {
      auto oldest = awaiting_hello.front().lock();
      awaiting_hello.pop_front();
      if (!oldest || oldest->authenticated) continue;
      waiting--;
      asio::post(oldest->sock.get_executor(), [this, oldest] {
        if (oldest->closed || oldest->session.authed) return;
        log().info("connection {}: closed before hello to make room ({} connections before hello is the limit, "
                   "--max-unauthenticated)",
                   oldest->session.peer, opt.max_unauthenticated);
        oldest->close();
      });
    }
  }

  void note_accept_failure(const boost::system::error_code& ec) {
    c.accept_errors++;
    accept_errors_unlogged++;
    const auto now = std::chrono::steady_clock::now();
    if (now - accept_logged < kAcceptLogInterval) return;
    const bool fds = ec == asio::error::no_descriptors || ec.value() == ENFILE;
    log().warn("accept failed {} time{} since the last report: {}{}", accept_errors_unlogged, accept_errors_unlogged == 1 ? "" : "s",
               ec.message(),
               fds ? "; the process is out of file descriptors: raise its open-file limit (ulimit -n, LimitNOFILE=) or lower "
                     "--max-connections; new connections wait meanwhile"
                   : "");
    accept_logged = now;
    accept_errors_unlogged = 0;
  }

  void accept() {
    acceptor.async_accept(asio::make_strand(io), [this](boost::system::error_code ec, tcp::socket s) {
      if (ec) {
        if (!acceptor.is_open() || draining_) return;
        if (out_of_descriptors(ec)) {
          note_accept_failure(ec);
          accept_backoff.expires_after(accept_delay);
          accept_delay = std::min<std::chrono::steady_clock::duration>(accept_delay * 2, kAcceptBackoffMax);
          accept_backoff.async_wait([this](boost::system::error_code e2) {
            if (!e2 && acceptor.is_open()) accept();
          });
          return;
        }
        if (ec != asio::error::operation_aborted) log().warn("accept: {}", ec.message());
        accept();
        return;
      }
      accept_delay = kAcceptBackoffMin;
      if (draining_) return;
      auto conn = std::make_shared<Connection>(this, std::move(s));
      on_connection_opened();
      {
        std::lock_guard lock(conn_mu);
        make_room_before_hello();
        awaiting_hello.push_back(conn);
        conns.insert(conn);
      }
      asio::post(conn->sock.get_executor(), [conn] { conn->read_header(); });
      accept();
    });
  }

  // ---- metrics and admin over HTTP ----
  // What an HTTP request asks for, and whether it carried the token.
  std::pair<std::string, std::string> http_answer(const std::string& method, const std::string& target, const std::string& bearer,
                                                  const std::string& peer) {
    const auto q = target.find('?');
    const std::string path = target.substr(0, q);
    const std::string query = q == std::string::npos ? "" : target.substr(q + 1);
    if (method == "GET" && path == "/metrics") return {"200 OK", owner->metrics_text()};
    if (path.rfind("/admin/", 0) != 0) return {"404 Not Found", "served here: GET /metrics, GET /admin/sequences, POST /admin/drop\n"};
    const std::string address = peer_address(peer);
    if (!auth_throttle.allow(address))
      return {"429 Too Many Requests", fmt::format("too many failed authentications from {}; try again in {:.0f} s\n", address,
                                                   std::ceil(auth_throttle.wait_s(address)))};
    if (!secrets_equal(bearer, opt.token)) {
      auth_throttle.failed(address);
      return {"401 Unauthorized", "send the server's token as the header 'Authorization: Bearer TOKEN'\n"};
    }
    if (method == "GET" && path == "/admin/sequences") return {"200 OK", sequences_text()};
    if (method == "POST" && path == "/admin/drop") return admin_drop(query);
    return {"404 Not Found", "admin requests: GET /admin/sequences, POST /admin/drop?client=ID[&seq=ID]\n"};
  }

  std::string sequences_text() {
    const auto all = store.list();
    std::unordered_map<std::uint64_t, int> connected;
    {
      std::lock_guard lock(clients_mu);
      connected = connections_of_client;
    }
    std::string out = "# client seq layers token_layers bytes client_connections\n";
    for (const auto& i : all) {
      const auto it = connected.find(i.client);
      out += fmt::format("{} {} {} {} {} {}\n", i.client, i.seq, i.layers, i.token_layers, i.bytes, it == connected.end() ? 0 : it->second);
    }
    return out;
  }

  std::pair<std::string, std::string> admin_drop(const std::string& query) {
    std::optional<std::uint64_t> client, seq;
    std::size_t at = 0;
    while (at <= query.size()) {
      const auto amp = std::min(query.find('&', at), query.size());
      const std::string pair = query.substr(at, amp - at);
      const auto eq = pair.find('=');
      const std::string key = pair.substr(0, eq), value = eq == std::string::npos ? "" : pair.substr(eq + 1);
      char* end = nullptr;
      const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
      const bool number = !value.empty() && end && *end == '\0' && value[0] != '-';
      if (key == "client" || key == "seq") {
        if (!number) return {"400 Bad Request", fmt::format("{}='{}' is not a number\n", key, value)};
        (key == "client" ? client : seq) = static_cast<std::uint64_t>(v);
      } else if (!pair.empty()) {
        return {"400 Bad Request", fmt::format("unknown parameter '{}'; use client=ID and optionally seq=ID\n", key)};
      }
      at = amp + 1;
    }
    if (!client) return {"400 Bad Request", "POST /admin/drop needs client=ID (and seq=ID for one sequence)\n"};
    const std::size_t n = seq ? (store.drop(*client, *seq) ? 1 : 0) : store.drop_client(*client);
    log().info("admin: dropped {} sequence{} of client {}", n, n == 1 ? "" : "s", *client);
    return {"200 OK", fmt::format("dropped {}\n", n)};
  }

  struct HttpConn : std::enable_shared_from_this<HttpConn> {
    Impl* srv;
    tcp::socket sock;
    asio::streambuf buf{8192};
    std::string out;
    asio::steady_timer timer;
    HttpConn(Impl* s, tcp::socket so) : srv(s), sock(std::move(so)), timer(sock.get_executor()) {}
    void start() {
      // A scraper that does not finish its request within 5 s is dropped.
      timer.expires_after(std::chrono::seconds(5));
      timer.async_wait([self = shared_from_this()](boost::system::error_code ec) {
        if (ec) return;
        boost::system::error_code e;
        self->sock.close(e);
      });
      asio::async_read_until(sock, buf, "\r\n\r\n", [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
        self->timer.cancel();
        if (ec) return;
        std::istream is(&self->buf);
        std::string method, target, line, bearer;
        is >> method >> target;
        std::getline(is, line);
        while (std::getline(is, line) && line != "\r" && !line.empty()) {
          if (!line.empty() && line.back() == '\r') line.pop_back();
          const auto colon = line.find(':');
          if (colon == std::string::npos) continue;
          std::string name = line.substr(0, colon);
          for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
          std::string value = line.substr(colon + 1);
          value.erase(0, value.find_first_not_of(' '));
          if (name == "authorization" && value.rfind("Bearer ", 0) == 0) bearer = value.substr(7);
        }
        boost::system::error_code e;
        const auto ep = self->sock.remote_endpoint(e);
        const std::string peer = e ? "?" : fmt::format("{}:{}", ep.address().to_string(), ep.port());
        const auto [status, body] = self->srv->http_answer(method, target, bearer, peer);
        self->out = fmt::format("HTTP/1.1 {}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                                status, body.size(), body);
        asio::async_write(self->sock, asio::buffer(self->out), [self](boost::system::error_code, std::size_t) {
          boost::system::error_code e2;
          self->sock.shutdown(tcp::socket::shutdown_both, e2);
          self->sock.close(e2);
        });
      });
    }
  };

  void accept_metrics() {
    metrics_acceptor.async_accept(asio::make_strand(io), [this](boost::system::error_code ec, tcp::socket s) {
      if (ec) {
        if (!metrics_acceptor.is_open()) return;
        if (out_of_descriptors(ec)) {
          note_accept_failure(ec);
          return;  // the metrics listener waits for the next scrape's own retry rather than spinning here
        }
        accept_metrics();
        return;
      }
      std::make_shared<HttpConn>(this, std::move(s))->start();
      accept_metrics();
    });
  }

  static void bind(tcp::acceptor& a, asio::io_context& io, const std::string& where) {
    const auto [host, port] = parse_host_port(where);
    boost::system::error_code ec;
    const auto addr = asio::ip::make_address(host, ec);
    tcp::endpoint ep;
    if (ec) {
      tcp::resolver res(io);
      auto r = res.resolve(host, std::to_string(port), ec);
      LONGATTN_REQUIRE(!ec && !r.empty(), ErrorCode::invalid_argument, "cannot resolve listen address '{}': {}", where, ec.message());
      ep = *r.begin();
    } else {
      ep = tcp::endpoint(addr, static_cast<unsigned short>(port));
    }
    a.open(ep.protocol());
    a.set_option(tcp::acceptor::reuse_address(true));
    a.bind(ep, ec);
    LONGATTN_REQUIRE(!ec, ErrorCode::io, "cannot listen on {}: {}", where, ec.message());
    a.listen(asio::socket_base::max_listen_connections);
  }

  // Raises the open-file limit to what the connection limits need, or says that it cannot.
  void check_open_file_limit() {
    const std::size_t wanted = static_cast<std::size_t>(opt.max_connections) + static_cast<std::size_t>(opt.max_unauthenticated) + 64;
    const auto lim = raise_open_file_limit(wanted);
    if (lim.soft >= wanted || lim.soft == 0) return;
    log().warn("the open-file limit is {} (hard limit {}), below the {} descriptors that --max-connections {} and "
               "--max-unauthenticated {} need; connections past it wait in the listen queue. Raise it (ulimit -n, "
               "LimitNOFILE= in the systemd unit) or lower --max-connections",
               lim.soft, lim.hard, wanted, opt.max_connections, opt.max_unauthenticated);
  }

  void close_all(bool abrupt) {
    std::vector<std::shared_ptr<Connection>> all;
    {
      std::lock_guard lock(conn_mu);
      all.assign(conns.begin(), conns.end());
    }
    for (auto& cn : all) {
      asio::post(cn->sock.get_executor(), [cn, abrupt] {
        if (abrupt) {
          boost::system::error_code ec;
          cn->sock.set_option(asio::socket_base::linger(true, 0), ec);  // RST, like a crashed process
        }
        cn->close();
      });
    }
  }

  void stop_timers() {
    asio::post(io, [this] {
      accept_backoff.cancel();
      housekeeping.cancel();
    });
  }
};

Server::Server(ServerOptions opt) {
  LONGATTN_INVALID(!opt.token.empty(), "the server needs a token (--token-file): refusing to serve without authentication");
  LONGATTN_INVALID(opt.io_threads >= 1 && opt.io_threads <= 256, "io_threads {} outside [1, 256]", opt.io_threads);
  LONGATTN_INVALID(opt.transport == "tcp" || opt.transport == "ucx", "transport must be tcp or ucx, got '{}'", opt.transport);
  LONGATTN_INVALID(opt.max_connections >= 1, "max_connections {} must be at least 1", opt.max_connections);
  LONGATTN_INVALID(opt.max_unauthenticated >= 1, "max_unauthenticated {} must be at least 1", opt.max_unauthenticated);
  LONGATTN_INVALID(opt.orphan_timeout_s >= 0, "orphan_timeout_s {} must be >= 0 (0 = never)", opt.orphan_timeout_s);
  LONGATTN_REQUIRE(opt.transport == "tcp" || ucx_available(), ErrorCode::unsupported,
                   "transport 'ucx' is not available in this build (built without UCX headers); use --transport tcp or "
                   "rebuild where UCX is installed (libucx-dev)");
  impl_ = std::make_unique<Impl>(std::move(opt));
  impl_->owner = this;
}

Server::~Server() {
  if (impl_ && !impl_->io_threads.empty() && !impl_->stopped) {
    kill();
    wait();
  }
}

void Server::start() {
  auto& I = *impl_;
  I.check_open_file_limit();
  if (I.opt.transport == "ucx") {
    const auto [host, p] = parse_host_port(I.opt.listen);
    I.ucx = make_ucx_server(host, p, I);
  } else {
    Impl::bind(I.acceptor, I.io, I.opt.listen);
  }
  if (!I.opt.metrics_listen.empty()) {
    Impl::bind(I.metrics_acceptor, I.io, I.opt.metrics_listen);
    I.accept_metrics();
  }
  I.work = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(I.io.get_executor());
  if (!I.ucx) I.accept();
  I.housekeeping_tick();
  I.compute = std::thread([&I] { I.compute_loop(); });
  for (int i = 0; i < I.opt.io_threads; ++i) I.io_threads.emplace_back([&I] { I.io.run(); });
  I.log().info("serving on {} port {} ({}; memory limit {}){}", I.opt.listen, port(), I.opt.transport, format_bytes(I.opt.memory_limit),
               I.opt.metrics_listen.empty() ? "" : fmt::format("; metrics on port {}", metrics_port()));
}

int Server::port() const {
  if (impl_->ucx) return impl_->ucx->port();
  return impl_->acceptor.is_open() ? impl_->acceptor.local_endpoint().port() : 0;
}
int Server::metrics_port() const { return impl_->metrics_acceptor.is_open() ? impl_->metrics_acceptor.local_endpoint().port() : 0; }

void Server::shutdown() {
  auto& I = *impl_;
  if (I.draining_.exchange(true)) return;
  I.log().info("shutting down: refusing new requests, finishing {} in flight", I.in_flight.load());
  asio::post(I.io, [&I] {
    boost::system::error_code ec;
    I.acceptor.close(ec);
  });
  // In-flight attends finish on the compute thread and their replies are written; then close.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (I.in_flight.load() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let the last replies flush
  I.stop_timers();
  I.close_all(false);
  if (I.ucx) I.ucx->stop(false);
  asio::post(I.io, [&I] {
    boost::system::error_code ec;
    I.metrics_acceptor.close(ec);
  });
  I.work.reset();
}

void Server::kill() {
  auto& I = *impl_;
  I.draining_ = true;
  asio::post(I.io, [&I] {
    boost::system::error_code ec;
    I.acceptor.close(ec);
    I.metrics_acceptor.close(ec);
  });
  I.stop_timers();
  I.close_all(true);
  if (I.ucx) I.ucx->stop(true);
  I.work.reset();
}

void Server::wait() {
  auto& I = *impl_;
  for (auto& t : I.io_threads)
    if (t.joinable()) t.join();
  if (I.ucx) I.ucx->join();
  {
    std::lock_guard lock(I.cmu);
    I.compute_stop = true;
  }
  I.ccv.notify_all();
  if (I.compute.joinable()) I.compute.join();
  I.stopped = true;
}

std::string Server::metrics_text() const {
  auto& I = *impl_;
  const auto st = I.store.stats();
  std::string s;
  s += "# HELP longattn_offload_requests_total Requests received, by type.\n# TYPE longattn_offload_requests_total counter\n";
  for (std::size_t t = 1; t < I.c.requests.size(); ++t)
    s += fmt::format("longattn_offload_requests_total{{type=\"{}\"}} {}\n", kTypeNames[t - 1], I.c.requests[t].load());
  s += "# HELP longattn_offload_errors_total Error replies and dropped connections, by kind.\n# TYPE longattn_offload_errors_total counter\n";
  for (std::size_t e = 1; e < I.c.errors.size(); ++e)
    s += fmt::format("longattn_offload_errors_total{{kind=\"{}\"}} {}\n", kCodeNames[e], I.c.errors[e].load());
  const double kernel_s = static_cast<double>(I.c.kernel_ns.load()) * 1e-9;
  s += fmt::format(
      "# TYPE longattn_offload_bytes_received_total counter\nlongattn_offload_bytes_received_total {}\n"
      "# TYPE longattn_offload_bytes_sent_total counter\nlongattn_offload_bytes_sent_total {}\n"
      "# TYPE longattn_offload_connections_open gauge\nlongattn_offload_connections_open {}\n"
      "# TYPE longattn_offload_connections_total counter\nlongattn_offload_connections_total {}\n"
      "# HELP longattn_offload_kv_sequences Sequences held.\n# TYPE longattn_offload_kv_sequences gauge\nlongattn_offload_kv_sequences {}\n"
      "# HELP longattn_offload_kv_token_layers KV tokens held, summed over layers.\n# TYPE longattn_offload_kv_token_layers gauge\n"
      "longattn_offload_kv_token_layers {}\n"
      "# HELP longattn_offload_kv_bytes KV page bytes held by sequences.\n# TYPE longattn_offload_kv_bytes gauge\nlongattn_offload_kv_bytes {}\n"
      "# TYPE longattn_offload_kv_bytes_reserved gauge\nlongattn_offload_kv_bytes_reserved {}\n"
      "# TYPE longattn_offload_memory_limit_bytes gauge\nlongattn_offload_memory_limit_bytes {}\n"
      "# TYPE longattn_offload_kernel_seconds_total counter\nlongattn_offload_kernel_seconds_total {:.6f}\n"
      "# TYPE longattn_offload_kernel_kv_bytes_read_total counter\nlongattn_offload_kernel_kv_bytes_read_total {}\n"
      "# HELP longattn_offload_kernel_gbps KV bytes read per second of decode kernel time, since start.\n"
      "# TYPE longattn_offload_kernel_gbps gauge\nlongattn_offload_kernel_gbps {:.3f}\n"
      "# TYPE longattn_offload_attend_queries_total counter\nlongattn_offload_attend_queries_total {}\n"
      "# HELP longattn_offload_kv_sequences_orphaned Sequences whose client id has no connection now.\n"
      "# TYPE longattn_offload_kv_sequences_orphaned gauge\nlongattn_offload_kv_sequences_orphaned {}\n"
      "# HELP longattn_offload_orphaned_sequences_released_total Sequences dropped after --orphan-timeout without a connection.\n"
      "# TYPE longattn_offload_orphaned_sequences_released_total counter\nlongattn_offload_orphaned_sequences_released_total {}\n"
      "# HELP longattn_offload_receive_buffer_bytes Bytes of frames being received (counted against the memory limit).\n"
      "# TYPE longattn_offload_receive_buffer_bytes gauge\nlongattn_offload_receive_buffer_bytes {}\n"
      "# HELP longattn_offload_auth_failures_total Wrong tokens (and requests before hello).\n"
      "# TYPE longattn_offload_auth_failures_total counter\nlongattn_offload_auth_failures_total {}\n"
      "# HELP longattn_offload_auth_rate_limited_total Authentications refused unchecked: too many failures from that address.\n"
      "# TYPE longattn_offload_auth_rate_limited_total counter\nlongattn_offload_auth_rate_limited_total {}\n"
      "# HELP longattn_offload_accept_errors_total Failed accepts (e.g. out of file descriptors).\n"
      "# TYPE longattn_offload_accept_errors_total counter\nlongattn_offload_accept_errors_total {}\n",
      I.c.bytes_in.load(), I.c.bytes_out.load(), I.c.connections_open.load(), I.c.connections_total.load(), st.sequences, st.tokens,
      st.bytes_in_use, st.bytes_reserved, st.memory_limit, kernel_s, I.c.kv_bytes_read.load(),
      kernel_s > 0 ? static_cast<double>(I.c.kv_bytes_read.load()) / kernel_s * 1e-9 : 0.0, I.c.attend_queries.load(),
      I.orphaned_sequences(), I.c.orphans_released.load(), st.receive_buffers, I.auth_throttle.failures_total(),
      I.auth_throttle.refused_total(), I.c.accept_errors.load());
  return s;
}

std::string Server::result_json() const {
  const auto& I = *impl_;
  std::uint64_t req = 0, err = 0;
  for (std::size_t t = 1; t < I.c.requests.size(); ++t) req += I.c.requests[t].load();
  for (std::size_t e = 1; e < I.c.errors.size(); ++e) err += I.c.errors[e].load();
  const double kernel_s = static_cast<double>(I.c.kernel_ns.load()) * 1e-9;
  const double up = std::chrono::duration<double>(std::chrono::steady_clock::now() - I.started).count();
  return fmt::format(
      "{{\"program\":\"longattn-offload-server\",\"uptime_s\":{:.3f},\"requests\":{},\"attend_requests\":{},\"errors\":{},"
      "\"bytes_in\":{},\"bytes_out\":{},\"connections\":{},\"kernel_s\":{:.6f},\"kernel_gbps\":{:.3f}}}",
      up, req, I.c.requests[static_cast<std::size_t>(MsgType::attend)].load(), err, I.c.bytes_in.load(), I.c.bytes_out.load(),
      I.c.connections_total.load(), kernel_s, kernel_s > 0 ? static_cast<double>(I.c.kv_bytes_read.load()) / kernel_s * 1e-9 : 0.0);
}

}  // namespace longattn::offload
