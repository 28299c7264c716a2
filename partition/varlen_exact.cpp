// The exact varlen plan over the hierarchical planner's groups, by branch and bound: sequences
// longest first, every aligned group of every size tried, a branch cut as soon as its slowest rank,
// or the mean load it must reach, is no better than the best plan found. Exponential: tests use it
// on a handful of sequences to bound the greedy's gap.
#include <algorithm>
#include <limits>
#include <vector>

#include "common/check.hpp"
#include "partition/varlen_cost.hpp"
#include "partition/varlen_groups.hpp"
#include "partition/varlen_planner.hpp"
#include "partition/varlen_timer.hpp"

namespace longattn::partition {
namespace {

class BranchAndBound {
 public:
  BranchAndBound(const VarlenProblem& problem, SequenceGroupCosts& costs)
      : problem_(problem), costs_(costs), order_(longest_first(problem.lengths)) {
    cap_ = problem.cap_tokens > 0 ? problem.cap_tokens : std::numeric_limits<std::int64_t>::max();
    loads_.assign(static_cast<std::size_t>(problem.ranks), 0.0);
    tokens_.assign(static_cast<std::size_t>(problem.ranks), 0);
    slots_.assign(problem.lengths.size(), GroupSlot{});
    // The least total work each suffix of the order still adds, for the mean-load bound.
    remaining_work_.assign(order_.size() + 1, 0.0);
    for (std::size_t j = order_.size(); j-- > 0;) {
      double least = std::numeric_limits<double>::infinity();
      for (std::size_t i = 0; i < costs.sizes().size(); ++i)
        least = std::min(least, costs(order_[j], static_cast<int>(i)) * costs.sizes()[i]);
      remaining_work_[j] = remaining_work_[j + 1] + least;
    }
  }

  SlotPlacement solve(SlotPlacement start) {
    best_ = std::move(start);
    search(0, 0.0, 0.0);
    return best_;
  }

 private:
  void search(std::size_t j, double slowest, double total_load) {
    if (std::max(slowest, (total_load + remaining_work_[j]) / problem_.ranks) >= best_.makespan) return;
    if (j == order_.size()) {
      best_ = {slots_, slowest};
      return;
    }
    const int s = order_[j];
    for (std::size_t i = 0; i < costs_.sizes().size(); ++i) {
      const int size = costs_.sizes()[i];
      const double seconds = costs_(s, static_cast<int>(i));
      const int groups = groups_of_size(problem_.ranks, problem_.gpus_per_node, size);
      for (int g = 0; g < groups; ++g) {
        const int first = g * size;
        double group_slowest = slowest;
        bool fits = true;
        for (int u = 0; u < size && fits; ++u) {
          const auto r = static_cast<std::size_t>(first + u);
          group_slowest = std::max(group_slowest, loads_[r] + seconds);
          fits = tokens_[r] + costs_.member_tokens(s, static_cast<int>(i)) <= cap_;
        }
        if (!fits || group_slowest >= best_.makespan) continue;
        const std::int64_t tokens = costs_.member_tokens(s, static_cast<int>(i));
        apply(first, size, seconds, tokens, +1);
        slots_[static_cast<std::size_t>(s)] = {first, size};
        search(j + 1, group_slowest, total_load + seconds * size);
        apply(first, size, seconds, tokens, -1);
      }
    }
  }

  void apply(int first, int size, double seconds, std::int64_t member_tokens, int sign) {
    for (int u = 0; u < size; ++u) {
      const auto r = static_cast<std::size_t>(first + u);
      loads_[r] += sign * seconds;
      tokens_[r] += sign * member_tokens;
    }
  }

  const VarlenProblem& problem_;
  SequenceGroupCosts& costs_;
  std::vector<int> order_;
  std::int64_t cap_ = 0;
  std::vector<double> loads_;
  std::vector<std::int64_t> tokens_;
  std::vector<GroupSlot> slots_;
  std::vector<double> remaining_work_;
  SlotPlacement best_;
};

}  // namespace

VarlenPlan plan_exact(const VarlenProblem& problem, const MachineModel& machine, int max_sequences) {
  const PlannerTimer timer;
  check_problem(problem);
  LONGATTN_INVALID(static_cast<int>(problem.lengths.size()) <= max_sequences,
                   "the exact planner takes at most {} sequences (its time grows exponentially), got {}: use "
                   "plan_hierarchical",
                   max_sequences, problem.lengths.size());
  SequenceGroupCosts costs(problem, machine);
  // The greedy's placement is the first bound; the search keeps it unless it finds a better one.
  auto greedy = hierarchical_placement(problem, costs);
  greedy.makespan *= 1 + 1e-12;
  const auto best = BranchAndBound(problem, costs).solve(std::move(greedy));
  auto plan = assemble_ring_plan("exact", problem, machine, best.slots);
  plan.planner_ms = timer.elapsed_ms();
  return plan;
}

}  // namespace longattn::partition
