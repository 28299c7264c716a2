// Moving bytes between ranks: the communicator interface every distributed algorithm uses, with an
// MPI backend always present (NCCL where built). Nothing here knows about attention.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace longattn {

// Where this rank sits. Nodes come from shared-memory domains (hostnames) or, to simulate several
// nodes on one machine, from LONGATTN_NODE_SIZE (every N consecutive ranks form a node).
struct Topology {
  int node = 0;        // this rank's node id, 0..nodes-1
  int nodes = 1;
  int local_rank = 0;  // index among the ranks of this node
  int local_size = 1;
};

// A pending nonblocking operation. wait() returns once the buffer may be reused (send) or read
// (receive); on a GPU communicator "read" means: by work queued afterwards on the stream given to
// the call. wait() throws Error(timeout) after the communicator's timeout() instead of hanging.
class CommRequest {
 public:
  virtual ~CommRequest() = default;
  virtual void wait() = 0;
  virtual bool test() = 0;
};
using Request = std::unique_ptr<CommRequest>;

enum class ReduceOp { sum, max, min };

// One point-to-point operation of a batch (see Communicator::post).
struct P2POp {
  enum class Kind { send, recv } kind;
  void* buffer;  // const for sends
  std::size_t bytes;
  int peer;
  int tag;
};
enum class ReduceType { f32, f64, i64 };

class Communicator {
 public:
  virtual ~Communicator() = default;
  // How long one wait may block before it throws Error(timeout), so that a dead, stuck or
  // mismatched peer is reported instead of hanging the job: LONGATTN_COMM_TIMEOUT_S when the
  // communicator is made; split() passes it on. A request keeps the value it was posted with.
  std::chrono::seconds timeout() const noexcept { return timeout_; }
  void set_timeout(std::chrono::seconds limit);  // limit > 0

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend_name() const = 0;
  virtual Topology topology() const = 0;

  // `stream`: for stream-ordered (GPU) communicators, the stream whose queued work produces /
  // consumes the buffer. Host communicators ignore it.
  virtual Request isend(const void* buf, std::size_t bytes, int peer, int tag, void* stream = nullptr) = 0;
  virtual Request irecv(void* buf, std::size_t bytes, int peer, int tag, void* stream = nullptr) = 0;

  // Posts several sends and receives together and returns one request for all of them. Stream-
  // ordered communicators (NCCL) need this to avoid deadlock when two ranks send to each other:
  // ops of one batch progress together. Every rank must post matching batches in the same order.
  virtual Request post(const std::vector<P2POp>& ops, void* stream = nullptr);
  // Blocks until the communication queued for `stream` is done; detects peer failures and hangs
  // (Error(communication/timeout) after timeout()). A no-op for host communicators.
  virtual void synchronize(void* stream) {}

  // Byte counts and displacements per peer (size() entries each). By default one batch of
  // point-to-point operations (post) that the call waits for.
  virtual void alltoallv(const void* send, const std::vector<std::size_t>& send_bytes,
                         const std::vector<std::size_t>& send_offsets, void* recv,
                         const std::vector<std::size_t>& recv_bytes, const std::vector<std::size_t>& recv_offsets,
                         void* stream = nullptr);
  virtual void allreduce(void* buf, std::size_t count, ReduceType type, ReduceOp op) = 0;
  virtual void allgather(const void* send, void* recv, std::size_t bytes_each) = 0;
  virtual void broadcast(void* buf, std::size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Ranks with the same color form a new communicator, ordered by key.
  virtual std::unique_ptr<Communicator> split(int color, int key) const = 0;

 protected:
  Communicator();

 private:
  std::chrono::seconds timeout_;
};

// Initializes MPI (thread level MULTIPLE) on construction if nobody has, finalizes on destruction
// if it initialized. Create one at the top of main().
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  // Ends every process of the job (MPI_Abort): for errors after which peers could wait forever.
  [[noreturn]] static void abort(int exit_code);
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

 private:
  bool owns_ = false;
};

// A communicator over MPI_COMM_WORLD (MPI must be initialized, e.g. by MpiSession).
std::unique_ptr<Communicator> make_mpi_world_communicator();
// A communicator over a duplicate of the caller's MPI communicator, given by its Fortran handle
// (MPI_Comm_c2f), so that no MPI type appears in this header. Collective over that communicator.
std::unique_ptr<Communicator> make_mpi_communicator(std::int64_t mpi_fortran_handle);

// Launching without MPI: a communicator over TCP (host memory only), every rank connected to every
// other, bootstrapped from torchrun's environment. Rank 0 listens for the rendezvous at
// MASTER_PORT + port_offset (torch's own store may hold MASTER_PORT itself); the other ranks
// connect there, learn each other's addresses, and connect to each other. Nodes come from the
// ranks' host names (LONGATTN_NODE_SIZE overrides). Waits are bounded by LONGATTN_COMM_TIMEOUT_S,
// the rendezvous too; a peer whose connection breaks makes every operation with it fail with
// Error(communication) naming it.
struct TcpRendezvous {
  std::string master_addr;   // rank 0's host name or address
  int master_port = 0;       // where rank 0 listens for the rendezvous
  int rank = 0, world_size = 1;
  int local_rank = -1, local_world_size = -1;  // LOCAL_RANK, LOCAL_WORLD_SIZE when set, else -1
};
// Reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (required) and LOCAL_RANK, LOCAL_WORLD_SIZE
// (optional); throws Error(invalid_argument) naming the first one missing or malformed.
TcpRendezvous tcp_rendezvous_from_env(int port_offset = 1);
// True when MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE are all set (a torchrun launch).
bool torchrun_environment_present();
// Collective over the world_size processes of `where`.
std::unique_ptr<Communicator> make_tcp_communicator(const TcpRendezvous& where);
std::unique_ptr<Communicator> make_tcp_communicator_from_env(int port_offset = 1);

// NCCL on device buffers, one GPU per rank (picked from the local rank), bootstrapped through
// `host` (an MPI or TCP communicator, kept for host-side collectives and agreement checks). Throws
// Error(unsupported) when longattn was built without NCCL. `host` must outlive the result.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host);
bool nccl_available();

// In-process communicators for `ranks` ranks run as threads of one process (tests, experiments on
// one machine): element r is rank r. Host mode copies at once; stream-ordered mode (needs CUDA)
// copies device memory on a stream after both sides' streams reached the call, and completes
// through events, with the same semantics as the NCCL communicator. Each rank's object must be
// used by one thread; all of them must outlive their use.
std::vector<std::unique_ptr<Communicator>> make_local_communicators(int ranks, bool stream_ordered = false);

// Throws Error(invalid_argument) on every rank, naming the ranks that disagree, when `value`
// differs between ranks. Cheap (two integer reductions) when they agree: call it on arguments
// that every rank must share before starting collective work.
void require_same_on_all_ranks(Communicator& comm, const std::string& what, const std::string& value);

// Collective: for argument checks that one rank may fail alone, which would leave the others
// waiting in the next exchange until a timeout. `local_problem` is empty when this rank's arguments
// are fine, else what is wrong with them. When any rank has a problem, every rank throws
// Error(invalid_argument) with the lowest such rank's message (prefixed "rank r: " when there are
// several ranks; a long message is cut). One integer reduction when all is well.
void refuse_on_every_rank_if_any(Communicator& comm, const std::string& local_problem);

}  // namespace longattn
