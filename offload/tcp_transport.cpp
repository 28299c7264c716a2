// The offload server's TCP transport (Boost.Asio), plain or TLS. One strand per connection; a
// connection handles one frame at a time (read header, read payload, answer, read the next), so
// replies come back in request order and a client pipelines simply by sending ahead. Connections
// that have not said hello are kept in accept order, so that the oldest of them make room when too
// many wait. With TLS the handshake comes first, inside the hello timeout.
#include "offload/tcp_transport.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include <fmt/format.h>

#include "longattn/log.hpp"
#include "offload/receive_buffer.hpp"
#include "offload/tcp_listener.hpp"
#include "offload/tls_context.hpp"
#include "offload/tls_stream.hpp"

namespace longattn::offload {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

const Logger& log() { return logger(Subsystem::offload); }

Clock::duration seconds(double s) { return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)); }

class TcpServer;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(TcpServer& server, FrameService& service, tcp::socket socket, asio::ssl::context* tls);

  void start();
  void close();
  void close_abruptly() {
    boost::system::error_code ec;
    stream_.socket().set_option(asio::socket_base::linger(true, 0), ec);  // RST, like a crashed process
    close();
  }
  bool awaiting_hello() const { return !authenticated_; }
  const std::string& peer() const { return session_.peer; }
  asio::any_io_executor executor() { return stream_.get_executor(); }
  // On its strand: closes it if it still has not said hello.
  void evict_before_hello(int limit);

 private:
  void arm(Clock::duration after, double seconds_shown, const char* waiting_for);
  // The hello timeout counts from the accept, TLS handshake included.
  void arm_hello() { arm(std::max(hello_deadline_ - Clock::now(), Clock::duration::zero()), service_.hello_timeout_s(), "hello"); }
  // The frame timeout counts from the frame's first byte, whatever part of it is still missing.
  void arm_frame(const char* waiting_for);
  void read_header();
  bool read_failed(const boost::system::error_code& ec, const char* what);
  void on_header();
  void discard_payload(std::size_t left, const Error& why);
  void send(std::vector<std::byte> bytes, bool then_close);
  void on_frame();

  TcpServer& server_;
  FrameService& service_;
  TcpOrTlsStream stream_;
  asio::steady_timer timer_;
  Clock::time_point hello_deadline_;
  std::array<std::byte, kHeaderBytes> header_bytes_{};
  FrameHeader header_;
  ReceiveBuffer payload_;
  std::vector<std::byte> reply_;
  std::vector<std::byte> discard_;  // pieces of a payload that had no room
  Session session_;
  bool closed_ = false;
  std::atomic<bool> authenticated_{false};  // session_.authed, readable from the accepting thread
  Clock::time_point frame_started_;
};

class TcpServer final : public ServerTransport {
 public:
  TcpServer(asio::io_context& io, const std::string& host, int port, FrameService& service, TcpServerTls tls)
      : io_(io), service_(service), tls_(std::move(tls)), acceptor_(io), pacer_(io, [&service] { service.on_accept_failed(); }) {
    bind_listener(acceptor_, io_, fmt::format("{}:{}", host.find(':') != std::string::npos ? "[" + host + "]" : host, port));
    accept();
  }

  int port() const override { return acceptor_.is_open() ? acceptor_.local_endpoint().port() : 0; }

  void stop_accepting() override {
    // Once: stop() calls this again after draining did, and two io threads closing the acceptor at
    // the same time race inside Asio (UBSan caught a null descriptor in the second close).
    if (accepting_stopped_.exchange(true)) return;
    asio::post(io_, [this] {
      boost::system::error_code ec;
      acceptor_.close(ec);
      pacer_.cancel();
    });
  }

  void stop(bool abrupt) override {
    stop_accepting();
    std::vector<std::shared_ptr<Connection>> all;
    {
      std::lock_guard lock(mu_);
      all.assign(connections_.begin(), connections_.end());
    }
    for (auto& c : all)
      asio::post(c->executor(), [c, abrupt] { abrupt ? c->close_abruptly() : c->close(); });
  }

  void join() override {}  // connections run on the caller's io threads

  void forget(const std::shared_ptr<Connection>& c) {
    std::lock_guard lock(mu_);
    connections_.erase(c);
  }

  // A refused handshake is logged with its reason, but at most one line a second, so that a
  // scanner cannot flood the log; the lines in between are counted in the next one.
  void tls_failed(const std::string& peer, const std::string& reason) {
    if (tls_.on_handshake_failed) tls_.on_handshake_failed();
    std::lock_guard lock(mu_);
    const auto now = Clock::now();
    if (now - tls_logged_ < std::chrono::seconds(1)) {
      tls_unlogged_++;
      return;
    }
    log().warn("connection {}: TLS handshake refused: {}{}", peer, reason,
               tls_unlogged_ ? fmt::format(" ({} more refused since the last line)", tls_unlogged_) : "");
    tls_logged_ = now;
    tls_unlogged_ = 0;
  }

 private:
  void accept() {
    acceptor_.async_accept(asio::make_strand(io_), [this](boost::system::error_code ec, tcp::socket socket) {
      if (ec) {
        if (!acceptor_.is_open() || service_.draining()) return;
        if (out_of_descriptors(ec)) {
          pacer_.failed(ec, [this] {
            if (acceptor_.is_open()) accept();
          });
          return;
        }
        if (ec != asio::error::operation_aborted) log().warn("accept: {}", ec.message());
        accept();
        return;
      }
      pacer_.succeeded();
      if (service_.draining()) return;
      auto c = std::make_shared<Connection>(*this, service_, std::move(socket), tls_.context.get());
      service_.on_connection_opened();
      {
        std::lock_guard lock(mu_);
        make_room_before_hello();
        awaiting_hello_.push_back(c);
        connections_.insert(c);
      }
      asio::post(c->executor(), [c] { c->start(); });
      accept();
    });
  }

  // Closes the oldest connections still before hello until one more fits under the service's
  // limit; under mu_.
  void make_room_before_hello() {
    std::size_t waiting = 0;
    for (auto it = awaiting_hello_.begin(); it != awaiting_hello_.end();) {
      auto c = it->lock();
      if (!c || !c->awaiting_hello()) {
        it = awaiting_hello_.erase(it);
      } else {
        ++waiting;
        ++it;
      }
    }
    const int limit = service_.max_unauthenticated();
    while (waiting >= static_cast<std::size_t>(std::max(1, limit)) && !awaiting_hello_.empty()) {
      auto oldest = awaiting_hello_.front().lock();
      awaiting_hello_.pop_front();
      if (!oldest || !oldest->awaiting_hello()) continue;
      waiting--;
      asio::post(oldest->executor(), [oldest, limit] { oldest->evict_before_hello(limit); });
    }
  }

  asio::io_context& io_;
  FrameService& service_;
  TcpServerTls tls_;
  tcp::acceptor acceptor_;
  std::atomic<bool> accepting_stopped_{false};
  AcceptPacer pacer_;
  std::mutex mu_;
  Clock::time_point tls_logged_{};
  std::uint64_t tls_unlogged_ = 0;
  std::set<std::shared_ptr<Connection>> connections_;
  std::deque<std::weak_ptr<Connection>> awaiting_hello_;  // oldest first
};

Connection::Connection(TcpServer& server, FrameService& service, tcp::socket socket, asio::ssl::context* tls)
    : server_(server),
      service_(service),
      stream_(std::move(socket), tls),
      timer_(stream_.get_executor()),
      hello_deadline_(Clock::now() + seconds(service.hello_timeout_s())),
      payload_(service) {
  boost::system::error_code ec;
  auto ep = stream_.socket().remote_endpoint(ec);
  session_.peer = ec ? "?" : fmt::format("{}:{}", ep.address().to_string(), ep.port());
  stream_.socket().set_option(tcp::no_delay(true), ec);
}

void Connection::start() {
  if (!stream_.is_tls()) {
    read_header();
    return;
  }
  arm_hello();
  stream_.async_handshake(asio::ssl::stream_base::server, [self = shared_from_this()](boost::system::error_code ec) {
    if (self->closed_) return;
    if (ec) {
      if (ec != asio::error::operation_aborted) self->server_.tls_failed(self->session_.peer, describe_tls_failure(ec, self->stream_.ssl(), false));
      self->close();
      return;
    }
    self->read_header();
  });
}

void Connection::evict_before_hello(int limit) {
  if (closed_ || session_.authed) return;
  // debug, not info: a flood of strangers would otherwise be a flood of log lines.
  log().debug("connection {}: closed before hello to make room ({} connections before hello is the limit, --max-unauthenticated)",
             session_.peer, limit);
  close();
}

void Connection::arm(Clock::duration after, double seconds_shown, const char* waiting_for) {
  timer_.expires_after(after);
  timer_.async_wait([self = shared_from_this(), seconds_shown, waiting_for](boost::system::error_code ec) {
    if (ec) return;
    log().warn("connection {}: no {} within {} s; closing", self->session_.peer, waiting_for, seconds_shown);
    self->service_.on_timeout();
    self->close();
  });
}

void Connection::arm_frame(const char* waiting_for) {
  if (!session_.authed) return;  // the hello timeout bounds everything before hello
  const double limit = service_.frame_timeout_s();
  const auto left = frame_started_ + seconds(limit) - Clock::now();
  arm(std::max(left, Clock::duration::zero()), limit, waiting_for);
}

void Connection::close() {
  if (closed_) return;
  closed_ = true;
  boost::system::error_code ec;
  timer_.cancel();
  stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
  stream_.socket().close(ec);
  payload_.release();
  service_.on_connection_closed(session_);
  server_.forget(shared_from_this());
}

// Between frames an authenticated client may idle as long as it likes; once a frame has started
// (its first byte), all of it must arrive within the frame timeout. Before hello, the hello
// timeout bounds everything.
void Connection::read_header() {
  if (closed_) return;
  if (!session_.authed) {
    arm_hello();
  } else {
    timer_.cancel();
  }
  stream_.async_read_some(asio::buffer(header_bytes_), [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
    if (self->read_failed(ec, "")) return;
    self->frame_started_ = Clock::now();
    self->service_.on_bytes(n, 0);
    if (n == self->header_bytes_.size()) {
      self->on_header();
      return;
    }
    self->arm_frame("complete frame header");
    asio::async_read(self->stream_, asio::buffer(self->header_bytes_.data() + n, self->header_bytes_.size() - n),
                     [self](boost::system::error_code ec2, std::size_t n2) {
                       if (self->read_failed(ec2, "header cut short: ")) return;
                       self->service_.on_bytes(n2, 0);
                       self->on_header();
                     });
  });
}

bool Connection::read_failed(const boost::system::error_code& ec, const char* what) {
  if (!ec) return false;
  if (ec != asio::error::eof && ec != asio::error::operation_aborted) log().debug("connection {}: {}{}", session_.peer, what, ec.message());
  close();
  return true;
}

void Connection::on_header() {
  try {
    header_ = decode_header(header_bytes_, service_.limits());
    service_.check_header(session_, header_);
  } catch (const Error& e) {
    send(service_.on_bad_header(session_, e), true);
    return;
  }
  if (header_.payload_bytes == 0) {
    payload_.size_for(0);
    on_frame();
    return;
  }
  arm_frame("complete frame");
  try {
    payload_.size_for(header_.payload_bytes);
  } catch (const Error& e) {
    discard_payload(header_.payload_bytes, e);
    return;
  }
  asio::async_read(stream_, asio::buffer(payload_.bytes()), [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
    if (ec) {
      log().debug("connection {}: frame cut short: {}", self->session_.peer, ec.message());
      self->close();
      return;
    }
    self->service_.on_bytes(n, 0);
    self->timer_.cancel();
    self->on_frame();
  });
}

// A payload the memory limit has no room for is read in small pieces and thrown away, then
// refused; the connection stays in step and usable.
void Connection::discard_payload(std::size_t left, const Error& why) {
  if (left == 0) {
    std::vector<std::byte>().swap(discard_);
    timer_.cancel();
    send(service_.on_discarded_frame(session_, header_, why), false);
    return;
  }
  discard_.resize(std::min(left, kDiscardPieceBytes));
  stream_.async_read_some(asio::buffer(discard_), [self = shared_from_this(), left, why](boost::system::error_code ec, std::size_t n) {
    if (self->read_failed(ec, "frame cut short: ")) return;
    self->service_.on_bytes(n, 0);
    self->discard_payload(left - n, why);
  });
}

void Connection::send(std::vector<std::byte> bytes, bool then_close) {
  reply_ = std::move(bytes);
  asio::async_write(stream_, asio::buffer(reply_), [self = shared_from_this(), then_close](boost::system::error_code ec, std::size_t n) {
    self->service_.on_bytes(0, n);
    if (ec || then_close) {
      self->close();
      return;
    }
    boost::system::error_code e2;
    self->payload_.settle(self->stream_.socket().available(e2) > 0);
    self->read_header();
  });
}

void Connection::on_frame() {
  if (session_.authed) timer_.cancel();
  std::weak_ptr<Connection> weak = shared_from_this();
  service_.on_frame(session_, header_, payload_.bytes(), [weak](std::vector<std::byte> f, bool then_close) {
    auto self = weak.lock();
    if (!self) return;
    asio::post(self->stream_.get_executor(), [self, f = std::move(f), then_close]() mutable {
      if (self->closed_) return;
      if (self->session_.authed) self->timer_.cancel();
      self->send(std::move(f), then_close);
    });
  });
  if (session_.authed) authenticated_ = true;
}

}  // namespace

std::unique_ptr<ServerTransport> make_tcp_server(boost::asio::io_context& io, const std::string& host, int port, FrameService& service,
                                                 TcpServerTls tls) {
  return std::make_unique<TcpServer>(io, host, port, service, std::move(tls));
}

std::unique_ptr<ServerTransport> make_tcp_server(boost::asio::io_context& io, const std::string& host, int port, FrameService& service) {
  return make_tcp_server(io, host, port, service, TcpServerTls{});
}

}  // namespace longattn::offload
