// See rank_agreement.hpp.
#include "capi/rank_agreement.hpp"

#include <fmt/format.h>

#include <cstdint>
#include <vector>

#include "longattn/error.hpp"

namespace longattn::capi {

void refuse_on_every_rank_if_any(Communicator& comm, const std::string& local_problem) {
  std::int64_t first_bad = local_problem.empty() ? comm.size() : comm.rank();
  comm.allreduce(&first_bad, 1, ReduceType::i64, ReduceOp::min);
  if (first_bad == comm.size()) return;
  // A fixed slot per rank keeps the gather one call; a longer message is cut.
  constexpr std::size_t kShown = 400;
  std::vector<char> mine(kShown, '\0'), all(kShown * static_cast<std::size_t>(comm.size()));
  local_problem.copy(mine.data(), kShown - 1);
  comm.allgather(mine.data(), all.data(), kShown);
  const std::string message(all.data() + static_cast<std::size_t>(first_bad) * kShown);
  throw Error(ErrorCode::invalid_argument, comm.size() > 1 ? fmt::format("rank {}: {}", first_bad, message) : message);
}

}  // namespace longattn::capi
