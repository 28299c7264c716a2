// Communicator pieces common to every backend: batched point-to-point by default, and the cheap
// agreement check of arguments across ranks (a 64-bit hash compared by min/max reduction; only if
// they differ are the short values gathered to name who disagrees).
#include <functional>
#include <vector>

#include "common/check.hpp"
#include "longattn/communicator.hpp"

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

}  // namespace longattn
