// Pricing varlen plans: a zigzag ring member's share in closed form, and a plan's groups summed
// rank by rank with the bytes each tier carries.
#include "partition/varlen_cost.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/check.hpp"

namespace longattn::partition {

double call_seconds(const MachineModel& m, const VarlenShape& shape, double pairs, double q_rows, double k_rows,
                    bool causal, bool backward) {
  if (pairs <= 0) return 0;
  auto rows = [](double x) { return std::max<std::int64_t>(1, std::llround(x)); };
  const double flops = 4.0 * pairs * shape.head_dim * shape.query_heads * (backward ? kBackwardFlopFactor : 1.0);
  const double tflops = backward ? m.rates.backward_tflops(rows(q_rows), rows(k_rows), causal, shape.head_dim)
                                 : m.rates.forward_tflops(rows(q_rows), rows(k_rows), causal, shape.head_dim);
  return flops / (tflops * 1e12);
}

RingMemberCost zigzag_member_cost(const MachineModel& m, const VarlenShape& shape, std::span<const std::int64_t> lengths,
                                  int size, Tier tier) {
  LONGATTN_INVALID(size >= 1, "a ring group needs at least one rank, got {}", size);
  // Step 0 meets the member's own two chunks (causal on the diagonal); every later step meets half
  // of another member's shard under the causal mask (zigzag pairs an early chunk with a late one),
  // all of it without one.
  double first_forward = 0, first_backward = 0, later_forward = 0, later_backward = 0, tokens = 0;
  for (const std::int64_t length : lengths) {
    if (length <= 0) continue;
    const double q = static_cast<double>(length) / size;
    tokens += q;
    const double diagonal_pairs = shape.causal ? q * (q + 1) / 2 : q * q;
    first_forward += call_seconds(m, shape, diagonal_pairs, q, q, shape.causal, false);
    first_backward += call_seconds(m, shape, diagonal_pairs, q, q, shape.causal, true);
    if (size > 1) {
      const double keys = shape.causal ? q / 2 : q;
      later_forward += call_seconds(m, shape, q * keys, q, keys, false, false);
      later_backward += call_seconds(m, shape, q * keys, q, keys, false, true);
    }
  }
  RingMemberCost cost;
  const double later_steps = size - 1;
  cost.attention_seconds = first_forward + first_backward + later_steps * (later_forward + later_backward);
  cost.linear_seconds = 3 * m.linear_seconds_per_token * tokens;  // forward, and a backward of twice it
  if (size == 1 || tokens == 0) return cost;
  const double kv_bytes = 2.0 * tokens * shape.kv_heads * shape.head_dim * shape.element_bytes;
  const double dkv_bytes = 2.0 * tokens * shape.kv_heads * shape.head_dim * shape.gradient_bytes;
  // The shard for step s + 1 moves during step s; the backward's dK/dV travel with it and take one
  // more hop home after the last step, with nothing to hide behind.
  const double forward_transfer = m.transfer_seconds(kv_bytes, tier, 2);
  const double backward_transfer = m.transfer_seconds(kv_bytes + dkv_bytes, tier, 4);
  const double gradients_home = m.transfer_seconds(dkv_bytes, tier, 2);
  const double forward = std::max(first_forward, forward_transfer) +
                         (later_steps - 1) * std::max(later_forward, forward_transfer) + later_forward;
  const double backward = std::max(first_backward, backward_transfer) +
                          (later_steps - 1) * std::max(later_backward, backward_transfer) + later_backward + gradients_home;
  cost.exposed_comm_seconds = forward + backward - cost.attention_seconds;
  cost.sent_bytes = later_steps * (2 * kv_bytes + dkv_bytes) + dkv_bytes;
  return cost;
}

RingMemberCost zigzag_member_cost(const MachineModel& m, const VarlenShape& shape, std::int64_t length, int size, Tier tier) {
  return zigzag_member_cost(m, shape, std::span<const std::int64_t>(&length, 1), size, tier);
}

std::int64_t zigzag_member_tokens(std::int64_t length, int size, int member) {
  const std::int64_t chunks = 2LL * size, base = length / chunks, rest = length % chunks;
  return 2 * base + (member < rest ? 1 : 0) + (chunks - 1 - member < rest ? 1 : 0);
}

std::int64_t zigzag_max_member_tokens(std::int64_t length, int size) {
  if (size == 1) return length;
  const std::int64_t chunks = 2LL * size, base = length / chunks, rest = length % chunks;
  // Chunk c gets the extra token when c < rest; member size-1 holds chunks size-1 and size, the
  // first member to hold two such when rest > size.
  return 2 * base + (rest > 0 ? 1 : 0) + (rest > size ? 1 : 0);
}

void price_ring_groups(VarlenPlan& plan, const MachineModel& m, const VarlenShape& shape) {
  plan.rank_costs.assign(static_cast<std::size_t>(plan.ranks), RankCost{});
  plan.bytes_intra_node = plan.bytes_inter_node = 0;
  std::vector<std::int64_t> lengths;
  for (const auto& group : plan.groups) {
    LONGATTN_INVALID(group.sharding != Sharding::chunks, "price_ring_groups: a chunked group is not a ring");
    lengths.clear();
    for (const int s : group.sequences) lengths.push_back(plan.lengths[static_cast<std::size_t>(s)]);
    const Tier tier = group_tier(group.first_rank, group.size, 1, plan.gpus_per_node);
    const auto member = zigzag_member_cost(m, shape, lengths, group.size, tier);
    int crossing_hops = 0;
    for (int u = 0; u < group.size; ++u) {
      const int rank = group.first_rank + u, next = group.first_rank + (u + 1) % group.size;
      if (group.size > 1 && tier_between(rank, next, plan.gpus_per_node) == Tier::inter_node) ++crossing_hops;
      auto& cost = plan.rank_costs[static_cast<std::size_t>(rank)];
      cost.attention_seconds += member.attention_seconds;
      cost.linear_seconds += member.linear_seconds;
      cost.exposed_comm_seconds += member.exposed_comm_seconds;
      for (const std::int64_t length : lengths) cost.tokens += group.size == 1 ? length : zigzag_member_tokens(length, group.size, u);
    }
    plan.bytes_inter_node += member.sent_bytes * crossing_hops;
    plan.bytes_intra_node += member.sent_bytes * (group.size - crossing_hops);
  }
}

}  // namespace longattn::partition
