// The offload client (include/longattn/offload_client.hpp) and the in-process LocalEngine.
// One I/O thread runs every connection of a client, so connection state needs no locks; the
// public calls only encode (copying the caller's data), register, and post to that thread.
// Per server connection: requests are written in order and answered in order; each has its own
// deadline timer. A lost connection fails or requeues its requests (requeue only for idempotent
// ones, or ones never written) and reconnects with a short backoff while any remain.
#include "longattn/offload_client.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "offload/kv_store.hpp"
#include "offload/protocol.hpp"
#include "offload/server.hpp"
#include "offload/transport.hpp"

namespace longattn::offload {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kShardBits = 16;
constexpr std::uint64_t kMaxSeqId = std::uint64_t{1} << (64 - kShardBits);

std::uint64_t server_seq_id(std::uint64_t seq, std::uint64_t shard) { return (seq << kShardBits) | shard; }

Limits client_limits() {
  Limits l;
  l.max_payload = 0xffffffffu;
  return l;
}

// Called on the I/O thread with the outcome: err == nullptr means success with `payload`.
using Done = std::function<void(const Error* err, std::vector<std::byte>& payload)>;

struct Request {
  std::uint64_t id = 0;
  MsgType type = MsgType::stats;
  std::vector<std::byte> frame;
  bool idempotent = false;
  bool sent = false, completed = false;
  int attempts_left = 0;
  Clock::time_point deadline;
  std::unique_ptr<asio::steady_timer> timer;
  Done done;
};

// Joins the outcomes of several requests into one promise: the first error wins, success when all
// parts succeeded (then `finish` runs once, on the I/O thread).
template <class T>
struct Join {
  std::promise<T> promise;
  std::atomic<int> left{0};
  std::atomic<bool> settled{false};
  std::function<void(std::promise<T>&)> finish;
  void fail(const Error& e) {
    if (settled.exchange(true)) return;
    promise.set_exception(std::make_exception_ptr(e));
  }
  void part_done() {
    if (--left == 0 && !settled.exchange(true)) {
      try {
        finish(promise);
      } catch (...) {
        promise.set_exception(std::current_exception());
      }
    }
  }
};

// The TCP ByteStream: Boost.Asio on the client's I/O thread.
class TcpStream final : public ByteStream {
 public:
  explicit TcpStream(asio::io_context& io) : sock_(io), resolver_(io) {}
  void connect(const std::string& host, const std::string& port, Handler done) override {
    resolver_.async_resolve(host, port, [this, done = std::move(done)](boost::system::error_code ec, tcp::resolver::results_type res) mutable {
      if (ec) {
        done("cannot resolve: " + ec.message(), 0);
        return;
      }
      asio::async_connect(sock_, res, [this, done = std::move(done)](boost::system::error_code ec2, const tcp::endpoint&) {
        if (ec2) {
          done(ec2.message(), 0);
          return;
        }
        boost::system::error_code e;
        sock_.set_option(tcp::no_delay(true), e);
        done("", 0);
      });
    });
  }
  void write(const void* data, std::size_t bytes, Handler done) override {
    asio::async_write(sock_, asio::buffer(data, bytes), [done = std::move(done)](boost::system::error_code ec, std::size_t n) {
      done(ec ? ec.message() : std::string(), n);
    });
  }
  void read(void* data, std::size_t bytes, Handler done) override {
    asio::async_read(sock_, asio::buffer(data, bytes), [done = std::move(done)](boost::system::error_code ec, std::size_t n) {
      done(ec ? ec.message() : std::string(), n);
    });
  }
  void close() override {
    boost::system::error_code ec;
    resolver_.cancel();
    sock_.close(ec);
  }

 private:
  tcp::socket sock_;
  tcp::resolver resolver_;
};

}  // namespace

struct Client::Impl {
  ClientOptions opt;
  asio::io_context io;
  std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::thread thread;
  std::atomic<std::uint64_t> next_id{1};
  std::atomic<std::uint64_t> n_requests{0}, n_retries{0}, n_sent{0}, n_received{0}, n_errors{0};

  struct SeqState {
    SequenceSpec spec;
    std::vector<std::int64_t> len;  // per layer, as the client has sent it
    std::set<std::uint64_t> opened;  // shards opened
    bool broken = false;
    int home = 0;
  };
  std::mutex mu;
  std::map<std::uint64_t, SeqState> seqs;

  struct Conn : std::enable_shared_from_this<Conn> {
    Impl* cl;
    int index;
    std::string host, port, name;
    std::unique_ptr<ByteStream> stream;  // one per connection attempt
    asio::steady_timer backoff;
    enum class State { idle, connecting, handshaking, ready } state = State::idle;
    std::map<std::uint64_t, std::shared_ptr<Request>> pending;
    std::deque<std::shared_ptr<Request>> queue;
    bool writing = false;
    std::uint64_t hello_id = 0;
    std::vector<std::byte> hello_frame;
    std::array<std::byte, kHeaderBytes> hbuf{};
    std::vector<std::byte> rbuf;
    int generation = 0;
    int connect_failures = 0;

    Conn(Impl* c, int i, const std::string& where)
        : cl(c), index(i), name(where), backoff(c->io) {
      const auto [h, p] = parse_host_port(where);
      host = h;
      port = std::to_string(p);
    }

    void submit(std::shared_ptr<Request> r) {
      r->timer = std::make_unique<asio::steady_timer>(cl->io);
      r->timer->expires_at(r->deadline);
      std::weak_ptr<Request> w = r;
      auto self = shared_from_this();
      r->timer->async_wait([self, w](boost::system::error_code ec) {
        if (ec) return;
        if (auto rq = w.lock()) {
          self->complete(*rq, Error(ErrorCode::timeout, fmt::format("server {} did not answer a {} request within {} ms", self->name,
                                                                    to_string(rq->type), self->cl->opt.timeout.count())));
        }
      });
      pending[r->id] = r;
      queue.push_back(r);
      if (state == State::ready) {
        pump();
      } else if (state == State::idle) {
        connect();
      }
    }

    void complete(Request& r, const Error& e) {
      std::vector<std::byte> none;
      finish(r, &e, none);
    }
    void finish(Request& r, const Error* e, std::vector<std::byte>& payload) {
      if (r.completed) return;
      r.completed = true;
      if (r.timer) r.timer->cancel();
      auto keep = pending[r.id];  // `r` may be owned only by the map
      pending.erase(r.id);
      if (e) cl->n_errors++;
      r.done(e, payload);
    }

    void connect() {
      state = State::connecting;
      const int gen = generation;
      auto self = shared_from_this();
      stream = cl->make_stream();
      stream->connect(host, port, [self, gen](const std::string& err, std::size_t) {
        if (gen != self->generation) return;
        if (!err.empty()) {
          self->lost(Error(ErrorCode::communication, fmt::format("cannot connect to server {}: {}", self->name, err)), true);
          return;
        }
        self->handshake();
      });
    }

    void handshake() {
      state = State::handshaking;
      hello_id = cl->next_id++;
      hello_frame = frame(MsgType::hello, 0, hello_id, encode(Hello{cl->opt.token, cl->opt.client_id}));
      const int gen = generation;
      auto self = shared_from_this();
      stream->write(hello_frame.data(), hello_frame.size(), [self, gen](const std::string& err, std::size_t n) {
        if (gen != self->generation) return;
        self->cl->n_sent += n;
        if (!err.empty()) self->lost(Error(ErrorCode::communication, fmt::format("server {}: {}", self->name, err)), true);
      });
      read_header();
    }

    void pump() {
      if (writing || state != State::ready) return;
      while (!queue.empty() && queue.front()->completed) queue.pop_front();
      if (queue.empty()) return;
      auto r = queue.front();
      queue.pop_front();
      r->sent = true;
      writing = true;
      const int gen = generation;
      auto self = shared_from_this();
      stream->write(r->frame.data(), r->frame.size(), [self, gen, r](const std::string& err, std::size_t n) {
        if (gen != self->generation) return;
        self->writing = false;
        self->cl->n_sent += n;
        if (!err.empty()) {
          self->lost(Error(ErrorCode::communication, fmt::format("connection to server {} lost: {}", self->name, err)), false);
          return;
        }
        self->pump();
      });
    }

    void read_header() {
      const int gen = generation;
      auto self = shared_from_this();
      stream->read(hbuf.data(), hbuf.size(), [self, gen](const std::string& err, std::size_t n) {
        if (gen != self->generation) return;
        if (!err.empty()) {
          self->lost(Error(ErrorCode::communication, fmt::format("connection to server {} lost: {}", self->name, err)),
                     self->state != State::ready);
          return;
        }
        self->cl->n_received += n;
        FrameHeader h;
        try {
          h = decode_header(self->hbuf, client_limits());
          if (!(h.flags & kFlagResponse)) throw Error(ErrorCode::protocol, "the server sent a request frame");
        } catch (const Error& e) {
          self->lost(Error(ErrorCode::protocol, fmt::format("server {}: {}", self->name, e.what())), false, false);
          return;
        }
        self->rbuf.resize(h.payload_bytes);
        if (h.payload_bytes == 0) {
          self->on_reply(h);
          return;
        }
        self->stream->read(self->rbuf.data(), self->rbuf.size(), [self, gen, h](const std::string& err2, std::size_t n2) {
          if (gen != self->generation) return;
          if (!err2.empty()) {
            self->lost(Error(ErrorCode::communication, fmt::format("connection to server {} lost: {}", self->name, err2)), false);
            return;
          }
          self->cl->n_received += n2;
          self->on_reply(h);
        });
      });
    }

    void on_reply(const FrameHeader& h) {
      if (h.request_id == hello_id && state == State::handshaking) {
        if (h.type == MsgType::error) {
          ErrorReply er;
          try {
            er = decode_error(rbuf, client_limits());
          } catch (const Error& e) {
            er = {ErrorCode::protocol, e.what()};
          }
          // A refused token is permanent: fail everything, no retries.
          lost(Error(er.code, fmt::format("server {} refused the connection: {}", name, er.message)), false, false);
          return;
        }
        state = State::ready;
        connect_failures = 0;
        read_header();
        pump();
        return;
      }
      auto it = pending.find(h.request_id);
      if (it != pending.end()) {
        auto r = it->second;
        if (h.type == MsgType::error) {
          ErrorReply er;
          try {
            er = decode_error(rbuf, client_limits());
          } catch (const Error& e) {
            er = {ErrorCode::protocol, e.what()};
          }
          complete(*r, Error(er.code, fmt::format("server {}: {}", name, er.message)));
        } else if (h.type != r->type) {
          complete(*r, Error(ErrorCode::protocol, fmt::format("server {} answered a {} request with {}", name, to_string(r->type), to_string(h.type))));
        } else {
          finish(*r, nullptr, rbuf);
        }
      }  // else: the answer to a request that already timed out
      read_header();
    }

    // The connection is gone (or never came): close, fail what cannot be retried, requeue the
    // rest and reconnect after a short backoff.
    void lost(const Error& why, bool connecting, bool retryable = true) {
      ++generation;
      if (stream) stream->close();
      writing = false;
      state = State::idle;
      if (connecting) ++connect_failures;
      std::vector<std::shared_ptr<Request>> keep;
      std::vector<std::shared_ptr<Request>> all;
      for (auto& [id, r] : pending) all.push_back(r);
      for (auto& r : all) {
        if (r->completed) continue;
        const bool may = retryable && Clock::now() < r->deadline && (r->idempotent || !r->sent);
        // A refused connection consumes an attempt of every request; a lost one only of those sent.
        const bool costs = connecting || r->sent;
        if (may && (!costs || r->attempts_left > 0)) {
          if (costs) {
            --r->attempts_left;
            cl->n_retries++;
          }
          r->sent = false;
          keep.push_back(r);
        } else {
          complete(*r, why);
        }
      }
      queue.assign(keep.begin(), keep.end());
      std::sort(queue.begin(), queue.end(), [](const auto& a, const auto& b) { return a->id < b->id; });
      if (queue.empty()) return;
      logger(Subsystem::offload).debug("server {}: {}; retrying {} request(s)", name, why.what(), queue.size());
      backoff.expires_after(std::chrono::milliseconds(std::min(50 * (1 << std::min(connect_failures, 4)), 500)));
      const int gen = generation;
      auto self = shared_from_this();
      backoff.async_wait([self, gen](boost::system::error_code e) {
        if (e || gen != self->generation || self->state != State::idle) return;
        if (self->pending.empty()) return;
        self->connect();
      });
    }

    void shutdown(const Error& why) {
      ++generation;
      if (stream) stream->close();
      backoff.cancel();
      std::vector<std::shared_ptr<Request>> all;
      for (auto& [id, r] : pending) all.push_back(r);
      for (auto& r : all) complete(*r, why);
      queue.clear();
    }
  };
  std::vector<std::shared_ptr<Conn>> conns;
  std::unique_ptr<UcxClientEngine> ucx;  // only with transport "ucx"

  std::unique_ptr<ByteStream> make_stream() {
    if (ucx) return ucx->stream();
    return std::make_unique<TcpStream>(io);
  }

  explicit Impl(ClientOptions o) : opt(std::move(o)) {
    LONGATTN_INVALID(!opt.servers.empty(), "offload client: no servers given");
    LONGATTN_INVALID(!opt.token.empty(), "offload client: no token given (the servers refuse unauthenticated clients)");
    LONGATTN_INVALID(opt.timeout.count() > 0, "offload client: the timeout must be positive");
    LONGATTN_INVALID(opt.retries >= 0 && opt.retries <= 100, "offload client: retries {} outside [0, 100]", opt.retries);
    LONGATTN_INVALID(opt.shard_tokens >= 0, "offload client: shard_tokens must be >= 0");
    LONGATTN_INVALID(opt.transport == "tcp" || opt.transport == "ucx", "offload client: transport must be tcp or ucx, got '{}'",
                     opt.transport);
    LONGATTN_REQUIRE(opt.transport == "tcp" || ucx_available(), ErrorCode::unsupported,
                     "offload client: transport 'ucx' is not available in this build (built without UCX); use tcp");
    if (opt.client_id == 0) {
      std::random_device rd;
      opt.client_id = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^ 1;
    }
    for (std::size_t i = 0; i < opt.servers.size(); ++i) conns.push_back(std::make_shared<Conn>(this, static_cast<int>(i), opt.servers[i]));
    work = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(io.get_executor());
    thread = std::thread([this] { io.run(); });
    if (opt.transport == "ucx") ucx = make_ucx_client([this](std::function<void()> fn) { asio::post(io, std::move(fn)); });
  }

  ~Impl() {
    std::promise<void> done;
    asio::post(io, [this, &done] {
      for (auto& c : conns) {
        c->shutdown(Error(ErrorCode::communication, "the offload client was destroyed"));
        c->stream.reset();  // before the UCX engine goes
      }
      done.set_value();
    });
    done.get_future().wait();
    ucx.reset();  // its worker thread stops; completions it still posts are dropped with the io_context
    work.reset();
    io.stop();
    thread.join();
  }

  // Sends one request to server `s`; `done` runs on the I/O thread.
  void send(int s, MsgType t, std::span<const std::byte> payload, bool idempotent, Done done) {
    send_frame(s, t, [&](std::uint64_t id) { return frame(t, 0, id, payload); }, idempotent, std::move(done));
  }
  // The same with the frame built by `build(request id)` (bulk appends write theirs in one pass).
  template <class Build>
  void send_frame(int s, MsgType t, Build&& build, bool idempotent, Done done) {
    auto r = std::make_shared<Request>();
    r->id = next_id++;
    r->type = t;
    r->frame = build(r->id);
    r->idempotent = idempotent;
    r->attempts_left = opt.retries;
    r->deadline = Clock::now() + opt.timeout;
    r->done = std::move(done);
    n_requests++;
    auto c = conns[static_cast<std::size_t>(s)];
    asio::post(io, [c, r] { c->submit(r); });
  }

  int server_of(const SeqState& st, std::uint64_t shard) const {
    return static_cast<int>((static_cast<std::uint64_t>(st.home) + shard) % conns.size());
  }

  // Sends an open for shard `k` unless done; caller holds mu.
  template <class J>
  void ensure_open(SeqState& st, std::uint64_t k, const std::shared_ptr<J>& join) {
    if (st.opened.count(k)) return;
    st.opened.insert(k);
    Open m;
    m.seq = server_seq_id(st.spec.id, k);
    m.layers = static_cast<std::uint32_t>(st.spec.layers);
    m.kv_heads = static_cast<std::uint32_t>(st.spec.kv_heads);
    m.head_dim = static_cast<std::uint32_t>(st.spec.head_dim);
    m.dtype = st.spec.dtype;
    m.kv_start = static_cast<std::int64_t>(k) * opt.shard_tokens;
    join->left++;
    const auto seq = st.spec.id;
    send(server_of(st, k), MsgType::open, encode(m), true, [this, join, seq](const Error* e, std::vector<std::byte>&) {
      if (e) {
        mark_broken(seq);
        join->fail(*e);
      }
      join->part_done();
    });
  }

  void mark_broken(std::uint64_t seq) {
    std::lock_guard lock(mu);
    auto it = seqs.find(seq);
    if (it != seqs.end()) it->second.broken = true;
  }
};

Client::Client(ClientOptions opt) : impl_(std::make_unique<Impl>(std::move(opt))) {}
Client::~Client() = default;

std::future<void> Client::open(const SequenceSpec& spec) {
  auto& I = *impl_;
  LONGATTN_INVALID(spec.id < kMaxSeqId, "sequence id {} is too large (ids must be < 2^48)", spec.id);
  LONGATTN_INVALID(spec.layers >= 1 && spec.kv_heads >= 1 && spec.head_dim >= 1 && spec.head_dim <= 512,
                   "sequence {}: layers, kv_heads and head_dim must be positive (head_dim <= 512)", spec.id);
  auto join = std::make_shared<Join<void>>();
  join->finish = [](std::promise<void>& p) { p.set_value(); };
  auto fut = join->promise.get_future();
  std::lock_guard lock(I.mu);
  auto [it, fresh] = I.seqs.try_emplace(spec.id);
  auto& st = it->second;
  if (!fresh) {
    const auto& s = st.spec;
    LONGATTN_INVALID(s.layers == spec.layers && s.kv_heads == spec.kv_heads && s.head_dim == spec.head_dim && s.dtype == spec.dtype,
                     "sequence {} is already open with another geometry; drop it first", spec.id);
  } else {
    st.spec = spec;
    st.len.assign(static_cast<std::size_t>(spec.layers), 0);
    st.home = static_cast<int>(spec.id % I.conns.size());
  }
  join->left++;  // guard: finish only after every part was sent
  I.ensure_open(st, 0, join);
  join->part_done();
  return fut;
}

std::future<void> Client::append(std::uint64_t seq, int layer, const void* k, const void* v, std::int64_t tokens) {
  auto& I = *impl_;
  auto join = std::make_shared<Join<void>>();
  join->finish = [](std::promise<void>& p) { p.set_value(); };
  auto fut = join->promise.get_future();
  std::lock_guard lock(I.mu);
  auto it = I.seqs.find(seq);
  LONGATTN_INVALID(it != I.seqs.end(), "append: sequence {} was not opened by this client", seq);
  auto& st = it->second;
  LONGATTN_REQUIRE(!st.broken, ErrorCode::communication,
                   "sequence {} is in an unknown state after a failed request; drop it and open it again", seq);
  LONGATTN_INVALID(layer >= 0 && layer < st.spec.layers, "append: layer {} outside [0, {})", layer, st.spec.layers);
  LONGATTN_INVALID(tokens > 0 && k && v, "append: needs tokens > 0 and k, v");
  const std::size_t row = static_cast<std::size_t>(st.spec.kv_heads) * st.spec.head_dim * dtype_size(st.spec.dtype);
  std::int64_t& L = st.len[static_cast<std::size_t>(layer)];
  const std::int64_t S = I.opt.shard_tokens;
  join->left++;
  for (std::int64_t done = 0; done < tokens;) {
    const std::int64_t abs = L + done;
    const std::uint64_t shard = S > 0 ? static_cast<std::uint64_t>(abs / S) : 0;
    LONGATTN_INVALID(shard < (std::uint64_t{1} << kShardBits), "append: sequence {} needs more than 65536 shards; raise shard_tokens", seq);
    std::int64_t n = tokens - done;
    if (S > 0) n = std::min(n, (static_cast<std::int64_t>(shard) + 1) * S - abs);
    // Frames stay well under the 256 MiB default limit: split bulk prefills.
    n = std::min<std::int64_t>(n, std::max<std::int64_t>(1, static_cast<std::int64_t>((64u << 20) / (2 * row))));
    I.ensure_open(st, shard, join);
    Append m;
    m.seq = server_seq_id(seq, shard);
    m.layer = static_cast<std::uint32_t>(layer);
    m.tokens = static_cast<std::uint32_t>(n);
    m.start = abs - static_cast<std::int64_t>(shard) * S;
    m.kv_heads = static_cast<std::uint32_t>(st.spec.kv_heads);
    m.head_dim = static_cast<std::uint32_t>(st.spec.head_dim);
    m.dtype = st.spec.dtype;
    m.k = std::span(static_cast<const std::byte*>(k) + static_cast<std::size_t>(done) * row, static_cast<std::size_t>(n) * row);
    m.v = std::span(static_cast<const std::byte*>(v) + static_cast<std::size_t>(done) * row, static_cast<std::size_t>(n) * row);
    join->left++;
    Impl* ip = &I;
    I.send_frame(I.server_of(st, shard), MsgType::append, [&m](std::uint64_t id) { return append_frame(id, m); }, false,
                 [ip, join, seq](const Error* e, std::vector<std::byte>&) {
      if (e) {
        ip->mark_broken(seq);
        join->fail(*e);
      }
      join->part_done();
    });
    done += n;
  }
  L += tokens;
  join->part_done();
  return fut;
}

std::future<void> Client::attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q, float* o,
                                 float* lse) {
  auto& I = *impl_;
  LONGATTN_INVALID(!queries.empty() && q && o && lse, "attend: needs queries, q, o and lse");
  LONGATTN_INVALID(q_heads >= 1 && head_dim >= 1, "attend: q_heads and head_dim must be positive");
  const std::size_t nserv = I.conns.size();
  // Per server: the request being built and, per entry, where its rows go in the caller's output.
  struct Entry {
    std::int64_t row0;  // first query row in the caller's batch
    int rows;
  };
  struct Part {
    Attend m;
    std::vector<float> q;
    std::vector<Entry> entries;
    std::vector<std::byte> reply;
  };
  std::vector<Part> parts(nserv);
  std::int64_t total_q = 0;
  bool positions = false;
  for (const auto& dq : queries) {
    LONGATTN_INVALID(dq.q_count >= 1 && dq.q_count <= 256, "attend: q_count {} outside [1, 256]", dq.q_count);
    total_q += dq.q_count;
    positions |= dq.q_count > 1;
  }
  const std::size_t qrow = static_cast<std::size_t>(q_heads) * head_dim;
  {
    std::lock_guard lock(I.mu);
    std::int64_t row = 0;
    for (const auto& dq : queries) {
      auto it = I.seqs.find(dq.seq);
      LONGATTN_INVALID(it != I.seqs.end(), "attend: sequence {} was not opened by this client", dq.seq);
      const auto& st = it->second;
      LONGATTN_REQUIRE(!st.broken, ErrorCode::communication,
                       "sequence {} is in an unknown state after a failed request; drop it and open it again", dq.seq);
      LONGATTN_INVALID(layer >= 0 && layer < st.spec.layers, "attend: layer {} outside [0, {})", layer, st.spec.layers);
      LONGATTN_INVALID(head_dim == st.spec.head_dim && q_heads % st.spec.kv_heads == 0,
                       "attend: {} heads x {} do not fit sequence {} ({} kv heads x {})", q_heads, head_dim, dq.seq, st.spec.kv_heads,
                       st.spec.head_dim);
      const std::int64_t len = st.len[static_cast<std::size_t>(layer)];
      const std::int64_t S = I.opt.shard_tokens;
      const std::uint64_t shards = S > 0 ? std::max<std::uint64_t>(1, static_cast<std::uint64_t>((len + S - 1) / S)) : 1;
      for (std::uint64_t k = 0; k < shards; ++k) {
        auto& p = parts[static_cast<std::size_t>(I.server_of(st, k))];
        const std::int64_t local = S > 0 ? std::clamp<std::int64_t>(len - static_cast<std::int64_t>(k) * S, 0, S) : len;
        p.m.seqs.push_back({server_seq_id(dq.seq, k), static_cast<std::uint32_t>(dq.q_count), local});
        p.entries.push_back({row, dq.q_count});
        p.q.insert(p.q.end(), q + static_cast<std::size_t>(row) * qrow, q + static_cast<std::size_t>(row + dq.q_count) * qrow);
        for (int j = 0; j < dq.q_count; ++j) p.m.positions.push_back(len - dq.q_count + j);
        p.m.total_q += static_cast<std::uint64_t>(dq.q_count);
      }
      row += dq.q_count;
    }
  }

  auto shared = std::make_shared<std::vector<Part>>(std::move(parts));
  auto join = std::make_shared<Join<void>>();
  auto fut = join->promise.get_future();
  join->finish = [shared, o, lse, total_q, q_heads, head_dim](std::promise<void>& pr) {
    // LSE merge of every part's rows into fresh buffers, then one copy to the caller's.
    const std::size_t D = static_cast<std::size_t>(head_dim), H = static_cast<std::size_t>(q_heads);
    std::vector<float> O(static_cast<std::size_t>(total_q) * H * D, 0.0f);
    std::vector<float> LSE(static_cast<std::size_t>(total_q) * H, -std::numeric_limits<float>::infinity());
    for (auto& p : *shared) {
      if (p.entries.empty()) continue;
      const AttendReply r = decode_attend_reply(p.reply, client_limits());
      LONGATTN_REQUIRE(r.total_q == p.m.total_q && r.q_heads == H && r.head_dim == D, ErrorCode::protocol,
                       "a server answered an attend with the wrong shape");
      std::vector<float> po(r.o.size() / 4), pl(r.lse.size() / 4);
      std::memcpy(po.data(), r.o.data(), r.o.size());
      std::memcpy(pl.data(), r.lse.data(), r.lse.size());
      std::int64_t prow = 0;
      for (const auto& e : p.entries) {
        for (int j = 0; j < e.rows; ++j, ++prow) {
          const std::size_t dst = static_cast<std::size_t>(e.row0 + j);
          for (std::size_t h = 0; h < H; ++h) {
            const float l2 = pl[h * r.total_q + static_cast<std::size_t>(prow)];
            float& l1 = LSE[h * static_cast<std::size_t>(total_q) + dst];
            if (l2 == -std::numeric_limits<float>::infinity()) continue;
            const float* o2 = &po[(static_cast<std::size_t>(prow) * H + h) * D];
            float* o1 = &O[(dst * H + h) * D];
            if (l1 == -std::numeric_limits<float>::infinity()) {
              std::memcpy(o1, o2, D * 4);
              l1 = l2;
              continue;
            }
            const float m = std::max(l1, l2);
            const float l = m + std::log(std::exp(l1 - m) + std::exp(l2 - m));
            const float w1 = std::exp(l1 - l), w2 = std::exp(l2 - l);
            for (std::size_t d = 0; d < D; ++d) o1[d] = w1 * o1[d] + w2 * o2[d];
            l1 = l;
          }
        }
      }
    }
    std::memcpy(o, O.data(), O.size() * 4);
    std::memcpy(lse, LSE.data(), LSE.size() * 4);
    pr.set_value();
  };
  join->left = 1;
  for (std::size_t s = 0; s < nserv; ++s) {
    auto& p = (*shared)[s];
    if (p.entries.empty()) continue;
    p.m.layer = static_cast<std::uint32_t>(layer);
    p.m.q_heads = static_cast<std::uint32_t>(q_heads);
    p.m.head_dim = static_cast<std::uint32_t>(head_dim);
    p.m.flags = positions ? kAttendHasPositions : 0;
    p.m.q = std::as_bytes(std::span(p.q));
    join->left++;
    I.send(static_cast<int>(s), MsgType::attend, encode(p.m), true, [shared, s, join](const Error* e, std::vector<std::byte>& payload) {
      if (e) {
        join->fail(*e);
      } else {
        (*shared)[s].reply = std::move(payload);
      }
      join->part_done();
    });
  }
  asio::post(I.io, [join] { join->part_done(); });  // the guard, released on the I/O thread
  return fut;
}

std::future<void> Client::drop(std::uint64_t seq) {
  auto& I = *impl_;
  auto join = std::make_shared<Join<void>>();
  join->finish = [](std::promise<void>& p) { p.set_value(); };
  auto fut = join->promise.get_future();
  std::lock_guard lock(I.mu);
  auto it = I.seqs.find(seq);
  join->left = 1;
  if (it != I.seqs.end()) {
    for (auto k : it->second.opened) {
      join->left++;
      I.send(I.server_of(it->second, k), MsgType::drop, encode(Drop{server_seq_id(seq, k)}), true,
             [join](const Error* e, std::vector<std::byte>&) {
               if (e) join->fail(*e);
               join->part_done();
             });
    }
    I.seqs.erase(it);
  }
  asio::post(I.io, [join] { join->part_done(); });
  return fut;
}

std::future<std::string> Client::server_stats(int server) {
  auto& I = *impl_;
  LONGATTN_INVALID(server >= 0 && static_cast<std::size_t>(server) < I.conns.size(), "server_stats: no server {}", server);
  auto pr = std::make_shared<std::promise<std::string>>();
  auto fut = pr->get_future();
  I.send(server, MsgType::stats, {}, true, [pr](const Error* e, std::vector<std::byte>& payload) {
    if (e) {
      pr->set_exception(std::make_exception_ptr(*e));
    } else {
      pr->set_value(std::string(reinterpret_cast<const char*>(payload.data()), payload.size()));
    }
  });
  return fut;
}

ClientStats Client::stats() const {
  const auto& I = *impl_;
  return {I.n_requests.load(), I.n_retries.load(), I.n_sent.load(), I.n_received.load(), I.n_errors.load()};
}

// ---- LocalEngine ----
struct LocalEngine::Impl {
  KvStore store;
  int threads;
  std::map<std::uint64_t, std::vector<std::int64_t>> len;
  std::map<std::uint64_t, SequenceSpec> specs;
  Impl(std::size_t limit, int t) : store(KvStoreOptions{limit, 0, 64}), threads(t) {}
};

LocalEngine::LocalEngine(std::size_t memory_limit, int threads) : impl_(std::make_unique<Impl>(memory_limit, threads)) {}
LocalEngine::~LocalEngine() = default;

void LocalEngine::open(const SequenceSpec& spec) {
  Open m;
  m.seq = spec.id;
  m.layers = static_cast<std::uint32_t>(spec.layers);
  m.kv_heads = static_cast<std::uint32_t>(spec.kv_heads);
  m.head_dim = static_cast<std::uint32_t>(spec.head_dim);
  m.dtype = spec.dtype;
  impl_->store.open(0, m);
  impl_->len.try_emplace(spec.id, static_cast<std::size_t>(spec.layers), 0);
  impl_->specs[spec.id] = spec;
}

void LocalEngine::append(std::uint64_t seq, int layer, const void* k, const void* v, std::int64_t tokens) {
  auto it = impl_->specs.find(seq);
  LONGATTN_INVALID(it != impl_->specs.end(), "append: sequence {} is not open", seq);
  LONGATTN_INVALID(layer >= 0 && layer < it->second.layers && tokens > 0 && tokens < (std::int64_t{1} << 31), "append: bad layer or tokens");
  const auto& sp = it->second;
  const std::size_t bytes = static_cast<std::size_t>(tokens) * sp.kv_heads * sp.head_dim * dtype_size(sp.dtype);
  Append m;
  m.seq = seq;
  m.layer = static_cast<std::uint32_t>(layer);
  m.tokens = static_cast<std::uint32_t>(tokens);
  m.start = impl_->len[seq][static_cast<std::size_t>(layer)];
  m.kv_heads = static_cast<std::uint32_t>(sp.kv_heads);
  m.head_dim = static_cast<std::uint32_t>(sp.head_dim);
  m.dtype = sp.dtype;
  m.k = std::span(static_cast<const std::byte*>(k), bytes);
  m.v = std::span(static_cast<const std::byte*>(v), bytes);
  impl_->len[seq][static_cast<std::size_t>(layer)] = impl_->store.append(0, m);
}

LocalEngine::Timing LocalEngine::attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q,
                                        float* o, float* lse) {
  Attend m;
  m.layer = static_cast<std::uint32_t>(layer);
  m.q_heads = static_cast<std::uint32_t>(q_heads);
  m.head_dim = static_cast<std::uint32_t>(head_dim);
  bool pos = false;
  for (const auto& dq : queries) {
    auto it = impl_->len.find(dq.seq);
    LONGATTN_INVALID(it != impl_->len.end() && layer >= 0 && static_cast<std::size_t>(layer) < it->second.size(),
                     "attend: sequence {} / layer {} is not open", dq.seq, layer);
    const std::int64_t len = it->second[static_cast<std::size_t>(layer)];
    m.seqs.push_back({dq.seq, static_cast<std::uint32_t>(dq.q_count), len});
    for (int j = 0; j < dq.q_count; ++j) m.positions.push_back(len - dq.q_count + j);
    m.total_q += static_cast<std::uint64_t>(dq.q_count);
    pos |= dq.q_count > 1;
  }
  m.flags = pos ? kAttendHasPositions : 0;
  m.q = std::span(reinterpret_cast<const std::byte*>(q), static_cast<std::size_t>(m.total_q) * q_heads * head_dim * 4);
  const auto st = impl_->store.attend(0, m, o, lse, impl_->threads);
  return {st.kernel_seconds, st.kv_bytes_read};
}

void LocalEngine::drop(std::uint64_t seq) {
  impl_->store.drop(0, seq);
  impl_->len.erase(seq);
  impl_->specs.erase(seq);
}

std::int64_t LocalEngine::length(std::uint64_t seq, int layer) const {
  auto it = impl_->len.find(seq);
  LONGATTN_INVALID(it != impl_->len.end() && layer >= 0 && static_cast<std::size_t>(layer) < it->second.size(), "no sequence {} layer {}",
                   seq, layer);
  return it->second[static_cast<std::size_t>(layer)];
}

}  // namespace longattn::offload
