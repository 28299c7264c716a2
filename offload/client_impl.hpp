// The offload client's state (Client::Impl), shared by the two files that work on it: client.cpp
// (connections, requests, retries, replicated writes and failover reads) and client_refill.cpp
// (a replica that failed gets its copies back). Internal to the offload library: only those two
// include it.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>

#include "longattn/offload_client.hpp"
#include "offload/attend_plan.hpp"
#include "offload/protocol.hpp"
#include "offload/replica_set.hpp"
#include "offload/transport.hpp"

namespace longattn::offload {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;

// Replies answer this client's own requests: no payload limit but the 32-bit length field.
inline Limits client_limits() {
  Limits l;
  l.max_payload = 0xffffffffu;
  return l;
}

struct Client::Impl {
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

  ClientOptions opt;
  asio::io_context io;
  std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::thread thread;
  std::promise<void> io_done;  // set when io.run() returns
  std::future<void> io_drained;
  std::atomic<std::uint64_t> next_id{1};
  std::atomic<std::uint64_t> n_requests{0}, n_retries{0}, n_sent{0}, n_received{0}, n_errors{0};

  struct SeqState {
    SequenceSpec spec;
    std::vector<std::int64_t> layer_lengths;  // tokens per layer, as the client has sent them
    std::set<std::uint64_t> opened_shards;
    bool broken = false;
    int home = 0;  // server of shard 0
  };
  ShardLayout layout;
  std::mutex seqs_mutex;
  std::map<std::uint64_t, SeqState> seqs;  // guarded by seqs_mutex

  // One server's connection; its state is touched on the I/O thread only (client.cpp).
  struct Conn : std::enable_shared_from_this<Conn> {
    Impl* client;
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
    std::array<std::byte, kHeaderBytes> header_bytes{};  // of the frame being read
    std::vector<std::byte> payload_bytes;                // of the frame being read
    int generation = 0;
    int connect_failures = 0;
    std::uint32_t peer_version = 0;  // from the hello reply; 0 until one came

    Conn(Impl* owner, int i, const std::string& where);
    void submit(std::shared_ptr<Request> r);
    void complete(Request& r, const Error& e);
    void finish(Request& r, const Error* e, std::vector<std::byte>& payload);
    void connect();
    void handshake();
    void pump();
    void read_header();
    void on_reply(const FrameHeader& h);
    void lost(const Error& why, bool connecting, bool retryable = true);
    void shutdown(const Error& why);
  };
  std::vector<std::shared_ptr<Conn>> conns;
  std::unique_ptr<UcxClientEngine> ucx;  // only with transport "ucx"
  std::shared_ptr<asio::ssl::context> tls;  // only with tls.enabled
  std::unique_ptr<ReplicaSet> replicas;

  explicit Impl(ClientOptions o);
  ~Impl();

  // Requests, replicated writes and failover reads: client.cpp.
  std::unique_ptr<ByteStream> make_stream();
  void send(int s, MsgType t, std::span<const std::byte> payload, bool idempotent, Done done);
  template <class Build>
  void send_frame(int s, MsgType t, Build&& build, bool idempotent, Done done);
  template <class Build>
  void send_replicated(int primary, MsgType t, Build&& build, bool idempotent, std::function<void(const Error*)> outcome);
  Error every_copy_failed(int primary, const Error& last) const;
  void copy_failed(int server, const Error& why);
  void send_attend(int primary, std::shared_ptr<const std::vector<std::byte>> request, Done done);
  int server_of(const SeqState& st, std::uint64_t shard) const { return layout.server_of(st.home, shard); }
  Open open_message(const SeqState& st, std::uint64_t k) const;
  template <class J>
  void ensure_open(SeqState& st, std::uint64_t k, const std::shared_ptr<J>& join);
  void mark_broken(std::uint64_t seq);

  // Refill (replicas > 1): client_refill.cpp.
  struct RefillPiece {
    std::uint64_t seq = 0, shard = 0;
    int primary = 0;
    Open open;
    std::vector<std::int64_t> target;  // tokens per layer to copy
    bool opened = false;
    std::size_t layer = 0;
    std::int64_t done = 0;  // of `layer`
  };
  struct RefillRun {
    int server = 0;
    std::vector<RefillPiece> pieces;
    std::size_t next = 0;
    std::uint64_t tokens_copied = 0;
    bool ended = false;
    std::vector<std::shared_ptr<std::promise<void>>> waiters;
  };
  struct BackloggedWrite {
    MsgType type = MsgType::append;
    std::vector<std::byte> frame;
    bool idempotent = false;
  };
  // Per server: guarded by seqs_mutex.
  std::vector<std::vector<BackloggedWrite>> backlog;
  std::vector<std::size_t> backlog_bytes;
  // Per server: I/O thread only.
  std::vector<std::unique_ptr<asio::steady_timer>> probes;
  std::vector<std::shared_ptr<RefillRun>> refills;
  std::vector<int> refill_failures;  // in a row, per server
  bool stopping = false;  // I/O thread only
  std::atomic<std::uint64_t> n_refills{0};

  void backlog_write(int server, MsgType t, std::vector<std::byte> frame, bool idempotent);  // caller holds seqs_mutex
  void drop_backlog(int server);  // caller holds seqs_mutex
  void send_built(int server, BackloggedWrite w, Done done);
  void schedule_probe(int server);
  void start_refill(int server, std::shared_ptr<std::promise<void>> waiter);
  void refill_step(const std::shared_ptr<RefillRun>& run);
  void refill_copy(const std::shared_ptr<RefillRun>& run, int source, const Export& req, const Error* e, std::vector<std::byte>& payload);
  void refill_done(const std::shared_ptr<RefillRun>& run);
  void refill_failed(int server, const Error& why);
  void stop_refills();
};

// Sends one request to server `s`, with the frame built by `build(request id)` (bulk appends
// write theirs in one pass); `done` runs on the I/O thread.
template <class Build>
void Client::Impl::send_frame(int s, MsgType t, Build&& build, bool idempotent, Done done) {
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

}  // namespace longattn::offload
