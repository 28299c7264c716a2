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
// against a deadline (LONGATTN_COMM_TIMEOUT_S) and abort the communicator on error or timeout, so a
// dead, stuck or mismatched peer becomes an Error that says so, not a hang.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <thread>

#include "common/check.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"
#include "longattn/log.hpp"

#define LA_CUDA_CHECK(call)                                                                                 \
  do {                                                                                                      \
    const cudaError_t e_ = (call);                                                                          \
    if (e_ != cudaSuccess)                                                                                  \
      throw ::longattn::Error(::longattn::ErrorCode::communication,                                         \
                              ::fmt::format("{} failed: {} ({}:{})", #call, cudaGetErrorString(e_), __FILE__, __LINE__)); \
  } while (0)

#define NCCL_CHECK(call)                                                                                    \
  do {                                                                                                      \
    const ncclResult_t r_ = (call);                                                                         \
    if (r_ != ncclSuccess && r_ != ncclInProgress)                                                          \
      throw ::longattn::Error(::longattn::ErrorCode::communication,                                         \
                              ::fmt::format("{} failed: {} ({}:{})", #call, ncclGetErrorString(r_), __FILE__, __LINE__)); \
  } while (0)

namespace longattn {
namespace {

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

class NcclRequest final : public CommRequest {
 public:
  NcclRequest(cudaEvent_t done, cudaStream_t caller) : done_(done), caller_(caller) {}
  ~NcclRequest() override { cudaEventDestroy(done_); }
  void wait() override { LA_CUDA_CHECK(cudaStreamWaitEvent(caller_, done_, 0)); }
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
    LA_CUDA_CHECK(cudaGetDeviceCount(&devices));
    LONGATTN_REQUIRE(devices > 0, ErrorCode::unsupported, "no CUDA device is visible to rank {}", host_.rank());
    if (topo.local_size > devices)
      logger(Subsystem::comm).warn("{} ranks share this node but only {} GPUs are visible: GPUs will be shared", topo.local_size, devices);
    device_ = topo.local_rank % devices;
    LA_CUDA_CHECK(cudaSetDevice(device_));
    ncclUniqueId id{};
    if (host_.rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    host_.broadcast(&id, sizeof id, 0);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    NCCL_CHECK(ncclCommInitRankConfig(&comm_, host_.size(), id, host_.rank(), &config));
    wait_ready("initializing the NCCL communicator");
    LA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LA_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    logger(Subsystem::comm).debug("NCCL communicator: rank {}/{} on GPU {}", host_.rank(), host_.size(), device_);
  }
  ~NcclCommunicator() override {
    // Never hang in a destructor: transfers still queued get the usual deadline, then the
    // communicator is aborted (which also ends its kernels) instead of finalized.
    if (comm_) {
      bool clean = !stream_ || drained(stream_, deadline());
      if (clean && ncclCommFinalize(comm_) == ncclInProgress) clean = settled(deadline());
      clean ? ncclCommDestroy(comm_) : ncclCommAbort(comm_);
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
    LA_CUDA_CHECK(cudaEventRecord(ready_, as_stream(stream)));
    LA_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    NCCL_CHECK(ncclGroupStart());
    for (const auto& op : ops) {
      if (op.kind == P2POp::Kind::send) NCCL_CHECK(ncclSend(op.buffer, op.bytes, ncclUint8, op.peer, comm_, stream_));
      else NCCL_CHECK(ncclRecv(op.buffer, op.bytes, ncclUint8, op.peer, comm_, stream_));
    }
    NCCL_CHECK(ncclGroupEnd());
    // Non-blocking: the group is enqueued on the stream only once NCCL says so (the first use of a
    // peer connects to it first, which needs that peer to post too).
    wait_ready("posting sends/receives (is every peer posting the matching operations?)");
    cudaEvent_t done;
    LA_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    LA_CUDA_CHECK(cudaEventRecord(done, stream_));
    return std::make_unique<NcclRequest>(done, as_stream(stream));
  }

  void alltoallv(const void* send, const std::vector<std::size_t>& send_bytes, const std::vector<std::size_t>& send_offsets,
                 void* recv, const std::vector<std::size_t>& recv_bytes, const std::vector<std::size_t>& recv_offsets,
                 void* stream) override {
    std::vector<P2POp> ops;
    for (int p = 0; p < size(); ++p) {
      const auto up = static_cast<std::size_t>(p);
      if (recv_bytes[up]) ops.push_back({P2POp::Kind::recv, static_cast<char*>(recv) + recv_offsets[up], recv_bytes[up], p, 0});
      if (send_bytes[up])
        ops.push_back({P2POp::Kind::send, const_cast<char*>(static_cast<const char*>(send)) + send_offsets[up], send_bytes[up], p, 0});
    }
    post(ops, stream)->wait();
  }

  // Host-side collectives: small values, through the bootstrap communicator.
  void allreduce(void* buf, std::size_t count, ReduceType type, ReduceOp op) override { host_.allreduce(buf, count, type, op); }
  void allgather(const void* send, void* recv, std::size_t bytes_each) override { host_.allgather(send, recv, bytes_each); }
  void broadcast(void* buf, std::size_t bytes, int root) override { host_.broadcast(buf, bytes, root); }
  void barrier() override { host_.barrier(); }

  std::unique_ptr<Communicator> split(int color, int key) const override {
    auto sub_host = host_.split(color, key);
    Communicator& ref = *sub_host;
    return std::make_unique<NcclCommunicator>(ref, std::move(sub_host));
  }

  void synchronize(void* stream) override {
    const auto limit = deadline();
    for (;;) {
      const cudaError_t q = cudaStreamQuery(as_stream(stream));
      const cudaError_t qc = cudaStreamQuery(stream_);
      if (q == cudaSuccess && qc == cudaSuccess) return;
      if (q != cudaErrorNotReady && q != cudaSuccess) LA_CUDA_CHECK(q);
      if (qc != cudaErrorNotReady && qc != cudaSuccess) LA_CUDA_CHECK(qc);
      check_alive();
      if (std::chrono::steady_clock::now() > limit) fail_timeout("waiting for transfers to finish");
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

 private:
  static std::chrono::steady_clock::time_point deadline() {
    return std::chrono::steady_clock::now() + std::chrono::seconds(env_int("LONGATTN_COMM_TIMEOUT_S"));
  }
  static bool drained(cudaStream_t s, std::chrono::steady_clock::time_point limit) {
    while (cudaStreamQuery(s) == cudaErrorNotReady) {
      if (std::chrono::steady_clock::now() > limit) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return true;
  }
  // Polls a non-blocking operation of the communicator until it settles; false on error or timeout.
  bool settled(std::chrono::steady_clock::time_point limit) {
    for (;;) {
      ncclResult_t st = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess) return false;
      if (st == ncclSuccess) return true;
      if (st != ncclInProgress || std::chrono::steady_clock::now() > limit) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  // Waits for the communicator's last operation with the deadline; an error or timeout aborts it.
  void wait_ready(const char* what) {
    const auto limit = deadline();
    for (;;) {
      check_alive();  // throws on an asynchronous error
      ncclResult_t st = ncclSuccess;
      NCCL_CHECK(ncclCommGetAsyncError(comm_, &st));
      if (st == ncclSuccess) return;
      if (std::chrono::steady_clock::now() > limit) fail_timeout(what);
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  [[noreturn]] void fail_timeout(const char* what) {
    aborted_ = true;
    ncclCommAbort(comm_);
    comm_ = nullptr;
    throw Error(ErrorCode::timeout, fmt::format("NCCL: {} did not finish within {} s (LONGATTN_COMM_TIMEOUT_S); a peer is dead, stuck, "
                                                "or running with different arguments",
                                                what, env_int("LONGATTN_COMM_TIMEOUT_S")));
  }

  void check_alive() {
    LONGATTN_REQUIRE(comm_, ErrorCode::communication, "the NCCL communicator was aborted after an earlier failure");
    ncclResult_t async = ncclSuccess;
    NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
    if (async != ncclSuccess && async != ncclInProgress) {
      aborted_ = true;
      ncclCommAbort(comm_);
      comm_ = nullptr;
      throw Error(ErrorCode::communication, fmt::format("NCCL reported an asynchronous error: {} (a peer failed?)", ncclGetErrorString(async)));
    }
  }

  Communicator& host_;
  std::unique_ptr<Communicator> owned_host_;
  int device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  bool aborted_ = false;
};

}  // namespace

bool nccl_available() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host) { return std::make_unique<NcclCommunicator>(host); }

}  // namespace longattn
