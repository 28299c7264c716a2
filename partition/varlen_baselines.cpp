// Two of the baselines the hierarchical plan is measured against, as plans of the same structure:
// TransformerEngine's per-sequence zigzag over all ranks, and whole sequences packed greedily.
#include <functional>
#include <limits>
#include <queue>
#include <utility>
#include <vector>

#include "common/check.hpp"
#include "partition/varlen_cost.hpp"
#include "partition/varlen_groups.hpp"
#include "partition/varlen_planner.hpp"
#include "partition/varlen_timer.hpp"

namespace longattn::partition {

VarlenPlan plan_per_sequence_zigzag(const VarlenProblem& problem, const MachineModel& machine) {
  const PlannerTimer timer;
  check_problem(problem);
  VarlenPlan plan;
  plan.planner = "per-sequence-zigzag";
  plan.ranks = problem.ranks;
  plan.gpus_per_node = problem.gpus_per_node;
  plan.lengths = problem.lengths;
  VarlenGroup all{0, problem.ranks, 1, tier_of_group(problem.ranks, problem.gpus_per_node),
                  problem.ranks == 1 ? Sharding::whole : Sharding::zigzag, {}};
  const std::int64_t multiple = 2LL * problem.ranks;
  for (std::size_t s = 0; s < problem.lengths.size(); ++s) {
    all.sequences.push_back(static_cast<int>(s));
    const std::int64_t length = problem.lengths[s];
    if (problem.ranks > 1 && length % multiple != 0) plan.padding_tokens += multiple - length % multiple;
  }
  plan.groups.push_back(std::move(all));
  plan.group_of.assign(problem.lengths.size(), 0);
  price_ring_groups(plan, machine, problem.shape);
  LONGATTN_INVALID(problem.cap_tokens == 0 || plan.max_rank_tokens() <= problem.cap_tokens,
                   "per-sequence zigzag puts {} tokens on one rank, over the cap of {}: raise the cap",
                   plan.max_rank_tokens(), problem.cap_tokens);
  plan.planner_ms = timer.elapsed_ms();
  return plan;
}

VarlenPlan plan_whole_sequences(const VarlenProblem& problem, const MachineModel& machine) {
  const PlannerTimer timer;
  check_problem(problem);
  SequenceGroupCosts costs(problem, machine);
  const std::int64_t cap = problem.cap_tokens > 0 ? problem.cap_tokens : std::numeric_limits<std::int64_t>::max();
  std::vector<std::int64_t> tokens(static_cast<std::size_t>(problem.ranks), 0);
  using Entry = std::pair<double, int>;  // (load, rank): the least loaded rank, lowest number on ties
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> ranks;
  for (int r = 0; r < problem.ranks; ++r) ranks.push({0.0, r});
  std::vector<GroupSlot> slots(problem.lengths.size());
  std::vector<Entry> full;
  for (const int s : longest_first(problem.lengths)) {
    const std::int64_t length = problem.lengths[static_cast<std::size_t>(s)];
    full.clear();
    while (!ranks.empty() && tokens[static_cast<std::size_t>(ranks.top().second)] > cap - length) {
      full.push_back(ranks.top());
      ranks.pop();
    }
    LONGATTN_INVALID(!ranks.empty(),
                     "whole sequences: sequence {} ({} tokens) fits on no rank under the cap of {} tokens; raise the cap",
                     s, length, cap);
    auto [load, rank] = ranks.top();
    ranks.pop();
    tokens[static_cast<std::size_t>(rank)] += length;
    ranks.push({load + costs(s, 0), rank});
    for (const auto& entry : full) ranks.push(entry);
    slots[static_cast<std::size_t>(s)] = {rank, 1};
  }
  auto plan = assemble_ring_plan("whole-sequences", problem, machine, slots);
  plan.planner_ms = timer.elapsed_ms();
  return plan;
}

}  // namespace longattn::partition
