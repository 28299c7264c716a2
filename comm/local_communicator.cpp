// In-process communicators: ranks are threads sharing one hub. Sends and receives are matched by
// (source, destination, tag) in posting order, like MPI. Collectives go through a generation-
// counted exchange in the hub. In stream-ordered mode (CUDA) a matched pair becomes an async copy
// on the hub's stream that waits for events recorded on both callers' streams; completion is an
// event the waiting side's stream waits on, which is exactly the NCCL communicator's contract.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <tuple>

#include "common/check.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"

#ifdef LONGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace longattn {
namespace {

// Completion state shared by the two sides of a matched transfer.
struct Completion {
  bool matched = false;
  std::string error;
#ifdef LONGATTN_HAVE_CUDA
  cudaEvent_t done = nullptr;
  ~Completion() {
    if (done) cudaEventDestroy(done);
  }
#endif
};

struct Posted {
  void* buffer;
  std::size_t bytes;
  std::shared_ptr<Completion> completion;
#ifdef LONGATTN_HAVE_CUDA
  cudaEvent_t ready = nullptr;  // the poster's stream reached the call
#endif
};

struct Hub {
  explicit Hub(int n, bool ordered) : size(n), stream_ordered(ordered), slots(2, std::vector<std::string>(static_cast<std::size_t>(n))) {
#ifdef LONGATTN_HAVE_CUDA
    if (ordered) LONGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
#else
    LONGATTN_REQUIRE(!ordered, ErrorCode::unsupported, "stream-ordered local communicators need a build with CUDA");
#endif
  }
  ~Hub() {
#ifdef LONGATTN_HAVE_CUDA
    if (stream) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
#endif
  }
  const int size;
  const bool stream_ordered;
  std::mutex mu;
  std::condition_variable cv;
  using Key = std::tuple<int, int, int>;  // source, destination, tag
  std::map<Key, std::deque<Posted>> sends, recvs;
  // Collective exchange: two generations of slots so a fast rank cannot overwrite a slow one's.
  std::vector<std::vector<std::string>> slots;
  long generation = 0;
  int arrived = 0;
  std::map<std::pair<long, int>, std::shared_ptr<Hub>> children;  // split number, color
#ifdef LONGATTN_HAVE_CUDA
  cudaStream_t stream = nullptr;
#endif

  // Called with mu held: moves the bytes of a matched pair (or schedules the move).
  void transfer(Posted& send, Posted& recv) {
    auto c = send.completion;
    if (send.bytes != recv.bytes) {
      const std::string e = fmt::format("message size mismatch: {} bytes sent, {} expected", send.bytes, recv.bytes);
      send.completion->error = recv.completion->error = e;
    } else if (!stream_ordered) {
      if (send.bytes) std::memcpy(recv.buffer, send.buffer, send.bytes);
    } else {
#ifdef LONGATTN_HAVE_CUDA
      LONGATTN_CUDA_CHECK(cudaStreamWaitEvent(stream, send.ready, 0));
      LONGATTN_CUDA_CHECK(cudaStreamWaitEvent(stream, recv.ready, 0));
      if (send.bytes) LONGATTN_CUDA_CHECK(cudaMemcpyAsync(recv.buffer, send.buffer, send.bytes, cudaMemcpyDefault, stream));
      for (auto* comp : {send.completion.get(), recv.completion.get()}) {
        LONGATTN_CUDA_CHECK(cudaEventCreateWithFlags(&comp->done, cudaEventDisableTiming));
        LONGATTN_CUDA_CHECK(cudaEventRecord(comp->done, stream));
      }
      cudaEventDestroy(send.ready);
      cudaEventDestroy(recv.ready);
#endif
    }
    send.completion->matched = recv.completion->matched = true;
    cv.notify_all();
  }
};

class LocalRequest final : public CommRequest {
 public:
  LocalRequest(std::shared_ptr<Hub> hub, std::shared_ptr<Completion> c, void* stream, std::string what, std::chrono::seconds timeout)
      : hub_(std::move(hub)), c_(std::move(c)), stream_(stream), what_(std::move(what)), timeout_(timeout) {}
  void wait() override {
    {
      std::unique_lock lock(hub_->mu);
      if (!hub_->cv.wait_for(lock, timeout_, [&] { return c_->matched; }))
        throw Error(ErrorCode::timeout, fmt::format("{} found no matching peer within {} s", what_, timeout_.count()));
    }
    LONGATTN_REQUIRE(c_->error.empty(), ErrorCode::communication, "{}: {}", what_, c_->error);
#ifdef LONGATTN_HAVE_CUDA
    if (hub_->stream_ordered) LONGATTN_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream_), c_->done, 0));
#endif
  }
  bool test() override {
    std::lock_guard lock(hub_->mu);
    if (!c_->matched) return false;
#ifdef LONGATTN_HAVE_CUDA
    if (hub_->stream_ordered) return cudaEventQuery(c_->done) == cudaSuccess;
#endif
    return true;
  }

 private:
  std::shared_ptr<Hub> hub_;
  std::shared_ptr<Completion> c_;
  void* stream_;
  std::string what_;
  std::chrono::seconds timeout_;
};

class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator(std::shared_ptr<Hub> hub, int rank) : hub_(std::move(hub)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return hub_->size; }
  std::string backend_name() const override { return "local"; }
  Topology topology() const override {
    const long node_size = env_int("LONGATTN_NODE_SIZE");
    if (node_size <= 0) return {0, 1, rank_, hub_->size};
    const int ns = static_cast<int>(node_size);
    return {rank_ / ns, (hub_->size + ns - 1) / ns, rank_ % ns, std::min(ns, hub_->size - rank_ / ns * ns)};
  }

  Request isend(const void* buf, std::size_t bytes, int peer, int tag, void* stream) override {
    return enqueue(true, const_cast<void*>(buf), bytes, peer, tag, stream);
  }
  Request irecv(void* buf, std::size_t bytes, int peer, int tag, void* stream) override {
    return enqueue(false, buf, bytes, peer, tag, stream);
  }

  void allreduce(void* buf, std::size_t count, ReduceType type, ReduceOp op) override {
    const std::size_t esize = type == ReduceType::f32 ? 4 : 8;
    const auto all = exchange(std::string(static_cast<const char*>(buf), count * esize));
    auto reduce = [&](auto* out, auto tag) {
      using T = decltype(tag);
      for (std::size_t i = 0; i < count; ++i) {
        T acc = reinterpret_cast<const T*>(all[0].data())[i];
        for (std::size_t r = 1; r < all.size(); ++r) {
          const T x = reinterpret_cast<const T*>(all[r].data())[i];
          acc = op == ReduceOp::sum ? acc + x : op == ReduceOp::max ? std::max(acc, x) : std::min(acc, x);
        }
        out[i] = acc;
      }
    };
    if (type == ReduceType::f32) reduce(static_cast<float*>(buf), float{});
    else if (type == ReduceType::f64) reduce(static_cast<double*>(buf), double{});
    else reduce(static_cast<std::int64_t*>(buf), std::int64_t{});
  }
  void allgather(const void* send, void* recv, std::size_t bytes_each) override {
    const auto all = exchange(std::string(static_cast<const char*>(send), bytes_each));
    for (std::size_t r = 0; r < all.size(); ++r) std::memcpy(static_cast<char*>(recv) + r * bytes_each, all[r].data(), bytes_each);
  }
  void broadcast(void* buf, std::size_t bytes, int root) override {
    const auto all = exchange(rank_ == root ? std::string(static_cast<const char*>(buf), bytes) : std::string());
    std::memcpy(buf, all[static_cast<std::size_t>(root)].data(), bytes);
  }
  void barrier() override { exchange({}); }

  std::unique_ptr<Communicator> split(int color, int key) const override {
    std::int64_t mine[3] = {color, key, rank_};
    const auto all = const_cast<LocalCommunicator*>(this)->exchange(std::string(reinterpret_cast<const char*>(mine), sizeof mine));
    std::vector<std::tuple<std::int64_t, std::int64_t>> members;  // (key, rank) of my color
    for (const auto& s : all) {
      const auto* v = reinterpret_cast<const std::int64_t*>(s.data());
      if (v[0] == color) members.emplace_back(v[1], v[2]);
    }
    std::sort(members.begin(), members.end());
    const int new_rank = static_cast<int>(std::find(members.begin(), members.end(), std::tuple<std::int64_t, std::int64_t>{key, rank_}) - members.begin());
    std::shared_ptr<Hub> child;
    {
      std::lock_guard lock(hub_->mu);
      auto& slot = hub_->children[{splits_, color}];
      if (!slot) slot = std::make_shared<Hub>(static_cast<int>(members.size()), hub_->stream_ordered);
      child = slot;
    }
    ++splits_;
    auto sub = std::make_unique<LocalCommunicator>(child, new_rank);
    sub->set_timeout(timeout());
    return sub;
  }

  void synchronize(void* stream) override {
#ifdef LONGATTN_HAVE_CUDA
    if (hub_->stream_ordered) {
      LONGATTN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
      LONGATTN_CUDA_CHECK(cudaStreamSynchronize(hub_->stream));
    }
#endif
  }

 private:
  Request enqueue(bool is_send, void* buf, std::size_t bytes, int peer, int tag, void* stream) {
    LONGATTN_INVALID(peer >= 0 && peer < size(), "peer rank {} is outside [0, {})", peer, size());
    Posted p{buf, bytes, std::make_shared<Completion>()};
#ifdef LONGATTN_HAVE_CUDA
    if (hub_->stream_ordered) {
      LONGATTN_CUDA_CHECK(cudaEventCreateWithFlags(&p.ready, cudaEventDisableTiming));
      LONGATTN_CUDA_CHECK(cudaEventRecord(p.ready, static_cast<cudaStream_t>(stream)));
    }
#endif
    auto completion = p.completion;
    {
      std::lock_guard lock(hub_->mu);
      const Hub::Key key = is_send ? Hub::Key{rank_, peer, tag} : Hub::Key{peer, rank_, tag};
      auto& other = is_send ? hub_->recvs[key] : hub_->sends[key];
      if (!other.empty()) {
        Posted match = other.front();
        other.pop_front();
        if (is_send) hub_->transfer(p, match);
        else hub_->transfer(match, p);
      } else {
        (is_send ? hub_->sends[key] : hub_->recvs[key]).push_back(p);
      }
    }
    return std::make_unique<LocalRequest>(hub_, completion, stream,
                                          fmt::format("{} of {} bytes {} rank {}", is_send ? "send" : "receive", bytes, is_send ? "to" : "from", peer),
                                          timeout());
  }

  // Every rank contributes bytes; every rank gets all contributions (a collective).
  std::vector<std::string> exchange(std::string mine) {
    std::unique_lock lock(hub_->mu);
    const long gen = hub_->generation;
    auto& slots = hub_->slots[static_cast<std::size_t>(gen % 2)];
    slots[static_cast<std::size_t>(rank_)] = std::move(mine);
    if (++hub_->arrived == hub_->size) {
      hub_->arrived = 0;
      ++hub_->generation;
      hub_->cv.notify_all();
    } else {
      if (!hub_->cv.wait_for(lock, timeout(), [&] { return hub_->generation != gen; }))
        throw Error(ErrorCode::timeout, fmt::format("a collective waited {} s for the other ranks", timeout().count()));
    }
    return slots;  // stays valid until generation gen + 2 starts, which needs this rank
  }

  std::shared_ptr<Hub> hub_;
  int rank_;
  mutable long splits_ = 0;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_local_communicators(int ranks, bool stream_ordered) {
  LONGATTN_INVALID(ranks >= 1, "need at least one rank, got {}", ranks);
  auto hub = std::make_shared<Hub>(ranks, stream_ordered);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < ranks; ++r) out.push_back(std::make_unique<LocalCommunicator>(hub, r));
  return out;
}

}  // namespace longattn
