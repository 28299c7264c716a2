// See ulysses_plan.hpp. The head shares of a group; the plan itself is the hybrid plan's with one
// group, so the two strategies cannot drift apart.
#include "partition/ulysses_plan.hpp"

#include "common/check.hpp"
#include "partition/hybrid_plan.hpp"

namespace longattn::partition {

HeadRange ulysses_q_heads(int q_heads, int world, int rank) {
  const int per_rank = q_heads / world;
  return {rank * per_rank, per_rank};
}

HeadRange ulysses_kv_heads(int q_heads, int kv_heads, int world, int rank) {
  const HeadRange q = ulysses_q_heads(q_heads, world, rank);
  if (q.count == 0) return {};
  const int group = q_heads / kv_heads;  // query heads per kv head
  const int first = q.begin / group, last = (q.begin + q.count - 1) / group;
  return {first, last - first + 1};
}

std::string valid_ulysses_group_sizes(int q_heads) {
  std::string sizes;
  for (int d = 1; d <= q_heads; ++d)
    if (q_heads % d == 0) sizes += (sizes.empty() ? "" : ", ") + std::to_string(d);
  return sizes;
}

RankPlan ulysses_rank_plan(const ShardPlan& shards, bool causal, int rank, int q_heads, int kv_heads) {
  const int world = shards.world();
  LONGATTN_INVALID(q_heads >= 1 && kv_heads >= 1 && q_heads % kv_heads == 0,
                   "query heads ({}) must be a positive multiple of key/value heads ({})", q_heads, kv_heads);
  LONGATTN_INVALID(q_heads % world == 0,
                   "Ulysses splits the {} query heads over a group of {} ranks, which does not divide them: use a "
                   "group size of {} (or the ring strategy)",
                   q_heads, world, valid_ulysses_group_sizes(q_heads));
  LONGATTN_INVALID(shards.group_size() == world,
                   "the Ulysses plan runs on the two-level shards of one group of all {0} ranks, "
                   "ShardPlan(cu_seqlens, layout, {0}, {0}), not on groups of {1}: shard with that plan (or use the "
                   "hybrid plan for groups of {1})",
                   world, shards.group_size());
  return hybrid_rank_plan(shards, causal, rank, q_heads, kv_heads);
}

Plan ulysses_plan(const ShardPlan& shards, bool causal, int q_heads, int kv_heads) {
  Plan plan = whole_plan(Strategy::ulysses, shards.world(), causal, q_heads, kv_heads,
                         [&](int rank) { return ulysses_rank_plan(shards, causal, rank, q_heads, kv_heads); });
  plan.group_size = shards.world();
  return plan;
}

}  // namespace longattn::partition
