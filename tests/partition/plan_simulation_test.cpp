// The plan simulation itself, on hand-made plans: a causal call with an offset means "key row j
// visible to query row i iff j <= i + offset", and a pair the mask forbids is counted when computed.
#include <gtest/gtest.h>

#include <random>

#include "plan_simulation.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using partition::KernelCall;
using partition::MaskKind;

// One rank, one sequence of `len` tokens: the first `split` query rows causal from key row 0, the
// rest causal with the keys shifted by `split` (an offset), which together is the causal mask.
partition::Plan split_causal_plan(std::int64_t len, std::int64_t split) {
  partition::Plan plan;
  plan.causal = true;
  plan.ranks.resize(1);
  auto& step = plan.ranks[0].steps.emplace_back();
  step.key_shard = 0;
  step.calls.push_back(KernelCall{0, split, 0, split, MaskKind::causal_by_index, 0, {0, 1}});
  step.calls.push_back(KernelCall{split, len - split, 0, len, MaskKind::causal_by_index, split, {0, 1}});
  return plan;
}

TEST(PlanSimulation, CausalOffsetShiftsTheKeys) {
  std::mt19937_64 rng(test::fresh_seed());
  const auto len = static_cast<std::int32_t>(3 + rng() % 40);
  const auto split = static_cast<std::int64_t>(1 + rng() % static_cast<std::uint64_t>(len - 1));
  SCOPED_TRACE(testing::Message() << "len " << len << ", split " << split);
  const ShardPlan shards = ShardPlan::single_sequence(len, Layout::contiguous, 1);
  auto cov = test::simulate_plan(split_causal_plan(len, split), shards);
  test::expect_every_allowed_pair_once(cov, shards, true);
}

TEST(PlanSimulation, CountsAForbiddenPair) {
  std::mt19937_64 rng(test::fresh_seed());
  const auto len = static_cast<std::int32_t>(3 + rng() % 40);
  const ShardPlan shards = ShardPlan::single_sequence(len, Layout::contiguous, 1);
  auto plan = split_causal_plan(len, 1);
  plan.ranks[0].steps[0].calls[1].causal_offset += 1;  // every query of the second call sees one key too many
  const auto cov = test::simulate_plan(plan, shards);
  for (std::int64_t i = 1; i + 1 < len; ++i) EXPECT_EQ(cov.times[static_cast<std::size_t>(i * len + i + 1)], 1) << "query " << i;
  EXPECT_EQ(cov.pairs_of_rank[0], std::int64_t{len} * (len + 1) / 2 + (len - 2));
}

}  // namespace
}  // namespace longattn
