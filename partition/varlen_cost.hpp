// The cost of a variable-length plan under the cost model: one member's share of a zigzag ring over
// a group's sequences (a group of one rank is the ring's first step alone), and the pricing of a
// whole plan's groups rank by rank. Shared by every varlen planner so their plans compare fairly.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "partition/cost_model.hpp"
#include "partition/varlen_planner.hpp"

namespace longattn::partition {

struct RingMemberCost {
  double attention_seconds = 0;
  double linear_seconds = 0;
  double exposed_comm_seconds = 0;
  double ring_sent_bytes = 0;        // by this member, forward and backward
  double all_to_all_sent_bytes = 0;
  double total_seconds() const noexcept { return attention_seconds + linear_seconds + exposed_comm_seconds; }
};

// One member of a group of `size` ranks running sequences of these lengths together as Ulysses
// groups of `ulysses` ranks (all-to-alls on all_to_all_tier) and a zigzag ring over the size /
// ulysses Ulysses groups (on ring_tier), the sequences packed into one shard: per ring step the
// calls of every sequence with the shard's transfer behind them, as estimate_strategy prices one
// sequence (step 0 causal on the diagonal, the other steps half a block). Every member has the
// same modelled share: zigzag gives each the same work per step, Ulysses the same heads.
RingMemberCost group_member_cost(const MachineModel& machine, const VarlenShape& shape,
                                 std::span<const std::int64_t> lengths, int size, int ulysses, Tier ring_tier,
                                 Tier all_to_all_tier);
// The plain zigzag ring (ulysses 1).
RingMemberCost zigzag_member_cost(const MachineModel& machine, const VarlenShape& shape,
                                  std::span<const std::int64_t> lengths, int size, Tier tier);
RingMemberCost zigzag_member_cost(const MachineModel& machine, const VarlenShape& shape, std::int64_t length, int size,
                                  Tier tier);

// Tokens of member u when a sequence of `length` is cut into 2 x size chunks differing by one.
std::int64_t zigzag_member_tokens(std::int64_t length, int size, int member);
std::int64_t zigzag_max_member_tokens(std::int64_t length, int size);

// Why a group of `size` ranks cannot run Ulysses groups of `ulysses` ranks on these heads ("" if it can).
std::string hybrid_group_unsupported_reason(const VarlenShape& shape, int size, int ulysses);

struct GroupTiers {
  Tier ring = Tier::intra_node;
  Tier all_to_all = Tier::intra_node;
};
GroupTiers group_tiers(int first_rank, int size, int ulysses, int gpus_per_node);

// Fills rank_costs and the bytes of a plan made of whole, zigzag and hybrid groups.
void price_ring_groups(VarlenPlan& plan, const MachineModel& machine, const VarlenShape& shape);

// A local attention call of `pairs` visible (query, key) pairs at the rate of a q_rows x k_rows block.
double call_seconds(const MachineModel& machine, const VarlenShape& shape, double pairs, double q_rows, double k_rows,
                    bool causal, bool backward);

}  // namespace longattn::partition
