// The cost of a variable-length plan under the cost model: one member's share of a zigzag ring over
// a group's sequences (a group of one rank is the ring's first step alone), and the pricing of a
// whole plan's groups rank by rank. Shared by every varlen planner so their plans compare fairly.
#pragma once

#include <cstdint>
#include <span>

#include "partition/cost_model.hpp"
#include "partition/varlen_planner.hpp"

namespace longattn::partition {

struct RingMemberCost {
  double attention_seconds = 0;
  double linear_seconds = 0;
  double exposed_comm_seconds = 0;
  double sent_bytes = 0;  // by this member, forward and backward
  double total_seconds() const noexcept { return attention_seconds + linear_seconds + exposed_comm_seconds; }
};

// One member of a zigzag ring of `size` ranks over sequences of these lengths, all packed into one
// shard per member: per step the calls of every sequence with the shard's transfer behind them, as
// estimate_strategy prices one sequence (step 0 causal on the diagonal, the other steps half a
// block). Every member has the same modelled share: zigzag gives each the same work per step.
RingMemberCost zigzag_member_cost(const MachineModel& machine, const VarlenShape& shape,
                                  std::span<const std::int64_t> lengths, int size, Tier tier);
RingMemberCost zigzag_member_cost(const MachineModel& machine, const VarlenShape& shape, std::int64_t length, int size,
                                  Tier tier);

// Tokens of member u when a sequence of `length` is cut into 2 x size chunks differing by one.
std::int64_t zigzag_member_tokens(std::int64_t length, int size, int member);
std::int64_t zigzag_max_member_tokens(std::int64_t length, int size);

// Fills rank_costs and the bytes of a plan made of whole and zigzag groups.
void price_ring_groups(VarlenPlan& plan, const MachineModel& machine, const VarlenShape& shape);

// A local attention call of `pairs` visible (query, key) pairs at the rate of a q_rows x k_rows block.
double call_seconds(const MachineModel& machine, const VarlenShape& shape, double pairs, double q_rows, double k_rows,
                    bool causal, bool backward);

}  // namespace longattn::partition
