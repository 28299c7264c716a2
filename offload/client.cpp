// The offload client (include/longattn/offload_client.hpp): connections, requests, retries.
// Where sequences live and how an attend is split and joined: attend_plan.cpp; the TCP stream:
// tcp_byte_stream.cpp; the in-process LocalEngine: local_engine.cpp; the client's state, which
// the refill shares: client_impl.hpp.
// One I/O thread runs every connection of a client, so connection state needs no locks; the
// public calls only encode (copying the caller's data), register, and post to that thread.
// Per server connection: requests are written in order and answered in order; each has its own
// deadline timer. A lost connection fails or requeues its requests (requeue only for idempotent
// ones, or ones never written) and reconnects with a short backoff while any remain. With
// replicas, a server that failed is probed and refilled from the complete copies
// (client_refill.cpp) before it takes reads again.
#include "offload/client_impl.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "offload/attend_plan.hpp"
#include "offload/protocol.hpp"
#include "offload/replica_set.hpp"
#include "offload/server.hpp"  // parse_host_port
#include "offload/tcp_byte_stream.hpp"
#include "offload/tls_context.hpp"
#include "offload/transport.hpp"

namespace longattn::offload {

namespace {

// How long the destructor waits for cancelled operations to deliver their completions; only a
// resolver blocked in the system's name lookup can take longer.
constexpr std::chrono::milliseconds kShutdownDrainLimit{5000};

// A server's error reply; one that cannot be decoded is itself a protocol error.
ErrorReply error_reply_in(const std::vector<std::byte>& payload) {
  try {
    return decode_error(payload, client_limits());
  } catch (const Error& e) {
    return {ErrorCode::protocol, e.what()};
  }
}

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

// The join of a (append_)attend's per-server requests: when all answered, merges the replies into
// buffers of its own first and writes the caller's o and lse only on success.
std::shared_ptr<Join<void>> attend_join(std::shared_ptr<AttendPlan> plan, std::shared_ptr<std::vector<std::vector<std::byte>>> replies,
                                        float* o, float* lse, Clock::time_point* answered_at) {
  auto join = std::make_shared<Join<void>>();
  join->finish = [plan, replies, o, lse, answered_at](std::promise<void>& pr) {
    std::vector<AttendReply> decoded(plan->servers.size());
    for (std::size_t s = 0; s < plan->servers.size(); ++s)
      if (plan->servers[s].asked()) decoded[s] = decode_attend_reply((*replies)[s], client_limits());
    const std::size_t rows = static_cast<std::size_t>(plan->total_q) * static_cast<std::size_t>(plan->q_heads);
    std::vector<float> merged_o(rows * static_cast<std::size_t>(plan->head_dim)), merged_lse(rows);
    merge_attend_replies(*plan, decoded, merged_o.data(), merged_lse.data());
    std::memcpy(o, merged_o.data(), merged_o.size() * sizeof(float));
    std::memcpy(lse, merged_lse.data(), merged_lse.size() * sizeof(float));
    if (answered_at) *answered_at = Clock::now();
    pr.set_value();
  };
  return join;
}

// A join for a request with no value: the future is ready when every part is done.
std::pair<std::shared_ptr<Join<void>>, std::future<void>> void_join() {
  auto join = std::make_shared<Join<void>>();
  join->finish = [](std::promise<void>& p) { p.set_value(); };
  auto fut = join->promise.get_future();
  return {std::move(join), std::move(fut)};
}

}  // namespace

Client::Impl::Conn::Conn(Impl* owner, int i, const std::string& where)
    : client(owner), index(i), name(where), backoff(owner->io) {
  const auto [h, p] = parse_host_port(where);
  host = h;
  port = std::to_string(p);
}

void Client::Impl::Conn::submit(std::shared_ptr<Request> r) {
  r->timer = std::make_unique<asio::steady_timer>(client->io);
  r->timer->expires_at(r->deadline);
  std::weak_ptr<Request> w = r;
  auto self = shared_from_this();
  r->timer->async_wait([self, w](boost::system::error_code ec) {
    if (ec) return;
    if (auto rq = w.lock()) {
      // No hello reply at all usually means the port speaks something else: say which transport was tried.
      const std::string hint =
          self->state == State::ready
              ? ""
              : fmt::format("; it never answered this connection's hello over {}: check that it is a longattn offload server "
                            "started with --transport {} (a server on the other transport does not answer)",
                            self->client->opt.transport, self->client->opt.transport);
      self->complete(*rq, Error(ErrorCode::timeout, fmt::format("server {} did not answer a {} request within {} ms{}", self->name,
                                                                to_string(rq->type), self->client->opt.timeout.count(), hint)));
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

void Client::Impl::Conn::complete(Request& r, const Error& e) {
  std::vector<std::byte> none;
  finish(r, &e, none);
}

void Client::Impl::Conn::finish(Request& r, const Error* e, std::vector<std::byte>& payload) {
  if (r.completed) return;
  r.completed = true;
  if (r.timer) r.timer->cancel();
  auto keep = pending[r.id];  // `r` may be owned only by the map
  pending.erase(r.id);
  if (e) client->n_errors++;
  r.done(e, payload);
}

void Client::Impl::Conn::connect() {
  state = State::connecting;
  const int gen = generation;
  auto self = shared_from_this();
  stream = client->make_stream();
  stream->connect(host, port, [self, gen](const std::string& err, std::size_t) {
    if (gen != self->generation) return;
    if (!err.empty()) {
      self->lost(Error(ErrorCode::communication, fmt::format("cannot connect to server {}: {}", self->name, err)), true,
                 !is_tls_failure(err));
      return;
    }
    self->handshake();
  });
}

void Client::Impl::Conn::handshake() {
  state = State::handshaking;
  hello_id = client->next_id++;
  hello_frame = frame(MsgType::hello, 0, hello_id, encode(Hello{client->opt.token, client->opt.client_id}));
  const int gen = generation;
  auto self = shared_from_this();
  stream->write(hello_frame.data(), hello_frame.size(), [self, gen](const std::string& err, std::size_t n) {
    if (gen != self->generation) return;
    self->client->n_sent += n;
    if (!err.empty()) self->lost(Error(ErrorCode::communication, fmt::format("server {}: {}", self->name, err)), true);
  });
  read_header();
}

void Client::Impl::Conn::pump() {
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
    self->client->n_sent += n;
    if (!err.empty()) {
      self->lost(Error(ErrorCode::communication, fmt::format("connection to server {} lost: {}", self->name, err)), false);
      return;
    }
    self->pump();
  });
}

void Client::Impl::Conn::read_header() {
  const int gen = generation;
  auto self = shared_from_this();
  stream->read(header_bytes.data(), header_bytes.size(), [self, gen](const std::string& err, std::size_t n) {
    if (gen != self->generation) return;
    if (!err.empty()) {
      // A TLS error while the hello is answered is the server refusing this client's certificate;
      // a plain client's hello closed unanswered is often a TLS server refusing the handshake.
      const bool in_hello = self->state == State::handshaking;
      const std::string hint = in_hello && !self->client->tls && self->client->opt.transport == "tcp"
                                   ? " (the server closed the connection before answering the hello: if it was started with "
                                     "--tls-cert, turn TLS on in the client, ClientOptions::tls)"
                                   : "";
      self->lost(Error(ErrorCode::communication, fmt::format("connection to server {} lost: {}{}", self->name, err, hint)),
                 self->state != State::ready, !is_tls_failure(err));
      return;
    }
    self->client->n_received += n;
    FrameHeader h;
    try {
      h = decode_header(self->header_bytes, client_limits());
      if (!(h.flags & kFlagResponse)) throw Error(ErrorCode::protocol, "the server sent a request frame");
    } catch (const Error& e) {
      self->lost(Error(ErrorCode::protocol, fmt::format("server {}: {}", self->name, e.what())), false, false);
      return;
    }
    self->payload_bytes.resize(h.payload_bytes);
    if (h.payload_bytes == 0) {
      self->on_reply(h);
      return;
    }
    self->stream->read(self->payload_bytes.data(), self->payload_bytes.size(), [self, gen, h](const std::string& err2, std::size_t n2) {
      if (gen != self->generation) return;
      if (!err2.empty()) {
        self->lost(Error(ErrorCode::communication, fmt::format("connection to server {} lost: {}", self->name, err2)), false);
        return;
      }
      self->client->n_received += n2;
      self->on_reply(h);
    });
  });
}

void Client::Impl::Conn::on_reply(const FrameHeader& h) {
  if (h.request_id == hello_id && state == State::handshaking) {
    if (h.type == MsgType::error) {
      const ErrorReply reply = error_reply_in(payload_bytes);
      // A refused token is permanent: fail everything, no retries.
      lost(Error(reply.code, fmt::format("server {} refused the connection: {}", name, reply.message)), false, false);
      return;
    }
    state = State::ready;
    connect_failures = 0;
    try {
      peer_version = decode_hello_reply(payload_bytes, client_limits()).version;
    } catch (const Error&) {
      peer_version = 0;  // an older reply layout: newer requests are then not sent to it
    }
    read_header();
    pump();
    return;
  }
  auto it = pending.find(h.request_id);
  if (it != pending.end()) {
    auto r = it->second;
    if (h.type == MsgType::error) {
      const ErrorReply reply = error_reply_in(payload_bytes);
      complete(*r, Error(reply.code, fmt::format("server {}: {}", name, reply.message)));
    } else if (h.type != r->type) {
      complete(*r, Error(ErrorCode::protocol, fmt::format("server {} answered a {} request with {}", name, to_string(r->type), to_string(h.type))));
    } else {
      finish(*r, nullptr, payload_bytes);
    }
  }  // else: the answer to a request that already timed out
  read_header();
}

// The connection is gone (or never came): close, fail what cannot be retried, requeue the
// rest and reconnect after a short backoff.
void Client::Impl::Conn::lost(const Error& why, bool connecting, bool retryable) {
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
        client->n_retries++;
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

void Client::Impl::Conn::shutdown(const Error& why) {
  ++generation;
  if (stream) stream->close();
  backoff.cancel();
  std::vector<std::shared_ptr<Request>> all;
  for (auto& [id, r] : pending) all.push_back(r);
  for (auto& r : all) complete(*r, why);
  queue.clear();
}

// A write (open, append, drop) of the piece whose primary server is `primary`, sent to every
// complete copy. `outcome` runs once on the I/O thread: success when any copy took it (the
// copies that failed are incomplete from then on), else the error. Without replicas: one send.
// A copy being refilled gets the write later, in order, once its refill has caught up
// (backlog_write). The caller holds seqs_mutex.
template <class Build>
void Client::Impl::send_replicated(int primary, MsgType t, Build&& build, bool idempotent, std::function<void(const Error*)> outcome) {
  if (!replicas->replicated()) {
    send_frame(primary, t, std::forward<Build>(build), idempotent, [outcome](const Error* e, std::vector<std::byte>&) { outcome(e); });
    return;
  }
  for (int h : replicas->holders(primary))
    if (replicas->state(h) == CopyState::refilling) backlog_write(h, t, build(0), idempotent);
  const auto targets = replicas->complete_holders(primary);
  if (targets.empty()) {
    const Error lost(ErrorCode::communication, fmt::format("a {} request cannot be served: {}", to_string(t), replicas->describe_lost(primary)));
    asio::post(io, [outcome, lost] { outcome(&lost); });
    return;
  }
  struct Tally {
    std::size_t left = 0;
    bool any_ok = false;
    std::optional<Error> last;
  };
  auto tally = std::make_shared<Tally>();
  tally->left = targets.size();
  for (int s : targets)
    send_frame(s, t, build, idempotent, [this, primary, s, tally, outcome](const Error* e, std::vector<std::byte>&) {
      if (e) {
        copy_failed(s, *e);
        tally->last = *e;
      } else {
        tally->any_ok = true;
      }
      if (--tally->left > 0) return;
      if (tally->any_ok) {
        outcome(nullptr);
        return;
      }
      const Error lost = every_copy_failed(primary, *tally->last);
      outcome(&lost);
    });
}

Error Client::Impl::every_copy_failed(int primary, const Error& last) const {
  return Error(last.code(), fmt::format("{}; the last error: {}", replicas->describe_lost(primary), last.what()));
}

// On the I/O thread, after a request to `server` failed.
void Client::Impl::copy_failed(int server, const Error& why) {
  bool news = false;
  {
    std::lock_guard lock(seqs_mutex);
    news = replicas->mark_incomplete(server);
    drop_backlog(server);
  }
  if (!news) return;
  logger(Subsystem::offload).warn("server {} failed ({}); its copies of KV are incomplete, the replicas serve from now on", opt.servers[static_cast<std::size_t>(server)], why.what());
  schedule_probe(server);
}

// An attend part for the pieces whose primary is `primary`, sent to their first complete copy;
// when that server fails, to the next one (the same request: the copies hold the same sequence
// ids and token ranges).
void Client::Impl::send_attend(int primary, std::shared_ptr<const std::vector<std::byte>> request, Done done) {
  if (!replicas->replicated()) {
    send(primary, MsgType::attend, *request, true, std::move(done));
    return;
  }
  const int target = replicas->reader(primary);
  if (target < 0) {
    auto lost = std::make_shared<Error>(ErrorCode::communication, fmt::format("attend cannot be served: {}", replicas->describe_lost(primary)));
    asio::post(io, [done, lost] {
      std::vector<std::byte> none;
      done(lost.get(), none);
    });
    return;
  }
  send(target, MsgType::attend, *request, true, [this, primary, target, request, done](const Error* e, std::vector<std::byte>& reply) {
    if (e) {
      copy_failed(target, *e);
      if (replicas->reader(primary) >= 0) {
        send_attend(primary, request, done);
        return;
      }
      const Error lost = every_copy_failed(primary, *e);
      done(&lost, reply);
      return;
    }
    done(e, reply);
  });
}

std::unique_ptr<ByteStream> Client::Impl::make_stream() {
  if (ucx) return ucx->stream();
  if (tls) return make_tls_byte_stream(io, tls, opt.tls.server_name);
  return make_tcp_byte_stream(io);
}

Client::Impl::Impl(ClientOptions o) : opt(std::move(o)) {
  LONGATTN_INVALID(!opt.servers.empty(), "offload client: no servers given");
  LONGATTN_INVALID(!opt.token.empty(), "offload client: no token given (the servers refuse unauthenticated clients)");
  LONGATTN_INVALID(opt.timeout.count() > 0, "offload client: the timeout must be positive");
  LONGATTN_INVALID(opt.retries >= 0 && opt.retries <= 100, "offload client: retries {} outside [0, 100]", opt.retries);
  LONGATTN_INVALID(opt.shard_tokens >= 0, "offload client: shard_tokens must be >= 0");
  LONGATTN_INVALID(opt.transport == "tcp" || opt.transport == "ucx", "offload client: transport must be tcp or ucx, got '{}'",
                   opt.transport);
  LONGATTN_REQUIRE(opt.transport == "tcp" || ucx_available(), ErrorCode::unsupported,
                   "offload client: transport 'ucx' is not available in this build (built without UCX); use tcp");
  LONGATTN_REQUIRE(!opt.tls.enabled || opt.transport == "tcp", ErrorCode::unsupported,
                   "offload client: TLS is available on the tcp transport only");
  if (opt.tls.enabled) tls = make_client_tls_context(opt.tls);
  replicas = std::make_unique<ReplicaSet>(opt.servers, opt.replicas);
  if (opt.client_id == 0) {
    std::random_device rd;
    opt.client_id = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^ 1;
  }
  layout = {opt.shard_tokens, opt.servers.size()};
  for (std::size_t i = 0; i < opt.servers.size(); ++i) conns.push_back(std::make_shared<Conn>(this, static_cast<int>(i), opt.servers[i]));
  backlog.resize(opt.servers.size());
  backlog_bytes.assign(opt.servers.size(), 0);
  refills.resize(opt.servers.size());
  refill_failures.assign(opt.servers.size(), 0);
  for (std::size_t i = 0; i < opt.servers.size(); ++i) probes.push_back(std::make_unique<asio::steady_timer>(io));
  work = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(io.get_executor());
  io_drained = io_done.get_future();
  thread = std::thread([this] {
    io.run();
    io_done.set_value();
  });
  if (opt.transport == "ucx") ucx = make_ucx_client([this](std::function<void()> fn) { asio::post(io, std::move(fn)); });
}

// Shuts down by cancelling and then waiting: every connection closes its stream and fails what
// is pending, and the I/O thread runs until the cancelled operations have delivered their
// completions (they find a newer generation and do nothing). Only then do the streams go.
Client::Impl::~Impl() {
  asio::post(io, [this] {
    stop_refills();
    for (auto& c : conns) c->shutdown(Error(ErrorCode::communication, "the offload client was destroyed"));
  });
  work.reset();
  if (io_drained.wait_for(kShutdownDrainLimit) != std::future_status::ready) {
    // A resolver still waiting on the system resolver; its handler is dropped unrun.
    logger(Subsystem::offload).warn("offload client: pending operations did not finish within {} ms of shutdown; dropping them",
                                    kShutdownDrainLimit.count());
    io.stop();
  }
  thread.join();
  for (auto& c : conns) c->stream.reset();  // before the UCX engine goes
  ucx.reset();  // its worker thread stops; completions it still posts are dropped with the io_context
}

// Sends one request to server `s`; `done` runs on the I/O thread.
void Client::Impl::send(int s, MsgType t, std::span<const std::byte> payload, bool idempotent, Done done) {
  send_frame(s, t, [&](std::uint64_t id) { return frame(t, 0, id, payload); }, idempotent, std::move(done));
}

Open Client::Impl::open_message(const SeqState& st, std::uint64_t k) const {
  Open m;
  m.seq = server_seq_id(st.spec.id, k);
  m.layers = static_cast<std::uint32_t>(st.spec.layers);
  m.kv_heads = static_cast<std::uint32_t>(st.spec.kv_heads);
  m.head_dim = static_cast<std::uint32_t>(st.spec.head_dim);
  m.dtype = st.spec.dtype;
  m.kv_start = layout.first_token(k);
  return m;
}

// Sends an open for shard `k` unless done; caller holds seqs_mutex.
template <class J>
void Client::Impl::ensure_open(SeqState& st, std::uint64_t k, const std::shared_ptr<J>& join) {
  if (st.opened_shards.count(k)) return;
  st.opened_shards.insert(k);
  const Open m = open_message(st, k);
  join->left++;
  const auto seq = st.spec.id;
  const auto payload = encode(m);
  send_replicated(server_of(st, k), MsgType::open, [&](std::uint64_t id) { return frame(MsgType::open, 0, id, payload); }, true,
                  [this, join, seq](const Error* e) {
    if (e) {
      mark_broken(seq);
      join->fail(*e);
    }
    join->part_done();
  });
}

void Client::Impl::mark_broken(std::uint64_t seq) {
  std::lock_guard lock(seqs_mutex);
  auto it = seqs.find(seq);
  if (it != seqs.end()) it->second.broken = true;
}

Client::Client(ClientOptions opt) : impl_(std::make_unique<Impl>(std::move(opt))) {}
Client::~Client() = default;

std::future<void> Client::open(const SequenceSpec& spec) {
  auto& impl = *impl_;
  LONGATTN_INVALID(spec.id < kMaxSeqId, "sequence id {} is too large (ids must be < 2^48)", spec.id);
  LONGATTN_INVALID(spec.layers >= 1 && spec.kv_heads >= 1 && spec.head_dim >= 1 && spec.head_dim <= 512,
                   "sequence {}: layers, kv_heads and head_dim must be positive (head_dim <= 512)", spec.id);
  auto [join, fut] = void_join();
  std::lock_guard lock(impl.seqs_mutex);
  auto [it, fresh] = impl.seqs.try_emplace(spec.id);
  auto& st = it->second;
  if (!fresh) {
    const auto& s = st.spec;
    LONGATTN_INVALID(s.layers == spec.layers && s.kv_heads == spec.kv_heads && s.head_dim == spec.head_dim && s.dtype == spec.dtype,
                     "sequence {} is already open with another geometry; drop it first", spec.id);
  } else {
    st.spec = spec;
    st.layer_lengths.assign(static_cast<std::size_t>(spec.layers), 0);
    st.home = static_cast<int>(spec.id % impl.conns.size());
  }
  join->left++;  // guard: finish only after every part was sent
  impl.ensure_open(st, 0, join);
  join->part_done();
  return fut;
}

std::future<void> Client::append(std::uint64_t seq, int layer, const void* k, const void* v, std::int64_t tokens) {
  auto& impl = *impl_;
  auto [join, fut] = void_join();
  std::lock_guard lock(impl.seqs_mutex);
  auto it = impl.seqs.find(seq);
  LONGATTN_INVALID(it != impl.seqs.end(), "append: sequence {} was not opened by this client", seq);
  auto& st = it->second;
  LONGATTN_REQUIRE(!st.broken, ErrorCode::communication,
                   "sequence {} is in an unknown state after a failed request; drop it and open it again", seq);
  LONGATTN_INVALID(layer >= 0 && layer < st.spec.layers, "append: layer {} outside [0, {})", layer, st.spec.layers);
  LONGATTN_INVALID(tokens > 0 && k && v, "append: needs tokens > 0 and k, v");
  const std::size_t row = static_cast<std::size_t>(st.spec.kv_heads) * st.spec.head_dim * dtype_size(st.spec.dtype);
  std::int64_t& stored = st.layer_lengths[static_cast<std::size_t>(layer)];
  const ShardLayout& layout = impl.layout;
  join->left++;
  for (std::int64_t done = 0; done < tokens;) {
    const std::int64_t position = stored + done;
    const std::uint64_t shard = layout.shard_of(position);
    LONGATTN_INVALID(shard < kMaxShards, "append: sequence {} needs more than {} shards; raise shard_tokens", seq, kMaxShards);
    std::int64_t n = tokens - done;
    if (layout.shard_tokens > 0) n = std::min(n, layout.first_token(shard + 1) - position);
    // Frames stay well under the 256 MiB default limit: split bulk prefills.
    n = std::min<std::int64_t>(n, std::max<std::int64_t>(1, static_cast<std::int64_t>((64u << 20) / (2 * row))));
    impl.ensure_open(st, shard, join);
    Append m;
    m.seq = server_seq_id(seq, shard);
    m.layer = static_cast<std::uint32_t>(layer);
    m.tokens = static_cast<std::uint32_t>(n);
    m.start = position - layout.first_token(shard);
    m.kv_heads = static_cast<std::uint32_t>(st.spec.kv_heads);
    m.head_dim = static_cast<std::uint32_t>(st.spec.head_dim);
    m.dtype = st.spec.dtype;
    m.k = std::span(static_cast<const std::byte*>(k) + static_cast<std::size_t>(done) * row, static_cast<std::size_t>(n) * row);
    m.v = std::span(static_cast<const std::byte*>(v) + static_cast<std::size_t>(done) * row, static_cast<std::size_t>(n) * row);
    join->left++;
    Impl* client = &impl;
    impl.send_replicated(impl.server_of(st, shard), MsgType::append, [&m](std::uint64_t id) { return append_frame(id, m); }, false,
                    [client, join, seq](const Error* e) {
      if (e) {
        client->mark_broken(seq);
        join->fail(*e);
      }
      join->part_done();
    });
    done += n;
  }
  stored += tokens;
  join->part_done();
  return fut;
}

std::future<void> Client::attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q, float* o,
                                 float* lse) {
  auto& impl = *impl_;
  LONGATTN_INVALID(!queries.empty() && q && o && lse, "attend: needs queries, q, o and lse");
  LONGATTN_INVALID(q_heads >= 1 && head_dim >= 1, "attend: q_heads and head_dim must be positive");
  std::vector<QueriedSequence> queried;
  queried.reserve(queries.size());
  {
    std::lock_guard lock(impl.seqs_mutex);
    for (const auto& dq : queries) {
      auto it = impl.seqs.find(dq.seq);
      LONGATTN_INVALID(it != impl.seqs.end(), "attend: sequence {} was not opened by this client", dq.seq);
      const auto& st = it->second;
      LONGATTN_REQUIRE(!st.broken, ErrorCode::communication,
                       "sequence {} is in an unknown state after a failed request; drop it and open it again", dq.seq);
      LONGATTN_INVALID(layer >= 0 && layer < st.spec.layers, "attend: layer {} outside [0, {})", layer, st.spec.layers);
      LONGATTN_INVALID(head_dim == st.spec.head_dim && q_heads % st.spec.kv_heads == 0,
                       "attend: {} heads x {} do not fit sequence {} ({} kv heads x {})", q_heads, head_dim, dq.seq, st.spec.kv_heads,
                       st.spec.head_dim);
      queried.push_back({dq.seq, dq.q_count, st.layer_lengths[static_cast<std::size_t>(layer)], st.home});
    }
  }
  auto plan = std::make_shared<AttendPlan>(plan_attend(impl.layout, layer, q_heads, head_dim, queried, q));
  auto replies = std::make_shared<std::vector<std::vector<std::byte>>>(plan->servers.size());
  auto join = attend_join(plan, replies, o, lse, nullptr);
  auto fut = join->promise.get_future();
  join->left = 1;
  for (std::size_t s = 0; s < plan->servers.size(); ++s) {
    auto& part = plan->servers[s];
    if (!part.asked()) continue;
    part.request.q = std::as_bytes(std::span(part.q));
    join->left++;
    impl.send_attend(static_cast<int>(s), std::make_shared<const std::vector<std::byte>>(encode(part.request)),
              [replies, s, join](const Error* e, std::vector<std::byte>& payload) {
                if (e) {
                  join->fail(*e);
                } else {
                  (*replies)[s] = std::move(payload);
                }
                join->part_done();
              });
  }
  asio::post(impl.io, [join] { join->part_done(); });  // the guard, released on the I/O thread
  return fut;
}

std::future<void> Client::append_attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q,
                                        const void* k, const void* v, float* o, float* lse, std::chrono::steady_clock::time_point* answered_at) {
  auto& impl = *impl_;
  LONGATTN_INVALID(!queries.empty() && q && k && v && o && lse, "append_attend: needs queries, q, k, v, o and lse");
  LONGATTN_INVALID(q_heads >= 1 && head_dim >= 1, "append_attend: q_heads and head_dim must be positive");
  // One round trip reaches one server, which cannot keep a second copy of the new tokens: with
  // replicas the tokens go to every copy by append and the queries by attend (which fails over).
  // A connection's requests are served in order, so the attend is sent without waiting.
  if (impl.replicas->replicated()) {
    std::size_t row = 0;
    {
      std::lock_guard lock(impl.seqs_mutex);
      auto it = impl.seqs.find(queries.front().seq);
      LONGATTN_INVALID(it != impl.seqs.end(), "append_attend: sequence {} was not opened by this client", queries.front().seq);
      const auto& spec = it->second.spec;
      row = static_cast<std::size_t>(spec.kv_heads) * spec.head_dim * dtype_size(spec.dtype);
    }
    std::vector<std::future<void>> parts;
    std::size_t r = 0;
    for (const auto& dq : queries) {
      if (dq.q_count > 0)
        parts.push_back(append(dq.seq, layer, static_cast<const std::byte*>(k) + r * row, static_cast<const std::byte*>(v) + r * row, dq.q_count));
      r += static_cast<std::size_t>(dq.q_count);
    }
    parts.push_back(attend(layer, q_heads, head_dim, queries, q, o, lse));
    return std::async(std::launch::deferred, [parts = std::move(parts), answered_at]() mutable {
      for (auto& f : parts) f.get();
      if (answered_at) *answered_at = Clock::now();
    });
  }
  std::vector<QueriedSequence> queried;
  queried.reserve(queries.size());
  auto join = std::shared_ptr<Join<void>>();
  std::shared_ptr<AttendPlan> plan;
  std::vector<ServerNewTokens> placed;
  auto replies = std::shared_ptr<std::vector<std::vector<std::byte>>>();
  {
    std::lock_guard lock(impl.seqs_mutex);
    const SequenceSpec* first = nullptr;
    for (const auto& dq : queries) {
      auto it = impl.seqs.find(dq.seq);
      LONGATTN_INVALID(it != impl.seqs.end(), "append_attend: sequence {} was not opened by this client", dq.seq);
      const auto& st = it->second;
      LONGATTN_REQUIRE(!st.broken, ErrorCode::communication,
                       "sequence {} is in an unknown state after a failed request; drop it and open it again", dq.seq);
      LONGATTN_INVALID(layer >= 0 && layer < st.spec.layers, "append_attend: layer {} outside [0, {})", layer, st.spec.layers);
      LONGATTN_INVALID(head_dim == st.spec.head_dim && q_heads % st.spec.kv_heads == 0,
                       "append_attend: {} heads x {} do not fit sequence {} ({} kv heads x {})", q_heads, head_dim, dq.seq,
                       st.spec.kv_heads, st.spec.head_dim);
      if (!first) first = &st.spec;
      LONGATTN_INVALID(st.spec.kv_heads == first->kv_heads && st.spec.dtype == first->dtype,
                       "append_attend: sequence {} ({} kv heads, {}) differs from sequence {} ({} kv heads, {}); one call carries one "
                       "k/v layout: split the batch",
                       dq.seq, st.spec.kv_heads, to_string(st.spec.dtype), first->id, first->kv_heads, to_string(first->dtype));
      const std::int64_t after = st.layer_lengths[static_cast<std::size_t>(layer)] + dq.q_count;
      LONGATTN_INVALID(impl.layout.shard_of(after - 1) < kMaxShards, "append_attend: sequence {} needs more than {} shards; raise shard_tokens",
                       dq.seq, kMaxShards);
      queried.push_back({dq.seq, dq.q_count, after, st.home});
    }
    plan = std::make_shared<AttendPlan>(plan_attend(impl.layout, layer, q_heads, head_dim, queried, q));
    const std::size_t row_bytes = static_cast<std::size_t>(first->kv_heads) * first->head_dim * dtype_size(first->dtype);
    placed = place_new_tokens(impl.layout, *plan, queried, k, v, row_bytes);
    replies = std::make_shared<std::vector<std::vector<std::byte>>>(plan->servers.size());
    join = attend_join(plan, replies, o, lse, answered_at);
    join->left = 1;
    // Shards that the new tokens open are opened first, on the same connection: requests to one
    // server are answered in order.
    for (const auto& qs : queried) {
      auto& st = impl.seqs.at(qs.seq);
      for (std::uint64_t shard = 0; shard < impl.layout.shards_for(qs.length); ++shard) impl.ensure_open(st, shard, join);
      st.layer_lengths[static_cast<std::size_t>(layer)] = qs.length;
    }
    const std::uint32_t kv_heads = static_cast<std::uint32_t>(first->kv_heads);
    const DType dtype = first->dtype;
    for (std::size_t s = 0; s < plan->servers.size(); ++s) {
      auto& part = plan->servers[s];
      if (!part.asked()) continue;
      AppendAttend m;
      part.request.q = std::as_bytes(std::span(part.q));
      m.attend = part.request;
      m.kv_heads = kv_heads;
      m.dtype = dtype;
      m.new_tokens = placed[s].counts;
      m.k = placed[s].k;
      m.v = placed[s].v;
      join->left++;
      Impl* client = &impl;
      std::vector<std::uint64_t> seqs;
      for (const auto& qs : queried) seqs.push_back(qs.seq);
      // Not retried: a lost reply leaves unknown whether the append happened.
      impl.send(static_cast<int>(s), MsgType::append_attend, encode(m), false,
                [client, replies, s, join, seqs = std::move(seqs)](const Error* e, std::vector<std::byte>& payload) {
                  if (e) {
                    for (auto id : seqs) client->mark_broken(id);
                    join->fail(*e);
                  } else {
                    (*replies)[s] = std::move(payload);
                  }
                  join->part_done();
                });
    }
  }
  auto fut = join->promise.get_future();
  asio::post(impl.io, [join] { join->part_done(); });  // the guard, released on the I/O thread
  return fut;
}

std::future<void> Client::drop(std::uint64_t seq) {
  auto& impl = *impl_;
  auto [join, fut] = void_join();
  std::lock_guard lock(impl.seqs_mutex);
  auto it = impl.seqs.find(seq);
  join->left = 1;
  if (it != impl.seqs.end()) {
    for (auto k : it->second.opened_shards) {
      join->left++;
      const auto payload = encode(Drop{server_seq_id(seq, k)});
      impl.send_replicated(impl.server_of(it->second, k), MsgType::drop, [&](std::uint64_t id) { return frame(MsgType::drop, 0, id, payload); },
                           true, [join](const Error* e) {
               if (e) join->fail(*e);
               join->part_done();
             });
    }
    impl.seqs.erase(it);
  }
  asio::post(impl.io, [join] { join->part_done(); });
  return fut;
}

std::future<std::string> Client::server_stats(int server) {
  auto& impl = *impl_;
  LONGATTN_INVALID(server >= 0 && static_cast<std::size_t>(server) < impl.conns.size(), "server_stats: no server {}", server);
  auto pr = std::make_shared<std::promise<std::string>>();
  auto fut = pr->get_future();
  impl.send(server, MsgType::stats, {}, true, [pr](const Error* e, std::vector<std::byte>& payload) {
    if (e) {
      pr->set_exception(std::make_exception_ptr(*e));
    } else {
      pr->set_value(std::string(reinterpret_cast<const char*>(payload.data()), payload.size()));
    }
  });
  return fut;
}

std::future<void> Client::refill(int server) {
  auto& impl = *impl_;
  LONGATTN_INVALID(impl.replicas->replicated(),
                   "refill: the client keeps one copy of KV (ClientOptions::replicas = 1), so there is no replica to refill from");
  LONGATTN_INVALID(server >= 0 && static_cast<std::size_t>(server) < impl.conns.size(), "refill: no server {} (the client has {})", server,
                   impl.conns.size());
  auto pr = std::make_shared<std::promise<void>>();
  auto fut = pr->get_future();
  asio::post(impl.io, [&impl, server, pr] { impl.start_refill(server, pr); });
  return fut;
}

bool Client::serving(int server) const {
  const auto& impl = *impl_;
  LONGATTN_INVALID(server >= 0 && static_cast<std::size_t>(server) < impl.conns.size(), "serving: no server {} (the client has {})", server,
                   impl.conns.size());
  return impl.replicas->complete(server);
}

ClientStats Client::stats() const {
  const auto& impl = *impl_;
  ClientStats s{impl.n_requests.load(), impl.n_retries.load(), impl.n_sent.load(), impl.n_received.load(), impl.n_errors.load()};
  s.refills = impl.n_refills.load();
  return s;
}

}  // namespace longattn::offload
