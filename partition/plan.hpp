// Parallel attention strategies as plain data. A Plan says, for every rank, the steps it runs: the
// communication of each step (a ring send/receive of a key/value shard, or all-to-all(v) exchanges
// with per-peer counts) and the local kernel calls of each step (query rows against key rows under
// a mask). Plans are made once per shape by the generators (ring_plan.hpp, ulysses_plan.hpp,
// hybrid_plan.hpp) and
// are meant to be cached and executed by runtime/; being data, they are tested without devices by
// simulating which (query, key) pairs they compute. Pure: no devices, no communication.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace longattn::partition {

enum class MaskKind {
  none,             // every (query, key) pair of the call is visible
  causal_by_index,  // key row j visible to query row i iff j <= i + causal_offset (rows of the call)
  positions,        // key visible iff its position <= the query's position (the shards' positions)
};
const char* to_string(MaskKind kind) noexcept;

// Which rows a step's calls index.
enum class RowSpace {
  shards,    // queries: the rank's own shard rows; keys: rows of the shard named by Step::key_shard
  gathered,  // both: rows of the whole packed batch (global token order), after an all-to-all
  // After an all-to-all inside a group of Plan::group_size ranks (a two-level ShardPlan): queries:
  // the rows of the rank's own group in the group's order (its members' rows concatenated);
  // keys: the rows of group Step::key_shard, which travel a ring over the groups.
  group,
};

// A half-open range of global head numbers.
struct HeadRange {
  int begin = 0, count = 0;
  bool operator==(const HeadRange&) const = default;
};

// One local attention call. Query head h reads kv head h / (q_heads / kv_heads) (GQA), as everywhere.
struct KernelCall {
  std::int64_t q_begin = 0, q_count = 0;  // query rows
  std::int64_t k_begin = 0, k_count = 0;  // key/value rows
  MaskKind mask = MaskKind::none;
  std::int64_t causal_offset = 0;  // causal_by_index only
  HeadRange heads;                 // the query heads this call computes
  bool operator==(const KernelCall&) const = default;
};

// A ring step's transfer, posted together with the step's calls so that it hides behind them: the
// shard computed on now goes to the next rank while the shard of the next step arrives. Peers are
// ranks; shards are numbered as the step's row space numbers them (ranks, or groups for
// RowSpace::group, whose ring links the ranks of one member index, group_size apart).
struct RingTransfer {
  int send_to = 0, send_shard = 0;      // peer, and whose shard is sent
  int recv_from = 0, recv_shard = 0;    // peer, and whose shard arrives (the next step's keys)
  bool operator==(const RingTransfer&) const = default;
};

enum class PlanTensor { q, k, v, o, lse };
const char* to_string(PlanTensor tensor) noexcept;

// One all-to-all(v), finished before the step's calls run. Counts are in token-heads (one token of
// one head: head_dim elements of q, k, v or o, one element of lse), per peer rank.
struct AllToAll {
  PlanTensor tensor = PlanTensor::q;
  std::vector<std::int64_t> send_counts, recv_counts;  // [world]
  std::vector<HeadRange> send_heads, recv_heads;       // [world]: the heads sent to / received from each peer

  bool operator==(const AllToAll&) const = default;
};

struct Step {
  RowSpace rows = RowSpace::shards;
  int key_shard = -1;                   // shards: the rank whose key/value shard the calls read; group: the group
  std::optional<RingTransfer> ring;     // none on the last ring step and outside rings
  std::vector<AllToAll> all_to_all;     // exchanges completed before the calls
  std::vector<KernelCall> calls;

  bool operator==(const Step&) const = default;
};

struct RankPlan {
  std::vector<Step> steps;
  bool operator==(const RankPlan&) const = default;
};

enum class Strategy { ring, ulysses, hybrid };
const char* to_string(Strategy strategy) noexcept;

struct Plan {
  Strategy strategy = Strategy::ring;
  int world = 1;
  bool causal = false;
  int q_heads = 1, kv_heads = 1;
  std::vector<RankPlan> ranks;  // [world]
  int group_size = 1;           // ranks per all-to-all group (RowSpace::group): U of a U x R hybrid
};

// A whole plan from the generator of one rank's part (rank -> RankPlan): what each rank builds
// for itself, assembled for tests and the cost model.
template <class RankPlanOf>
Plan whole_plan(Strategy strategy, int world, bool causal, int q_heads, int kv_heads, RankPlanOf&& rank_plan_of) {
  Plan plan{strategy, world, causal, q_heads, kv_heads, {}};
  for (int r = 0; r < world; ++r) plan.ranks.push_back(rank_plan_of(r));
  return plan;
}

}  // namespace longattn::partition
