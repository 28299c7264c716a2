// The ring strategy as a plan: P steps per rank; at step s rank r computes its queries against the
// key/value shard of rank (r - s) mod P while passing that shard on to r + 1 and receiving the next
// from r - 1. Works for any ShardPlan (contiguous, zigzag, striped; packed varlen batches).
#pragma once

#include "longattn/layout.hpp"
#include "partition/plan.hpp"

namespace longattn::partition {

// Causal steps are cut per sequence into plain blocks by causal_step_blocks (fully visible, or
// causal by index); a step whose shards do not split into few blocks gets one positions call per
// sequence; a sequence whose keys are all hidden from the queries gets no call. Without a causal
// mask every sequence is one unmasked call per step. q_heads % kv_heads must be 0.
Plan ring_plan(const ShardPlan& shards, bool causal, int q_heads = 1, int kv_heads = 1);

// One rank's part of ring_plan, for a rank that executes only its own: the same steps, in time
// that grows with the ranks and sequences but not with the other ranks' plans.
RankPlan ring_rank_plan(const ShardPlan& shards, bool causal, int rank, int q_heads = 1, int kv_heads = 1);

}  // namespace longattn::partition
