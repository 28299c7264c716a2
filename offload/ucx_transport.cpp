// The UCX transport of the offload protocol: the same frames over UCX's stream API (UCX picks the
// wire: TCP, shared memory, or RDMA where present). Each side runs one UCX worker on a thread of
// its own (UCX workers are single-threaded here); other threads hand it work through a queue and
// an eventfd, and it sleeps in epoll on the worker's event fd when idle.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <netdb.h>
#include <arpa/inet.h>

#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "offload/receive_buffer.hpp"
#include "offload/server.hpp"
#include "offload/transport.hpp"

namespace longattn::offload {

bool ucx_available() noexcept { return true; }

namespace {

std::string status_text(ucs_status_t st) { return ucs_status_string(st); }

// A UCX context + worker + the thread that owns them.
class WorkerThread {
 public:
  WorkerThread() {
    ucp_params_t pp{};
    pp.field_mask = UCP_PARAM_FIELD_FEATURES;
    pp.features = UCP_FEATURE_STREAM | UCP_FEATURE_WAKEUP;
    ucs_status_t st = ucp_init(&pp, nullptr, &ctx_);
    LONGATTN_REQUIRE(st == UCS_OK, ErrorCode::communication, "UCX: ucp_init failed: {}", status_text(st));
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    st = ucp_worker_create(ctx_, &wp, &worker_);
    if (st != UCS_OK) {
      ucp_cleanup(ctx_);
      throw Error(ErrorCode::communication, "UCX: ucp_worker_create failed: " + status_text(st));
    }
    ucp_worker_get_efd(worker_, &efd_);
    wake_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = efd_;
    ::epoll_ctl(ep_, EPOLL_CTL_ADD, efd_, &ev);
    ev.data.fd = wake_;
    ::epoll_ctl(ep_, EPOLL_CTL_ADD, wake_, &ev);
  }
  virtual ~WorkerThread() {
    if (worker_) ucp_worker_destroy(worker_);
    if (ctx_) ucp_cleanup(ctx_);
    if (wake_ >= 0) ::close(wake_);
    if (ep_ >= 0) ::close(ep_);
  }

  void start() { thread_ = std::thread([this] { loop(); }); }
  void run(std::function<void()> fn) {
    {
      std::lock_guard lock(mu_);
      tasks_.push_back(std::move(fn));
    }
    const std::uint64_t one = 1;
    (void)!::write(wake_, &one, sizeof(one));
  }
  void finish() {
    run([this] { quit_ = true; });
    if (thread_.joinable()) thread_.join();
  }
  ucp_worker_h worker() const { return worker_; }

 protected:
  virtual void on_exit() {}  // on the worker thread, before it leaves: close what is open
  virtual void on_tick() {}  // on the worker thread, at least every 100 ms
  bool quit_ = false;

 private:
  void drain() {
    std::deque<std::function<void()>> t;
    {
      std::lock_guard lock(mu_);
      t.swap(tasks_);
    }
    for (auto& fn : t) fn();
  }
  void loop() {
    while (!quit_) {
      while (ucp_worker_progress(worker_) != 0) {
      }
      drain();
      on_tick();
      if (quit_) break;
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      epoll_event evs[2];
      const int n = ::epoll_wait(ep_, evs, 2, 100);
      for (int i = 0; i < n; ++i)
        if (evs[i].data.fd == wake_) {
          std::uint64_t v;
          (void)!::read(wake_, &v, sizeof(v));
        }
    }
    on_exit();
    // Let closes and cancelled requests complete.
    for (int i = 0; i < 20000; ++i) {
      ucp_worker_progress(worker_);
      drain();
    }
  }

  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1, wake_ = -1, ep_ = -1;
  std::thread thread_;
  std::mutex mu_;
  std::deque<std::function<void()>> tasks_;
};

sockaddr_storage resolve(const std::string& host, int port, socklen_t& len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  LONGATTN_REQUIRE(rc == 0 && res, ErrorCode::communication, "UCX: cannot resolve {}: {}", host, gai_strerror(rc));
  sockaddr_storage ss{};
  std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
  len = res->ai_addrlen;
  ::freeaddrinfo(res);
  return ss;
}

int port_of(const sockaddr_storage& ss) {
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port);
  return 0;
}

std::string addr_text(const sockaddr_storage& ss) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (ss.ss_family == AF_INET) ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&ss)->sin_addr, buf, sizeof(buf));
  if (ss.ss_family == AF_INET6) ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_addr, buf, sizeof(buf));
  return fmt::format("{}:{}", buf, port_of(ss));
}

// ------------------------------------------------------------------ server
class UcxServer final : public ServerTransport, public WorkerThread {
 public:
  UcxServer(const std::string& host, int port, FrameService& svc) : svc_(svc) {
    socklen_t len = 0;
    auto ss = resolve(host, port, len);
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
    lp.sockaddr.addrlen = len;
    lp.conn_handler.cb = &UcxServer::on_conn_request;
    lp.conn_handler.arg = this;
    const ucs_status_t st = ucp_listener_create(worker(), &lp, &listener_);
    LONGATTN_REQUIRE(st == UCS_OK, ErrorCode::io, "UCX: cannot listen on {}:{}: {}", host, port, status_text(st));
    ucp_listener_attr_t la{};
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    ucp_listener_query(listener_, &la);
    port_ = port_of(la.sockaddr);
    start();
  }
  ~UcxServer() override {
    stop(true);
    join();
  }
  int port() const override { return port_; }
  void stop_accepting() override {}  // accept() refuses connections once the service drains
  void stop(bool abrupt) override {
    if (stopping_.exchange(true)) return;
    abrupt_ = abrupt;
    run([this] { quit_ = true; });
  }
  void join() override { finish(); }

 private:
  struct Conn {
    explicit Conn(FrameService& svc) : payload(svc) {}
    std::uint64_t id = 0;
    ucp_ep_h ep = nullptr;
    Session session;
    std::array<std::byte, kHeaderBytes> hbuf{};
    FrameHeader h;
    ReceiveBuffer payload;
    std::size_t header_got = 0;  // bytes of the header received so far
    bool in_header = true;
    // A payload the memory limit had no room for: this many bytes are still to be read and thrown
    // away in pieces, then the request is refused with discard_why.
    bool discarding = false;
    std::size_t discard_left = 0;
    std::vector<std::byte> discard;
    ErrorCode discard_code = ErrorCode::out_of_capacity;
    std::string discard_why;
    bool closed = false;
    bool counted = false;  // on_connection_opened was called
    bool lingering = false;  // refused before hello: replied, waits for the peer's close (see send)
    int outstanding = 0;
    std::chrono::steady_clock::time_point opened = std::chrono::steady_clock::now();
    // When the frame being received must be complete (time_point::max() between frames).
    std::chrono::steady_clock::time_point frame_deadline = std::chrono::steady_clock::time_point::max();
  };
  struct SendCtx {
    UcxServer* srv;
    std::uint64_t conn;
    std::vector<std::byte> bytes;
    bool close_after;
  };

  static void on_conn_request(ucp_conn_request_h req, void* arg) { static_cast<UcxServer*>(arg)->accept(req); }
  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t st) {
    auto* key = static_cast<std::pair<UcxServer*, std::uint64_t>*>(arg);
    key->first->lost(key->second, st);
  }
  static void on_recv(void* req, ucs_status_t st, std::size_t length, void* ud) {
    auto* key = static_cast<std::pair<UcxServer*, std::uint64_t>*>(ud);
    ucp_request_free(req);
    if (Conn* c = key->first->find(key->second)) {
      c->outstanding--;
      key->first->recv_done(*c, st, length);
    }
  }
  static void on_send(void* req, ucs_status_t st, void* ud) {
    std::unique_ptr<SendCtx> sc(static_cast<SendCtx*>(ud));
    ucp_request_free(req);
    if (Conn* c = sc->srv->find(sc->conn)) {
      c->outstanding--;
      if (st != UCS_OK || sc->close_after) sc->srv->close(*c, st != UCS_OK);
      sc->srv->reap(sc->conn);
    }
  }

  Conn* find(std::uint64_t id) {
    auto it = conns_.find(id);
    return it == conns_.end() ? nullptr : it->second.get();
  }

  void accept(ucp_conn_request_h req) {
    if (svc_.draining() || stopping_) {
      ucp_listener_reject(listener_, req);
      return;
    }
    auto c = std::make_unique<Conn>(svc_);
    c->id = next_id_++;
    ucp_conn_request_attr_t ra{};
    ra.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
    c->session.peer = ucp_conn_request_query(req, &ra) == UCS_OK ? "ucx:" + addr_text(ra.client_address) : "ucx:?";
    make_room_before_hello();
    keys_[c->id] = {this, c->id};
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.conn_request = req;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &UcxServer::on_ep_error;
    ep.err_handler.arg = &keys_[c->id];
    const ucs_status_t st = ucp_ep_create(worker(), &ep, &c->ep);
    if (st != UCS_OK) {
      logger(Subsystem::offload).warn("UCX: cannot accept a connection: {}", status_text(st));
      keys_.erase(c->id);
      return;
    }
    c->counted = true;
    svc_.on_connection_opened();
    Conn& ref = *c;
    conns_[c->id] = std::move(c);
    read_header(ref);
  }

  // Closes the oldest connections still before hello until one more fits under the service's
  // limit, so strangers can neither take the slots of token holders nor keep them from saying hello.
  void make_room_before_hello() {
    std::size_t waiting = 0;
    for (auto& [id, c] : conns_) waiting += !c->closed && !c->session.authed ? 1 : 0;
    const auto limit = static_cast<std::size_t>(std::max(1, svc_.max_unauthenticated()));
    std::vector<std::uint64_t> evict;
    for (auto it = conns_.begin(); waiting >= limit && it != conns_.end(); ++it) {  // ids grow with accept order
      if (it->second->closed || it->second->session.authed) continue;
      evict.push_back(it->first);
      waiting--;
    }
    for (auto id : evict) {
      Conn* oldest = find(id);
      logger(Subsystem::offload)
          .debug("connection {}: closed before hello to make room ({} connections before hello is the limit, --max-unauthenticated)",
                oldest->session.peer, limit);
      close(*oldest, true);
      reap(id);  // one without a request in flight (replied, waiting for its peer) goes now; others when UCX returns theirs
    }
  }

  // wait_all = false completes on the first bytes, which tells a started frame from an idle link.
  void post_recv(Conn& c, void* buf, std::size_t n, bool wait_all) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    p.cb.recv_stream = &UcxServer::on_recv;
    p.user_data = &keys_[c.id];
    p.flags = wait_all ? UCP_STREAM_RECV_FLAG_WAITALL : 0;
    std::size_t len = 0;
    void* r = ucp_stream_recv_nbx(c.ep, buf, n, &len, &p);
    if (r == nullptr) {
      recv_done(c, UCS_OK, len);
    } else if (UCS_PTR_IS_ERR(r)) {
      close(c, true);
    } else {
      c.outstanding++;
    }
  }

  // Between frames an authenticated client may idle as long as it likes; once a frame has started
  // (its first byte), all of it must arrive within the frame timeout, as on TCP. Before hello, the
  // hello timeout (on_tick) bounds everything.
  void start_frame_clock(Conn& c) {
    if (c.session.authed && c.frame_deadline == std::chrono::steady_clock::time_point::max())
      c.frame_deadline = std::chrono::steady_clock::now() +
                         std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(frame_timeout_s()));
  }

  double frame_timeout_s() const { return svc_.frame_timeout_s(); }

  void read_header(Conn& c) {
    if (c.closed) return;
    c.in_header = true;
    c.header_got = 0;
    c.frame_deadline = std::chrono::steady_clock::time_point::max();
    post_recv(c, c.hbuf.data(), c.hbuf.size(), false);
  }

  void recv_done(Conn& c, ucs_status_t st, std::size_t length) {
    if (c.closed) {
      reap(c.id);
      return;
    }
    if (st != UCS_OK) {
      close(c, true);
      reap(c.id);
      return;
    }
    if (c.discarding) {
      svc_.on_bytes(length, 0);
      c.discard_left -= std::min(length, c.discard_left);
      discard_payload(c);
      return;
    }
    if (c.in_header) {
      svc_.on_bytes(length, 0);
      c.header_got += length;
      if (c.header_got < c.hbuf.size()) {
        start_frame_clock(c);
        post_recv(c, c.hbuf.data() + c.header_got, c.hbuf.size() - c.header_got, true);
        return;
      }
      try {
        c.h = decode_header(c.hbuf, svc_.limits());
        svc_.check_header(c.session, c.h);
      } catch (const Error& e) {
        send(c.id, svc_.on_bad_header(c.session, e), true);
        return;
      }
      try {
        c.payload.size_for(c.h.payload_bytes);
      } catch (const Error& e) {
        c.in_header = false;
        c.discarding = true;
        c.discard_left = c.h.payload_bytes;
        c.discard_code = e.code();
        c.discard_why = e.what();
        start_frame_clock(c);
        discard_payload(c);
        return;
      }
      if (c.h.payload_bytes > 0) {
        c.in_header = false;
        start_frame_clock(c);
        post_recv(c, c.payload.bytes().data(), c.payload.bytes().size(), true);
        return;
      }
    } else {
      svc_.on_bytes(c.payload.bytes().size(), 0);
    }
    c.frame_deadline = std::chrono::steady_clock::time_point::max();
    const std::uint64_t id = c.id;
    svc_.on_frame(c.session, c.h, c.payload.bytes(), [this, id](std::vector<std::byte> f, bool close_after) {
      auto shared = std::make_shared<std::vector<std::byte>>(std::move(f));
      run([this, id, shared, close_after] { send(id, std::move(*shared), close_after); });
    });
  }

  // Reads the rest of a payload that had no room in small pieces, then refuses the request; the
  // connection stays in step and usable.
  void discard_payload(Conn& c) {
    if (c.discard_left == 0) {
      c.discarding = false;
      std::vector<std::byte>().swap(c.discard);
      c.frame_deadline = std::chrono::steady_clock::time_point::max();
      send(c.id, svc_.on_discarded_frame(c.session, c.h, Error(c.discard_code, c.discard_why)), false);
      return;
    }
    c.discard.resize(std::min(c.discard_left, kDiscardPieceBytes));
    post_recv(c, c.discard.data(), c.discard.size(), false);
  }

  // Sends one reply, then reads the next request (one frame at a time, like the TCP path).
  void send(std::uint64_t id, std::vector<std::byte> bytes, bool close_after) {
    Conn* c = find(id);
    if (!c || c->closed) return;
    // A connection refused before it authenticated (wrong token, over the connection limit) is not
    // closed right after its error reply: the peer's UCX endpoint drops data it has not read yet
    // once it learns of the close, so the reply could be lost. Nothing more is read from it; the
    // peer closes it, or the hello timeout does (on_tick).
    if (close_after && !c->session.authed) {
      close_after = false;
      c->lingering = true;
    }
    auto sc = std::make_unique<SendCtx>(SendCtx{this, id, std::move(bytes), close_after});
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &UcxServer::on_send;
    p.user_data = sc.get();
    svc_.on_bytes(0, sc->bytes.size());
    void* r = ucp_stream_send_nbx(c->ep, sc->bytes.data(), sc->bytes.size(), &p);
    if (r == nullptr) {
      if (close_after) {
        close(*c, false);
        reap(id);
        return;
      }
    } else if (UCS_PTR_IS_ERR(r)) {
      close(*c, true);
      reap(id);
      return;
    } else {
      c->outstanding++;
      sc.release();  // freed by on_send
      if (close_after) return;
    }
    if (c->lingering) return;
    c->payload.settle(false);
    read_header(*c);
  }

  void lost(std::uint64_t id, ucs_status_t st) {
    if (Conn* c = find(id)) {
      logger(Subsystem::offload).debug("connection {}: {}", c->session.peer, status_text(st));
      close(*c, true);
      reap(id);
    }
  }

  void close(Conn& c, bool force) {
    if (c.closed) return;
    c.closed = true;
    c.payload.release();
    if (c.counted) svc_.on_connection_closed(c.session);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    void* r = ucp_ep_close_nbx(c.ep, &p);
    if (r != nullptr && !UCS_PTR_IS_ERR(r)) closing_.push_back(r);
  }

  // Frees a closed connection once UCX holds no request of it.
  void reap(std::uint64_t id) {
    Conn* c = find(id);
    if (c && c->closed && c->outstanding == 0) conns_.erase(id);
  }

  // Connections that have not authenticated within the hello timeout, or stall in the middle of a
  // frame past the frame timeout, are closed, as on TCP.
  void on_tick() override {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_tick_ < std::chrono::milliseconds(100)) return;
    last_tick_ = now;
    const auto limit = std::chrono::duration<double>(svc_.hello_timeout_s());
    std::vector<std::pair<std::uint64_t, bool>> late;  // id, whether it is the hello that is late
    for (auto& [id, c] : conns_) {
      if (c->closed) continue;
      if (!c->session.authed && now - c->opened > limit) {
        late.emplace_back(id, true);
      } else if (now > c->frame_deadline) {
        late.emplace_back(id, false);
      }
    }
    for (auto [id, hello] : late)
      if (Conn* c = find(id)) {
        if (hello) {
          logger(Subsystem::offload).warn("connection {}: no hello within {} s; closing", c->session.peer, svc_.hello_timeout_s());
        } else {
          logger(Subsystem::offload).warn("connection {}: no complete frame within {} s; closing", c->session.peer, frame_timeout_s());
        }
        close(*c, true);
        reap(id);
      }
  }

  void on_exit() override {
    if (listener_) ucp_listener_destroy(listener_);
    listener_ = nullptr;
    std::vector<std::uint64_t> ids;  // closing may complete requests whose callbacks reap connections
    for (auto& [id, c] : conns_) ids.push_back(id);
    for (auto id : ids)
      if (Conn* c = find(id)) close(*c, abrupt_);
    for (int i = 0; i < 100000 && !closing_.empty(); ++i) {
      ucp_worker_progress(worker());
      for (auto it = closing_.begin(); it != closing_.end();) {
        if (ucp_request_check_status(*it) != UCS_INPROGRESS) {
          ucp_request_free(*it);
          it = closing_.erase(it);
        } else {
          ++it;
        }
      }
    }
  }

  FrameService& svc_;
  ucp_listener_h listener_ = nullptr;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  bool abrupt_ = false;
  std::uint64_t next_id_ = 1;
  std::map<std::uint64_t, std::unique_ptr<Conn>> conns_;
  std::map<std::uint64_t, std::pair<UcxServer*, std::uint64_t>> keys_;  // stable addresses for UCX callbacks
  std::vector<void*> closing_;
  std::chrono::steady_clock::time_point last_tick_ = std::chrono::steady_clock::now();
};

// ------------------------------------------------------------------ client
class UcxClient;

struct StreamState {
  UcxClient* eng = nullptr;
  ucp_ep_h ep = nullptr;
  bool failed = false;
  std::string why;
};

class UcxClient final : public UcxClientEngine, public WorkerThread {
 public:
  explicit UcxClient(std::function<void(std::function<void()>)> post) : post_(std::move(post)) { start(); }
  ~UcxClient() override { finish(); }
  std::unique_ptr<ByteStream> stream() override;

  void deliver(ByteStream::Handler h, std::string err, std::size_t n) {
    post_([h = std::move(h), err = std::move(err), n] { h(err, n); });
  }
  std::vector<std::shared_ptr<StreamState>> states;  // kept until the engine goes: UCX callbacks point at them

 private:
  void on_exit() override {
    for (auto& s : states) {
      if (!s->ep) continue;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* r = ucp_ep_close_nbx(s->ep, &p);
      s->ep = nullptr;
      if (r && !UCS_PTR_IS_ERR(r)) {
        while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(worker());
        ucp_request_free(r);
      }
    }
  }
  std::function<void(std::function<void()>)> post_;
};

struct OpCtx {
  UcxClient* eng;
  ByteStream::Handler done;
  std::size_t bytes;
};

class UcxStream final : public ByteStream {
 public:
  explicit UcxStream(UcxClient* eng) : eng_(eng), st_(std::make_shared<StreamState>()) {
    st_->eng = eng;
    auto s = st_;
    eng_->run([eng, s] { eng->states.push_back(s); });
  }
  ~UcxStream() override { close(); }

  void connect(const std::string& host, const std::string& port, Handler done) override {
    auto s = st_;
    eng_->run([s, host, port, done = std::move(done)]() mutable {
      try {
        socklen_t len = 0;
        auto ss = resolve(host, std::stoi(port), len);
        ucp_ep_params_t ep{};
        ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER;
        ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
        ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
        ep.sockaddr.addrlen = len;
        ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
        ep.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t st) {
          auto* state = static_cast<StreamState*>(arg);
          state->failed = true;
          state->why = status_text(st);
        };
        ep.err_handler.arg = s.get();
        const ucs_status_t st = ucp_ep_create(s->eng->worker(), &ep, &s->ep);
        if (st != UCS_OK) {
          s->ep = nullptr;
          s->eng->deliver(std::move(done), "UCX connect failed: " + status_text(st), 0);
          return;
        }
        s->eng->deliver(std::move(done), "", 0);
      } catch (const std::exception& e) {
        s->eng->deliver(std::move(done), e.what(), 0);
      }
    });
  }

  void write(const void* data, std::size_t bytes, Handler done) override {
    auto s = st_;
    eng_->run([s, data, bytes, done = std::move(done)]() mutable {
      if (!s->ep || s->failed) {
        s->eng->deliver(std::move(done), "UCX endpoint closed" + (s->why.empty() ? "" : ": " + s->why), 0);
        return;
      }
      auto op = std::make_unique<OpCtx>(OpCtx{s->eng, std::move(done), bytes});
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      p.cb.send = [](void* req, ucs_status_t st, void* ud) {
        std::unique_ptr<OpCtx> o(static_cast<OpCtx*>(ud));
        ucp_request_free(req);
        o->eng->deliver(std::move(o->done), st == UCS_OK ? "" : "UCX send failed: " + status_text(st), st == UCS_OK ? o->bytes : 0);
      };
      p.user_data = op.get();
      void* r = ucp_stream_send_nbx(s->ep, data, bytes, &p);
      if (r == nullptr) {
        s->eng->deliver(std::move(op->done), "", bytes);
      } else if (UCS_PTR_IS_ERR(r)) {
        s->eng->deliver(std::move(op->done), "UCX send failed: " + status_text(UCS_PTR_STATUS(r)), 0);
      } else {
        op.release();
      }
    });
  }

  void read(void* data, std::size_t bytes, Handler done) override {
    auto s = st_;
    eng_->run([s, data, bytes, done = std::move(done)]() mutable {
      if (!s->ep || s->failed) {
        s->eng->deliver(std::move(done), "UCX endpoint closed" + (s->why.empty() ? "" : ": " + s->why), 0);
        return;
      }
      auto op = std::make_unique<OpCtx>(OpCtx{s->eng, std::move(done), bytes});
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
      p.cb.recv_stream = [](void* req, ucs_status_t st, std::size_t, void* ud) {
        std::unique_ptr<OpCtx> o(static_cast<OpCtx*>(ud));
        ucp_request_free(req);
        o->eng->deliver(std::move(o->done), st == UCS_OK ? "" : "UCX receive failed: " + status_text(st), st == UCS_OK ? o->bytes : 0);
      };
      p.user_data = op.get();
      p.flags = UCP_STREAM_RECV_FLAG_WAITALL;
      std::size_t len = 0;
      void* r = ucp_stream_recv_nbx(s->ep, data, bytes, &len, &p);
      if (r == nullptr) {
        s->eng->deliver(std::move(op->done), "", bytes);
      } else if (UCS_PTR_IS_ERR(r)) {
        s->eng->deliver(std::move(op->done), "UCX receive failed: " + status_text(UCS_PTR_STATUS(r)), 0);
      } else {
        op.release();
      }
    });
  }

  void close() override {
    auto s = st_;
    eng_->run([s] {
      if (!s->ep) return;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* r = ucp_ep_close_nbx(s->ep, &p);
      s->ep = nullptr;
      s->failed = true;
      if (r && !UCS_PTR_IS_ERR(r)) {
        while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(s->eng->worker());
        ucp_request_free(r);
      }
    });
  }

 private:
  UcxClient* eng_;
  std::shared_ptr<StreamState> st_;
};

std::unique_ptr<ByteStream> UcxClient::stream() { return std::make_unique<UcxStream>(this); }

}  // namespace

std::unique_ptr<ServerTransport> make_ucx_server(const std::string& host, int port, FrameService& service) {
  return std::make_unique<UcxServer>(host, port, service);
}

std::unique_ptr<UcxClientEngine> make_ucx_client(std::function<void(std::function<void()>)> post) {
  return std::make_unique<UcxClient>(std::move(post));
}

}  // namespace longattn::offload
