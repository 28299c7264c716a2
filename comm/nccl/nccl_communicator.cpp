// The NCCL communicator: device buffers, one GPU per rank, stream-ordered point to point.
//
// Every batch of sends/receives runs on the communicator's own non-blocking stream, after the
// caller's stream has reached the point of the call (an event), inside one ncclGroupStart/End so
// that two ranks sending to each other cannot deadlock. Completion is an event: wait() makes the
// caller's stream wait for it (no host block), so compute and transfers overlap on the GPU.
// Host-side collectives (agreement checks, small reductions) go through the MPI bootstrap.
// Failures: the communicator is non-blocking (NCCL's config.blocking = 0), so no NCCL call can
// block the host for ever: initialization, every group of sends/receives (whose first use of a peer
// connects to it, which needs the peer) and synchronize() poll ncclCommGetAsyncError and the stream
// against a deadline (the communicator's timeout()) and abort the communicator on error or timeout, so a
// dead, stuck or mismatched peer becomes an Error that says so, not a hang.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <thread>
#include <utility>

#include "common/check.hpp"
#include "longattn/communicator.hpp"
#include "longattn/log.hpp"

namespace longattn {
namespace {

using Clock = std::chrono::steady_clock;

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// True once the stream has run all its work; a failure in that work throws.
bool stream_idle(cudaStream_t stream) {
  const cudaError_t status = cudaStreamQuery(stream);
  if (status == cudaErrorNotReady) return false;
  if (status != cudaSuccess) throw_call_failed(ErrorCode::internal, "cudaStreamQuery", cudaGetErrorString(status), __FILE__, __LINE__);
  return true;
}

class NcclRequest final : public CommRequest {
 public:
  NcclRequest(cudaEvent_t done, cudaStream_t caller) : done_(done), caller_(caller) {}
  ~NcclRequest() override { cudaEventDestroy(done_); }
  void wait() override { LONGATTN_CUDA_CHECK(cudaStreamWaitEvent(caller_, done_, 0)); }
  bool test() override { return cudaEventQuery(done_) == cudaSuccess; }

 private:
  cudaEvent_t done_;
  cudaStream_t caller_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Communicator& host, std::unique_ptr<Communicator> owned_host = nullptr)
      : host_(host), owned_host_(std::move(owned_host)) {
    const Topology topo = host_.topology();
    int devices = 0;
    LONGATTN_CUDA_CHECK(cudaGetDeviceCount(&devices));
    LONGATTN_REQUIRE(devices > 0, ErrorCode::unsupported, "no CUDA device is visible to rank {}", host_.rank());
    if (topo.local_size > devices)
      logger(Subsystem::comm).warn("{} ranks share this node but only {} GPUs are visible: GPUs will be shared", topo.local_size, devices);
    const int device = topo.local_rank % devices;
    LONGATTN_CUDA_CHECK(cudaSetDevice(device));
    ncclUniqueId id{};
    if (host_.rank() == 0) LONGATTN_NCCL_CHECK(ncclGetUniqueId(&id));
    host_.broadcast(&id, sizeof id, 0);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    LONGATTN_NCCL_CHECK(ncclCommInitRankConfig(&comm_, host_.size(), id, host_.rank(), &config));
    wait_ready("initializing the NCCL communicator");
    LONGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LONGATTN_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    logger(Subsystem::comm).debug("NCCL communicator: rank {}/{} on GPU {}", host_.rank(), host_.size(), device);
  }
  ~NcclCommunicator() override {
    // Never hang in a destructor: transfers still queued get the usual deadline, then the
    // communicator is aborted (which also ends its kernels) instead of finalized.
    if (comm_) {
      try {
        if (stream_) poll_until(deadline(), [&] { return stream_idle(stream_); }, "draining transfers at shutdown");
        LONGATTN_NCCL_CHECK(ncclCommFinalize(comm_));
        wait_ready("finalizing the NCCL communicator");
        ncclCommDestroy(comm_);
      } catch (const Error&) {
        if (comm_) ncclCommAbort(comm_);
      }
    }
    if (ready_) cudaEventDestroy(ready_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  std::string backend_name() const override { return "nccl"; }
  Topology topology() const override { return host_.topology(); }

  Request isend(const void* buf, std::size_t bytes, int peer, int tag, void* stream) override {
    return post({{P2POp::Kind::send, const_cast<void*>(buf), bytes, peer, tag}}, stream);
  }
  Request irecv(void* buf, std::size_t bytes, int peer, int tag, void* stream) override {
    return post({{P2POp::Kind::recv, buf, bytes, peer, tag}}, stream);
  }

  Request post(const std::vector<P2POp>& ops, void* stream) override {
    check_alive();
    // Validated before the group opens: a throw inside ncclGroupStart/End would leave this thread's
    // group open, and every later NCCL call on it would fail.
    for (const auto& op : ops)
      LONGATTN_INVALID(op.peer >= 0 && op.peer < size(), "peer rank {} is outside [0, {})", op.peer, size());
    // The transfers start once the caller's stream has produced the data.
    LONGATTN_CUDA_CHECK(cudaEventRecord(ready_, as_stream(stream)));
    LONGATTN_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    LONGATTN_NCCL_CHECK(ncclGroupStart());
    for (const auto& op : ops) {
      if (op.kind == P2POp::Kind::send) LONGATTN_NCCL_CHECK(ncclSend(op.buffer, op.bytes, ncclUint8, op.peer, comm_, stream_));
      else LONGATTN_NCCL_CHECK(ncclRecv(op.buffer, op.bytes, ncclUint8, op.peer, comm_, stream_));
    }
    LONGATTN_NCCL_CHECK(ncclGroupEnd());
    // Non-blocking: the group is enqueued on the stream only once NCCL says so (the first use of a
    // peer connects to it first, which needs that peer to post too).
    wait_ready("posting sends/receives (is every peer posting the matching operations?)");
    cudaEvent_t done;
    LONGATTN_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    LONGATTN_CUDA_CHECK(cudaEventRecord(done, stream_));
    return std::make_unique<NcclRequest>(done, as_stream(stream));
  }

  // Host-side collectives: small values, through the bootstrap communicator.
  void allreduce(void* buf, std::size_t count, ReduceType type, ReduceOp op) override { host_.allreduce(buf, count, type, op); }
  void allgather(const void* send, void* recv, std::size_t bytes_each) override { host_.allgather(send, recv, bytes_each); }
  void broadcast(void* buf, std::size_t bytes, int root) override { host_.broadcast(buf, bytes, root); }
  void barrier() override { host_.barrier(); }

  std::unique_ptr<Communicator> split(int color, int key) const override {
    auto sub_host = host_.split(color, key);
    Communicator& ref = *sub_host;
    auto sub = std::make_unique<NcclCommunicator>(ref, std::move(sub_host));
    sub->set_timeout(timeout());
    return sub;
  }

  void synchronize(void* stream) override {
    poll_until(deadline(), [&] {
      if (stream_idle(as_stream(stream)) && stream_idle(stream_)) return true;
      check_alive();
      return false;
    }, "waiting for transfers to finish");
  }

 private:
  Clock::time_point deadline() const { return Clock::now() + timeout(); }

  // The one wait of this communicator: calls ready() until it says yes; past the deadline the
  // communicator is aborted and the call fails with a timeout that names `what`. The pause is short
  // next to a ring step, so a finished transfer is seen at once, and long enough not to spin a core.
  template <class Ready>
  void poll_until(Clock::time_point limit, Ready&& ready, const char* what) {
    constexpr auto kPause = std::chrono::microseconds(50);
    while (!ready()) {
      if (Clock::now() > limit) fail_timeout(what);
      std::this_thread::sleep_for(kPause);
    }
  }
  // Waits for the communicator's last non-blocking operation (initialization, a group, finalize).
  void wait_ready(const char* what) {
    poll_until(deadline(), [&] { return async_state() == ncclSuccess; }, what);
  }
  [[noreturn]] void fail_timeout(const char* what) {
    abort_communicator();
    throw Error(ErrorCode::timeout, fmt::format("NCCL: {} did not finish within {} s (LONGATTN_COMM_TIMEOUT_S); a peer is dead, stuck, "
                                                "or running with different arguments",
                                                what, timeout().count()));
  }
  void abort_communicator() {
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  // ncclSuccess when idle, ncclInProgress while a non-blocking operation runs; an asynchronous
  // error (a peer failed) aborts the communicator and throws.
  ncclResult_t async_state() {
    LONGATTN_REQUIRE(comm_, ErrorCode::communication, "the NCCL communicator was aborted after an earlier failure");
    ncclResult_t state = ncclSuccess;
    LONGATTN_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
    if (state != ncclSuccess && state != ncclInProgress) {
      abort_communicator();
      throw Error(ErrorCode::communication, fmt::format("NCCL reported an asynchronous error: {} (a peer failed?)", ncclGetErrorString(state)));
    }
    return state;
  }
  void check_alive() { async_state(); }

  Communicator& host_;
  std::unique_ptr<Communicator> owned_host_;  // keeps a split's bootstrap communicator alive
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
};

}  // namespace

bool nccl_available() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host) { return std::make_unique<NcclCommunicator>(host); }

}  // namespace longattn
