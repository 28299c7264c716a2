// The U x R hybrid strategy as a plan, on a two-level ShardPlan (groups of U consecutive ranks, the
// layout over the R groups, contiguous slices inside a group). Per rank: an all-to-all inside the
// group turns its slice of q, k and v into the group's rows for the rank's share of the heads;
// then a ring over the groups among the ranks of the same member index (peers U ranks apart)
// passes the groups' key/value rows around, with the calls the ring plan of the group plan makes
// (zigzag over the ring dimension balances causal work), on the rank's heads; last, an
// all-to-all turns o and lse back into the rank's slice. U = world is Ulysses (one group, no
// ring), U = 1 a ring with no exchanges.
#pragma once

#include <string>

#include "longattn/layout.hpp"
#include "partition/plan.hpp"

namespace longattn::partition {

// Why a group of `group_size` ranks cannot split these heads, or empty when it can: it must divide
// the query heads, and the kv heads must divide it or be divisible by it (a rank then reads whole
// kv heads of its own, or one kv head shared with the members that read it too).
std::string hybrid_heads_unsupported_reason(int q_heads, int kv_heads, int group_size);

// The group sizes that can run these heads on `world` ranks, as "1, 2, 4, 8".
std::string valid_hybrid_group_sizes(int q_heads, int kv_heads, int world);

// One rank's part: R + 1 steps in RowSpace::group. Step 0 exchanges q, k, v inside the group
// (counts per global peer rank, zero outside the group, in token-heads: a member's slice times the
// heads the receiver computes, ulysses_q_heads / ulysses_kv_heads with world = U), steps 0..R-1
// are ring_rank_plan(shards.group_plan(), ...) for the rank's group with its transfers between
// ranks group_size apart and its calls on the rank's query heads, step R exchanges o and lse back.
// Throws Error(invalid_argument) naming the valid group sizes when the heads do not split (see
// hybrid_heads_unsupported_reason), and on query heads that are not a multiple of the kv heads.
RankPlan hybrid_rank_plan(const ShardPlan& shards, bool causal, int rank, int q_heads, int kv_heads);

// The whole plan (Strategy::hybrid, group_size = shards.group_size()), for tests and the cost model.
Plan hybrid_plan(const ShardPlan& shards, bool causal, int q_heads, int kv_heads);

}  // namespace longattn::partition
