// Communicator pieces common to every backend: batched point-to-point by default, and the cheap
// agreement check of arguments across ranks (a 64-bit hash compared by min/max reduction; only if
// they differ are the short values gathered to name who disagrees).
#include <functional>
#include <vector>

#include "common/check.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"

namespace longattn {

namespace {
// Completion of a batch posted as separate requests.
class BatchRequest final : public CommRequest {
 public:
  explicit BatchRequest(std::vector<Request> parts) : parts_(std::move(parts)) {}
  void wait() override {
    for (auto& r : parts_) r->wait();
  }
  bool test() override {
    bool done = true;
    for (auto& r : parts_) done = r->test() && done;
    return done;
  }

 private:
  std::vector<Request> parts_;
};
}  // namespace

Communicator::Communicator() : timeout_(env_int("LONGATTN_COMM_TIMEOUT_S")) {}

void Communicator::set_timeout(std::chrono::seconds limit) {
  LONGATTN_INVALID(limit.count() > 0, "a communicator's timeout must be at least 1 s, got {} s", limit.count());
  timeout_ = limit;
}

Request Communicator::post(const std::vector<P2POp>& ops, void* stream) {
  std::vector<Request> parts;
  parts.reserve(ops.size());
  // Receives first, so that a peer's matching send finds a posted buffer.
  for (const auto& op : ops)
    if (op.kind == P2POp::Kind::recv) parts.push_back(irecv(op.buffer, op.bytes, op.peer, op.tag, stream));
  for (const auto& op : ops)
    if (op.kind == P2POp::Kind::send) parts.push_back(isend(op.buffer, op.bytes, op.peer, op.tag, stream));
  return std::make_unique<BatchRequest>(std::move(parts));
}

void Communicator::alltoallv(const void* send, const std::vector<std::size_t>& send_bytes,
                             const std::vector<std::size_t>& send_offsets, void* recv,
                             const std::vector<std::size_t>& recv_bytes, const std::vector<std::size_t>& recv_offsets,
                             void* stream) {
  const auto n = static_cast<std::size_t>(size());
  LONGATTN_INVALID(send_bytes.size() == n && send_offsets.size() == n && recv_bytes.size() == n && recv_offsets.size() == n,
                   "alltoallv needs {} counts and offsets per direction", n);
  // A tag of its own, so that the exchange cannot match a point-to-point message the caller has
  // pending. Empty pieces are not posted: both sides of a pair know its size, so both skip it.
  constexpr int kAlltoallvTag = 0x7a11;
  std::vector<P2POp> ops;
  for (std::size_t p = 0; p < n; ++p) {
    const int peer = static_cast<int>(p);
    if (recv_bytes[p]) ops.push_back({P2POp::Kind::recv, static_cast<char*>(recv) + recv_offsets[p], recv_bytes[p], peer, kAlltoallvTag});
    if (send_bytes[p])
      ops.push_back({P2POp::Kind::send, const_cast<char*>(static_cast<const char*>(send)) + send_offsets[p], send_bytes[p], peer,
                     kAlltoallvTag});
  }
  post(ops, stream)->wait();
}

void require_same_on_all_ranks(Communicator& comm, const std::string& what, const std::string& value) {
  const auto h = static_cast<std::int64_t>(std::hash<std::string>{}(value) >> 1);
  std::int64_t lo = h, hi = h;
  comm.allreduce(&lo, 1, ReduceType::i64, ReduceOp::min);
  comm.allreduce(&hi, 1, ReduceType::i64, ReduceOp::max);
  if (lo == hi) return;
  constexpr std::size_t kShown = 200;
  std::vector<char> mine(kShown, '\0'), all(kShown * static_cast<std::size_t>(comm.size()));
  value.copy(mine.data(), kShown - 1);
  comm.allgather(mine.data(), all.data(), kShown);
  std::string detail;
  for (int r = 0; r < comm.size() && r < 8; ++r)
    detail += fmt::format("{}rank {}: {}", r ? "; " : "", r, std::string(all.data() + static_cast<std::size_t>(r) * kShown));
  throw Error(ErrorCode::invalid_argument,
              fmt::format("{} differ between ranks ({}); launch every rank with the same arguments", what, detail));
}

void refuse_on_every_rank_if_any(Communicator& comm, const std::string& local_problem) {
  std::int64_t first_bad = local_problem.empty() ? comm.size() : comm.rank();
  comm.allreduce(&first_bad, 1, ReduceType::i64, ReduceOp::min);
  if (first_bad == comm.size()) return;
  // A fixed-size slot per rank keeps the gather one call.
  constexpr std::size_t kShown = 400;
  std::vector<char> mine(kShown, '\0'), all(kShown * static_cast<std::size_t>(comm.size()));
  local_problem.copy(mine.data(), kShown - 1);
  comm.allgather(mine.data(), all.data(), kShown);
  const std::string message(all.data() + static_cast<std::size_t>(first_bad) * kShown);
  throw Error(ErrorCode::invalid_argument, comm.size() > 1 ? fmt::format("rank {}: {}", first_bad, message) : message);
}

}  // namespace longattn
