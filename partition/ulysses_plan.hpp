// The Ulysses (head-parallel) strategy as a plan: an all-to-all turns each rank's sequence shard of
// q, k and v into whole sequences for a share of the heads, local attention runs on them, and a
// second all-to-all turns o and lse back into sequence shards. Shards may be uneven (all-to-allv
// counts); packed varlen batches work, since after the exchange every rank holds the whole batch in
// global token order.
#pragma once

#include <string>

#include "longattn/layout.hpp"
#include "partition/plan.hpp"

namespace longattn::partition {

// The query heads rank `rank` of a group of `world` computes: the rank-th of world equal slices.
HeadRange ulysses_q_heads(int q_heads, int world, int rank);

// The key/value heads that rank reads: exactly those its query heads map to under GQA. With fewer
// kv heads than ranks (or slices that straddle a kv group) a kv head is replicated, but only onto
// the ranks whose query heads read it, which is the fewest that can compute them. What that costs:
// every rank receives T x ulysses_kv_heads(...).count token-heads of k and of v (T tokens in the
// batch), so the k/v exchange moves 2 x T x head_dim x dtype_bytes x (sum over ranks of that count)
// bytes instead of 2 x T x head_dim x dtype_bytes x kv_heads without replication; for MQA on P ranks
// that is P times the single head, the same per rank as one unshared kv head each. In the
// backward the replicas' dk/dv must be summed on the way home.
HeadRange ulysses_kv_heads(int q_heads, int kv_heads, int world, int rank);

// The group sizes Ulysses can use for this many query heads (its divisors), as "1, 2, 4, 8".
std::string valid_ulysses_group_sizes(int q_heads);

// The hybrid plan (hybrid_plan.hpp) with one group of all ranks: `shards` must be the two-level
// ShardPlan(cu_seqlens, layout, world, world), which holds the batch in global order cut into world
// contiguous slices, so the exchange needs no permutation (the layout does not matter with one
// group). Throws Error(invalid_argument) naming the valid group sizes when q_heads % world != 0,
// when the kv heads and the world do not divide one another (hybrid_heads_unsupported_reason), and
// on one-level shards of more than one rank. Two steps per rank: step 0 exchanges q, k, v and runs
// one call per non-empty sequence on the rank's heads (causal by index, or unmasked); step 1
// exchanges o and lse back.
Plan ulysses_plan(const ShardPlan& shards, bool causal, int q_heads, int kv_heads);

// One rank's part of ulysses_plan (the same checks), for a rank that executes only its own.
RankPlan ulysses_rank_plan(const ShardPlan& shards, bool causal, int rank, int q_heads, int kv_heads);

}  // namespace longattn::partition
