// The local attention launches one rank of a varlen plan runs, listed the way the executor runs
// them (varlen_attention.cpp): a one-rank group is one varlen call over its sequences; a ring or
// hybrid group runs, step by step, the ring plan's calls grouped into varlen launches
// (ring_launches.hpp), on the rank's shard (or, in a hybrid, its Ulysses group's rows and its share
// of the heads). What a one-GPU measurement of a plan times rank by rank, with no communication.
#pragma once

#include <cstdint>
#include <vector>

#include "partition/varlen_planner.hpp"

namespace longattn::runtime {

struct VarlenRankCall {
  int group = 0;         // index into plan.groups
  int step = 0;          // ring step (0 for a one-rank group)
  int key_shard = 0;     // ring member whose key/value shard the step reads (0 for a one-rank group)
  bool in_ring = false;  // a ring step: the executor accumulates dq, dk, dv in f32 buffers
  int head_begin = 0, query_heads = 0, kv_heads = 0;  // the query heads the call computes; kv heads it reads
  std::int64_t query_rows = 0;  // rows of the query tensor the call indexes (its q_begin is among them)
  std::int64_t key_rows = 0;    // rows of the key/value shard in hand at this step
  std::int64_t q_begin = 0, q_count = 0, k_begin = 0, k_count = 0;
  bool causal = false;  // causal by index inside each sequence of the call (key j visible iff j <= i)
  // Sequence offsets of a grouped launch (batch + 1 prefix sums from q_begin and k_begin); empty:
  // one sequence of all the call's rows.
  std::vector<std::int32_t> cu_q, cu_k;
  int max_seqlen_q = 0, max_seqlen_k = 0;
  int batch() const { return cu_q.empty() ? 1 : static_cast<int>(cu_q.size()) - 1; }
};

// Every launch `rank` runs for one forward of the plan, group by group in the plan's order (the
// backward runs the same launches). Refuses a chunked (flat-minheap) plan, which has no executor.
std::vector<VarlenRankCall> varlen_rank_calls(const partition::VarlenPlan& plan, int rank, int q_heads, int kv_heads,
                                              bool causal);

}  // namespace longattn::runtime
