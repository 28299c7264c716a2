// The MPI communicator: host buffers (or CUDA-aware MPI), nonblocking point to point with
// deadlines, collectives. Messages over 1 GiB are split, because MPI counts are ints.
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cstdlib>
#include <thread>
#include <vector>

#include "common/check.hpp"
#include "comm/topology.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"
#include "longattn/log.hpp"

namespace longattn::comm {

namespace {

constexpr std::size_t kMaxChunk = std::size_t{1} << 30;

// Open MPI moves a large message only while some thread is inside the library ("OMPI progress:
// no"), so a transfer posted before a long kernel would otherwise wait for MPI_Wait. While
// requests are outstanding, this thread pokes the progress engine (MPI_Iprobe) every few tens of
// microseconds, so the next ring shard really is in flight during the compute. Needs
// MPI_THREAD_MULTIPLE; LONGATTN_MPI_PROGRESS=0 turns it off.
class ProgressThread {
 public:
  explicit ProgressThread(MPI_Comm comm) : comm_(comm) {}
  ~ProgressThread() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  void begin() {
    std::lock_guard lock(mu_);
    if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
    ++active_;
    cv_.notify_all();
  }
  void end() {
    std::lock_guard lock(mu_);
    --active_;
  }

 private:
  void loop() {
    std::unique_lock lock(mu_);
    while (!stop_) {
      cv_.wait(lock, [&] { return stop_ || active_ > 0; });
      while (!stop_ && active_ > 0) {
        lock.unlock();
        int flag = 0;
        MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, MPI_STATUS_IGNORE);
        std::this_thread::sleep_for(std::chrono::microseconds(30));
        lock.lock();
      }
    }
  }
  MPI_Comm comm_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  int active_ = 0;
  bool stop_ = false;
};

class MpiRequest final : public CommRequest {
 public:
  MpiRequest(std::vector<MPI_Request> reqs, std::string what, ProgressThread* progress, std::chrono::seconds timeout)
      : reqs_(std::move(reqs)), what_(std::move(what)), progress_(progress), timeout_(timeout) {
    if (progress_) progress_->begin();
  }
  ~MpiRequest() override {
    release();
    // A request dropped unfinished (an exception unwound past it) must not leave MPI writing into
    // freed memory: cancel what can be cancelled.
    for (auto& r : reqs_) {
      if (r != MPI_REQUEST_NULL) {
        MPI_Cancel(&r);
        MPI_Request_free(&r);
      }
    }
  }
  bool test() override {
    int done = 0;
    LONGATTN_MPI_CHECK(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &done, MPI_STATUSES_IGNORE));
    if (done) release();
    return done != 0;
  }
  void wait() override {
    // Poll with a deadline instead of MPI_Waitall, so a dead or mismatched peer becomes an error.
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    int spins = 0;
    while (!test()) {
      if (std::chrono::steady_clock::now() > deadline)
        throw Error(ErrorCode::timeout, fmt::format("{} did not complete within {} s (LONGATTN_COMM_TIMEOUT_S); is a peer "
                                                    "dead or running with different arguments?", what_, timeout_.count()));
      if (++spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  void release() {
    if (progress_) progress_->end();
    progress_ = nullptr;
  }
  std::vector<MPI_Request> reqs_;
  std::string what_;
  ProgressThread* progress_;
  std::chrono::seconds timeout_;
};

MPI_Datatype mpi_type(ReduceType t) {
  switch (t) {
    case ReduceType::f32: return MPI_FLOAT;
    case ReduceType::f64: return MPI_DOUBLE;
    case ReduceType::i64: return MPI_INT64_T;
  }
  return MPI_BYTE;
}
MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  return MPI_SUM;
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    LONGATTN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    LONGATTN_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    LONGATTN_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    topo_ = discover_topology(comm_);
    int level = 0;
    MPI_Query_thread(&level);
    if (level == MPI_THREAD_MULTIPLE && env_int("LONGATTN_MPI_PROGRESS") != 0) progress_ = std::make_unique<ProgressThread>(comm_);
  }
  ~MpiCommunicator() override {
    progress_.reset();
    if (owned_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "mpi"; }
  Topology topology() const override { return topo_; }

  Request isend(const void* buf, std::size_t bytes, int peer, int tag, void*) override {
    check_peer(peer);
    return post_chunks(const_cast<void*>(buf), bytes, [&](char* chunk, int n, MPI_Request* req) {
      LONGATTN_MPI_CHECK(MPI_Isend(chunk, n, MPI_BYTE, peer, tag, comm_, req));
    }, fmt::format("send of {} bytes to rank {}", bytes, peer));
  }
  Request irecv(void* buf, std::size_t bytes, int peer, int tag, void*) override {
    check_peer(peer);
    return post_chunks(buf, bytes, [&](char* chunk, int n, MPI_Request* req) {
      LONGATTN_MPI_CHECK(MPI_Irecv(chunk, n, MPI_BYTE, peer, tag, comm_, req));
    }, fmt::format("receive of {} bytes from rank {}", bytes, peer));
  }

  void allreduce(void* buf, std::size_t count, ReduceType type, ReduceOp op) override {
    LONGATTN_INVALID(count < (std::size_t{1} << 31), "allreduce of {} elements exceeds MPI's int count", count);
    LONGATTN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, static_cast<int>(count), mpi_type(type), mpi_op(op), comm_));
  }
  void allgather(const void* send, void* recv, std::size_t bytes_each) override {
    LONGATTN_INVALID(bytes_each < (std::size_t{1} << 31), "allgather of {} bytes per rank exceeds MPI's int count", bytes_each);
    LONGATTN_MPI_CHECK(MPI_Allgather(send, static_cast<int>(bytes_each), MPI_BYTE, recv, static_cast<int>(bytes_each), MPI_BYTE, comm_));
  }
  void broadcast(void* buf, std::size_t bytes, int root) override {
    LONGATTN_INVALID(bytes < (std::size_t{1} << 31), "broadcast of {} bytes exceeds MPI's int count", bytes);
    LONGATTN_MPI_CHECK(MPI_Bcast(buf, static_cast<int>(bytes), MPI_BYTE, root, comm_));
  }
  void barrier() override { LONGATTN_MPI_CHECK(MPI_Barrier(comm_)); }

  std::unique_ptr<Communicator> split(int color, int key) const override {
    MPI_Comm sub;
    LONGATTN_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
    auto child = std::make_unique<MpiCommunicator>(sub, true);
    child->set_timeout(timeout());
    return child;
  }

 private:
  // One MPI request per chunk of at most kMaxChunk bytes (MPI counts are ints); an empty message
  // is still one request, so that the peer's matching call completes.
  template <class PostChunk>
  Request post_chunks(void* buf, std::size_t bytes, PostChunk&& post_chunk, std::string what) {
    std::vector<MPI_Request> reqs;
    auto* p = static_cast<char*>(buf);
    std::size_t off = 0;
    do {
      reqs.emplace_back();
      post_chunk(p + off, static_cast<int>(std::min(kMaxChunk, bytes - off)), &reqs.back());
      off += kMaxChunk;
    } while (off < bytes);
    return std::make_unique<MpiRequest>(std::move(reqs), std::move(what), progress_.get(), timeout());
  }
  void check_peer(int peer) const {
    LONGATTN_INVALID(peer >= 0 && peer < size_, "peer rank {} is outside [0, {})", peer, size_);
  }
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
  Topology topo_;
  std::unique_ptr<ProgressThread> progress_;
};

}  // namespace
}  // namespace longattn::comm

namespace longattn {

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  int provided = 0;
  LONGATTN_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
  owns_ = true;
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  set_log_rank(rank);
  if (provided < MPI_THREAD_MULTIPLE)
    logger(Subsystem::comm).debug("MPI provides thread level {} (< MULTIPLE); communication stays on one thread", provided);
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) MPI_Finalize();
}

void MpiSession::abort(int exit_code) {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

std::unique_ptr<Communicator> make_mpi_world_communicator() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  LONGATTN_REQUIRE(initialized, ErrorCode::invalid_argument, "MPI is not initialized: create a longattn::MpiSession first");
  return std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD, false);
}

std::unique_ptr<Communicator> make_mpi_communicator(std::int64_t mpi_fortran_handle) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  LONGATTN_REQUIRE(initialized, ErrorCode::invalid_argument, "MPI is not initialized: initialize it before passing a communicator");
  const MPI_Comm given = MPI_Comm_f2c(static_cast<MPI_Fint>(mpi_fortran_handle));
  LONGATTN_INVALID(given != MPI_COMM_NULL, "the MPI communicator handle {} is MPI_COMM_NULL", mpi_fortran_handle);
  // A duplicate of our own: our messages cannot match the caller's, and the caller may free theirs.
  MPI_Comm own;
  LONGATTN_MPI_CHECK(MPI_Comm_dup(given, &own));
  return std::make_unique<comm::MpiCommunicator>(own, true);
}

}  // namespace longattn
