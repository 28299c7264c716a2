// The groups a varlen plan may use, how a plan is put together from one group per sequence, and
// the placement machinery (per-sequence costs, the greedy, local moves): shared by the
// hierarchical planner, its exact check and the whole-sequence baseline.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "partition/varlen_planner.hpp"

namespace longattn::partition {

struct GroupSlot {
  int first_rank = 0;
  int size = 1;
  bool operator==(const GroupSlot&) const = default;
};

// Group sizes in increasing order: 1, 2, 4, ... inside a node up to the node itself, then 2, 4, ...
// whole nodes up to all of them. Groups of a size are aligned to it, so a group inside a node never
// straddles two, and two groups of one size never overlap.
std::vector<int> candidate_group_sizes(int ranks, int gpus_per_node);
// How many aligned groups of `size` ranks the layout holds.
int groups_of_size(int ranks, int gpus_per_node, int size);
VarlenTier tier_of_group(int size, int gpus_per_node);
// The Ulysses sizes a group of `size` ranks may run the hybrid with: those that divide the node's
// ranks (a Ulysses group never straddles nodes) and the group, and split the heads. Larger ones
// make the ring's blocks bigger and its steps fewer, at the price of all-to-alls.
std::vector<int> hybrid_ulysses_sizes(const VarlenProblem& problem, int size);
// The most tokens any member of a group of `size` ranks holds of a sequence of `length`, whichever
// way the group runs it: zigzag chunks, or the hybrid's contiguous slices of its Ulysses group's
// rows (which round differently). Additive over a group's sequences, so the planners reserve it
// per sequence and per member and the cap holds whatever the group becomes.
std::int64_t member_token_bound(const VarlenProblem& problem, std::int64_t length, int size);

// The most tokens a rank holds when every sequence is zigzagged over all ranks (TE's plan).
std::int64_t all_ranks_zigzag_tokens(const VarlenProblem& problem);

// A plan running sequence s on slot_of_sequence[s], priced. Sequences of one slot form one group;
// groups are ordered largest first, then by first rank, so every rank runs its groups in one order.
// Under a cap, groups fall back to plain zigzag rings where the hybrids' rounding would break it.
VarlenPlan assemble_ring_plan(std::string planner, const VarlenProblem& problem, const MachineModel& machine,
                              std::span<const GroupSlot> slot_of_sequence);

// ---- placing sequences on groups ------------------------------------------------------------

// Per-rank time of each sequence on each candidate group size (one ring member's share, the
// sequence alone), computed on first use: most sequences of a batch are only ever priced whole.
class SequenceGroupCosts {
 public:
  SequenceGroupCosts(const VarlenProblem& problem, const MachineModel& machine);
  const std::vector<int>& sizes() const noexcept { return sizes_; }
  double operator()(int sequence, int size_index);
  // member_token_bound of the sequence on a group of that size.
  std::int64_t member_tokens(int sequence, int size_index);

 private:
  const VarlenProblem& problem_;
  const MachineModel& machine_;
  std::vector<int> sizes_;
  std::vector<double> cache_;               // [sequence][size index]; negative: not computed yet
  std::vector<std::int64_t> tokens_cache_;  // [sequence][size index]; negative: not computed yet
};

// Sequence indices longest first, ties by index: the order every planner places in.
std::vector<int> longest_first(const std::vector<std::int64_t>& lengths);

// One group per sequence and the slowest rank's time, summing each sequence's share on its group
// (what the planners optimise; pricing a finished plan batches a group's sequences into one ring,
// which can only be as fast or faster).
struct SlotPlacement {
  std::vector<GroupSlot> slots;  // [sequence]
  double makespan = 0;
};
SlotPlacement hierarchical_placement(const VarlenProblem& problem, SequenceGroupCosts& costs);
// The placements the search ends with, best first: on small batches one per distinct start (each
// finished by local moves), on large ones the best alone.
std::vector<SlotPlacement> hierarchical_placements(const VarlenProblem& problem, SequenceGroupCosts& costs);

// Improves a placement by local moves while they lower the slowest rank: one of its sequences to
// any other group (of any size), two sequences trading groups, and on small batches every
// sequence inside a larger group moved into it, or an ejection chain (a sequence into a group it
// overloads, then up to `chain_depth` sequences of overloaded ranks out to others). Stops when no
// move helps or after `max_moves`. Deterministic.
void improve_placement(const VarlenProblem& problem, SequenceGroupCosts& costs, SlotPlacement& placement, int max_moves,
                       int chain_depth = 1);

}  // namespace longattn::partition
