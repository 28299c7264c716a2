// The variable-length planner: where each sequence of a packed batch runs. Short sequences stay
// whole on one rank (no communication, full-size kernel blocks), medium ones are split over a group
// of ranks inside one node (a zigzag ring on fast links), and only the longest span whole nodes.
// Sequences are placed so that the slowest rank's modelled step (attention forward and backward,
// linear layers, exposed ring communication) is as short as the model can find, within a per-rank
// token cap. The baselines the issue compares against are planners of the same output structure,
// so one cost evaluation and one set of checks serve them all. Pure: no devices, no communication.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "longattn/layout.hpp"
#include "partition/cost_model.hpp"

namespace longattn::partition {

// The attention layer every sequence runs through (one layer's forward and backward).
struct VarlenShape {
  int query_heads = 32;
  int kv_heads = 32;
  int head_dim = 128;
  int element_bytes = 2;   // q, k, v on the wire
  int gradient_bytes = 4;  // dK/dV travelling around a ring
  bool causal = true;
};

struct VarlenProblem {
  std::vector<std::int64_t> lengths;  // tokens of each sequence, in batch order (zeros allowed)
  int ranks = 0;
  int gpus_per_node = 0;  // ranks are numbered node by node
  std::int64_t cap_tokens = 0;  // most tokens one rank may hold; 0: no cap
  VarlenShape shape;
};

// Sequence lengths from packed-batch prefix sums; refuses a cu_seqlens that does not start at 0 or
// decreases, naming the entry.
std::vector<std::int64_t> lengths_from_cu_seqlens(std::span<const std::int32_t> cu_seqlens);

// Throws Error(invalid_argument) with what to change: negative lengths, a batch whose total does not
// fit int32 prefix sums, a layout that is not positive or not whole nodes, a shape that is not
// positive, a sequence (or the batch) larger than all ranks together can hold under the cap.
void check_problem(const VarlenProblem& problem);

enum class VarlenTier { one_rank, one_node, nodes };
const char* to_string(VarlenTier tier) noexcept;

enum class Sharding {
  whole,   // the group is one rank holding its sequences whole
  zigzag,  // a ring over the group; each sequence cut into 2 x size chunks, member u holds u and 2 size-1-u
  hybrid,  // Ulysses inside groups of `ulysses` consecutive ranks (heads split by all-to-alls), a zigzag
           // ring over those groups: bigger ring blocks and fewer ring steps where a ring over every
           // rank would wait on its transfers
  chunks,  // fixed-size chunks placed one by one (flat-minheap); keys fetched from the chunks' owners
};
const char* to_string(Sharding sharding) noexcept;

// Ranks [first_rank, first_rank + size) running the listed sequences together: for a zigzag group
// one ring (its sub-communicator holds exactly these ranks, in this order) over the packed batch of
// its sequences; for a hybrid group the strategy of the same name with U = ulysses on them.
struct VarlenGroup {
  int first_rank = 0;
  int size = 1;
  int ulysses = 1;  // hybrid only: ranks per Ulysses group
  VarlenTier tier = VarlenTier::one_rank;
  Sharding sharding = Sharding::whole;
  std::vector<int> sequences;  // increasing batch indices
  bool operator==(const VarlenGroup&) const = default;
};

// One rank's modelled share of the step, in seconds (forward + backward).
struct RankCost {
  std::int64_t tokens = 0;
  double attention_seconds = 0;     // local calls at the rate of their block sizes
  double linear_seconds = 0;        // linear layers of the rank's tokens
  double exposed_comm_seconds = 0;  // communication that the calls do not hide
  double total_seconds() const noexcept { return attention_seconds + linear_seconds + exposed_comm_seconds; }
};

struct VarlenPlan {
  std::string planner;
  int ranks = 0, gpus_per_node = 0;
  std::vector<std::int64_t> lengths;
  std::vector<VarlenGroup> groups;  // the order every rank runs its groups in
  std::vector<int> group_of;        // [sequence]: the group running it
  // Sharding::chunks only: the chunk size and the owner of every chunk of every sequence.
  std::int64_t chunk_tokens = 0;
  std::vector<std::vector<int>> chunk_owner;

  std::vector<RankCost> rank_costs;  // [ranks]
  double bytes_intra_node = 0;       // sent by all ranks together, forward and backward
  double bytes_inter_node = 0;
  std::int64_t padding_tokens = 0;   // tokens the sharding would have to add (none where chunks may differ by one)
  double planner_ms = 0;             // CPU time of planning and pricing (the planning thread's own)

  double step_seconds() const;  // the slowest rank
  double imbalance() const;     // slowest / mean rank time
  std::int64_t max_rank_tokens() const;
  // The groups `rank` belongs to, in the order it runs them. Groups of one size never overlap (each
  // is aligned to its size), so an executor can make every group's sub-communicator with one split
  // per group size: colour first_rank / size, key rank - first_rank.
  std::vector<int> groups_of_rank(int rank) const;
  // The tokens of `rank` in local order, group by group: runs of one sequence (first position,
  // count, stride), never one entry per token.
  std::vector<TokenRun> runs(int rank) const;
  // The shard plan a whole, zigzag or hybrid group runs over its members: its sequences packed in
  // the group's order (sequence b of the shard plan is groups[g].sequences[b]); for a hybrid group
  // the two-level plan with group_size = ulysses.
  ShardPlan group_shard_plan(int group) const;
};

// The hierarchical plan: groups of 1, 2, 4, ... ranks inside a node (up to the node) and then 2, 4,
// ... whole nodes (up to all of them), aligned to their size; a group of several ranks runs a
// zigzag ring or, where the heads allow and the model finds it faster, the hybrid with the Ulysses
// size (a divisor of the node) the model finds fastest. Longest sequence first, each goes into the
// smallest group size that keeps every rank under a target step time, on the least loaded group
// of that size (a min-heap of ranks for single ranks; best fit and, on small batches, earliest
// finish are tried too); the target is searched upward from a lower bound, the whole-sequence
// packing being the first plan to beat; single moves and swaps off the slowest rank finish it.
// Deterministic for the same input.
VarlenPlan plan_hierarchical(const VarlenProblem& problem, const MachineModel& machine);

// The best plan over the same groups, by branch and bound: exponential, for small instances only
// (tests bound the hierarchical plan's gap with it). Refuses more than `max_sequences` sequences.
VarlenPlan plan_exact(const VarlenProblem& problem, const MachineModel& machine, int max_sequences = 8);

// Baselines.
// TransformerEngine THD: every sequence cut into 2P zigzag chunks over all P ranks, one ring over
// all ranks. padding_tokens counts what TE's rule (each length a multiple of 2P) would add; the
// modelled time leaves that padding out, in the baseline's favour.
VarlenPlan plan_per_sequence_zigzag(const VarlenProblem& problem, const MachineModel& machine);
// Whole sequences, longest first onto the least loaded rank (modelled time) with room under the cap.
VarlenPlan plan_whole_sequences(const VarlenProblem& problem, const MachineModel& machine);
// MagiAttention-like: chunks of chunk_tokens from every sequence, most expensive first, each onto
// the least loaded rank that still has room (a cap of ceil(chunks / P) chunks per rank keeps tokens
// even); no tiers. Each rank fetches the keys and values of the earlier chunks of its sequences from
// their owners and sends their dK/dV back, behind its compute at best.
VarlenPlan plan_flat_minheap(const VarlenProblem& problem, const MachineModel& machine, std::int64_t chunk_tokens);

}  // namespace longattn::partition
