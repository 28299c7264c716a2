// Pricing varlen plans: a zigzag ring member's share in closed form, and a plan's groups summed
// rank by rank with the bytes each tier carries.
#include "partition/varlen_cost.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/check.hpp"
#include "partition/hybrid_plan.hpp"

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

RingMemberCost group_member_cost(const MachineModel& m, const VarlenShape& shape, std::span<const std::int64_t> lengths,
                                 int size, int ulysses, Tier ring_tier, Tier all_to_all_tier) {
  LONGATTN_INVALID(size >= 1 && ulysses >= 1 && size % ulysses == 0,
                   "a group of {} ranks cannot hold Ulysses groups of {}: use a divisor of the group", size, ulysses);
  const int U = ulysses, R = size / ulysses;
  const int heads = shape.query_heads / U;
  // Fewer kv heads than ranks in a Ulysses group: each rank keeps a copy of the kv head it reads.
  const int kv_heads = std::max(1, shape.kv_heads / U);
  VarlenShape member = shape;
  member.query_heads = heads;
  // Ring step 0 meets the member's own two chunks (causal on the diagonal); every later step meets
  // half of another member's shard under the causal mask (zigzag pairs an early chunk with a late
  // one), all of it without one. The ring runs over the R Ulysses groups, each holding l / R rows.
  double first_forward = 0, first_backward = 0, later_forward = 0, later_backward = 0, ring_tokens = 0, tokens = 0;
  for (const std::int64_t length : lengths) {
    if (length <= 0) continue;
    const double q = static_cast<double>(length) / R;
    ring_tokens += q;
    tokens += static_cast<double>(length) / size;
    const double diagonal_pairs = shape.causal ? q * (q + 1) / 2 : q * q;
    first_forward += call_seconds(m, member, diagonal_pairs, q, q, shape.causal, false);
    first_backward += call_seconds(m, member, diagonal_pairs, q, q, shape.causal, true);
    if (R > 1) {
      const double keys = shape.causal ? q / 2 : q;
      later_forward += call_seconds(m, member, q * keys, q, keys, false, false);
      later_backward += call_seconds(m, member, q * keys, q, keys, false, true);
    }
  }
  RingMemberCost cost;
  const double later_steps = R - 1;
  cost.attention_seconds = first_forward + first_backward + later_steps * (later_forward + later_backward);
  cost.linear_seconds = 3 * m.linear_seconds_per_token * tokens;  // forward, and a backward of twice it
  if (size == 1 || tokens == 0) return cost;
  const double d = shape.head_dim, eb = shape.element_bytes, gb = shape.gradient_bytes;
  double forward = first_forward, backward = first_backward;
  if (R > 1) {
    const double kv_bytes = 2.0 * ring_tokens * kv_heads * d * eb;
    const double dkv_bytes = 2.0 * ring_tokens * kv_heads * d * gb;
    // The shard for step s + 1 moves during step s; the backward's dK/dV travel with it and take
    // one more hop home after the last step, with nothing to hide behind.
    const double forward_transfer = m.transfer_seconds(kv_bytes, ring_tier, 2);
    const double backward_transfer = m.transfer_seconds(kv_bytes + dkv_bytes, ring_tier, 4);
    const double gradients_home = m.transfer_seconds(dkv_bytes, ring_tier, 2);
    forward = std::max(first_forward, forward_transfer) + (later_steps - 1) * std::max(later_forward, forward_transfer) +
              later_forward;
    backward = std::max(first_backward, backward_transfer) +
               (later_steps - 1) * std::max(later_backward, backward_transfer) + later_backward + gradients_home;
    cost.ring_sent_bytes = later_steps * (2 * kv_bytes + dkv_bytes) + dkv_bytes;
  }
  if (U > 1) {
    // Each member sends the other U - 1 their heads of its rows, before and after the ring: q, k, v
    // in and o, lse out forward; dO, rowsum(dO * O) in and dq, dk, dv out backward.
    const double qkv = (heads + 2.0 * kv_heads) * d * eb, o_lse = heads * (d * eb + 4.0);
    auto exchange = [&](double bytes_per_token) {
      return m.transfer_seconds((U - 1) * tokens * bytes_per_token, all_to_all_tier, U - 1);
    };
    forward += exchange(qkv) + exchange(o_lse);
    backward += exchange(o_lse) + exchange(qkv);
    cost.all_to_all_sent_bytes = 2 * (U - 1) * tokens * (qkv + o_lse);
  }
  cost.exposed_comm_seconds = forward + backward - cost.attention_seconds;
  return cost;
}

RingMemberCost zigzag_member_cost(const MachineModel& m, const VarlenShape& shape, std::span<const std::int64_t> lengths,
                                  int size, Tier tier) {
  return group_member_cost(m, shape, lengths, size, 1, tier, Tier::intra_node);
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

std::string hybrid_group_unsupported_reason(const VarlenShape& shape, int size, int ulysses) {
  if (ulysses < 1 || size % ulysses != 0) return fmt::format("{} ranks do not divide the group of {}", ulysses, size);
  return hybrid_heads_unsupported_reason(shape.query_heads, shape.kv_heads, ulysses);
}

GroupTiers group_tiers(int first_rank, int size, int ulysses, int gpus_per_node) {
  GroupTiers tiers;
  for (int g = 0; g < size / ulysses; ++g)
    if (group_tier(first_rank + g * ulysses, ulysses, 1, gpus_per_node) == Tier::inter_node) tiers.all_to_all = Tier::inter_node;
  for (int u = 0; u < ulysses; ++u)
    if (group_tier(first_rank + u, size / ulysses, ulysses, gpus_per_node) == Tier::inter_node) tiers.ring = Tier::inter_node;
  return tiers;
}

void price_ring_groups(VarlenPlan& plan, const MachineModel& m, const VarlenShape& shape) {
  plan.rank_costs.assign(static_cast<std::size_t>(plan.ranks), RankCost{});
  plan.bytes_intra_node = plan.bytes_inter_node = 0;
  std::vector<std::int64_t> lengths;
  for (std::size_t g = 0; g < plan.groups.size(); ++g) {
    const auto& group = plan.groups[g];
    LONGATTN_INVALID(group.sharding != Sharding::chunks, "price_ring_groups: a chunked group is not a ring");
    lengths.clear();
    for (const int s : group.sequences) lengths.push_back(plan.lengths[static_cast<std::size_t>(s)]);
    const int U = group.ulysses;
    const auto tiers = group_tiers(group.first_rank, group.size, U, plan.gpus_per_node);
    const auto member = group_member_cost(m, shape, lengths, group.size, U, tiers.ring, tiers.all_to_all);
    const auto shards = plan.group_shard_plan(static_cast<int>(g));
    for (int u = 0; u < group.size; ++u) {
      const int rank = group.first_rank + u;
      auto& cost = plan.rank_costs[static_cast<std::size_t>(rank)];
      cost.attention_seconds += member.attention_seconds;
      cost.linear_seconds += member.linear_seconds;
      cost.exposed_comm_seconds += member.exposed_comm_seconds;
      cost.tokens += shards.local_tokens(u);
      // The ring links member u of each Ulysses group to member u of the next; the all-to-alls stay
      // inside the Ulysses group.
      const int ring_peer = group.first_rank + (u + U) % group.size;
      const bool ring_crosses = tier_between(rank, ring_peer, plan.gpus_per_node) == Tier::inter_node;
      (ring_crosses ? plan.bytes_inter_node : plan.bytes_intra_node) += member.ring_sent_bytes;
      (tiers.all_to_all == Tier::inter_node ? plan.bytes_inter_node : plan.bytes_intra_node) += member.all_to_all_sent_bytes;
    }
  }
}

}  // namespace longattn::partition
