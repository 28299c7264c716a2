// Cheap agreement check of arguments across ranks: compare a 64-bit hash by min/max reduction and
// only if they differ gather the (short) values to name who disagrees.
#include <functional>
#include <vector>

#include "common/check.hpp"
#include "longattn/communicator.hpp"

namespace longattn {

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
