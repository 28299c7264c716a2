// See hybrid_plan.hpp. The ring part is the ring plan of the group plan, renamed into the group row
// space: its shard numbers are groups, its peers become the ranks of the same member index.
#include "partition/hybrid_plan.hpp"

#include <utility>

#include <fmt/format.h>

#include "common/check.hpp"
#include "partition/ring_plan.hpp"
#include "partition/ulysses_plan.hpp"

namespace longattn::partition {

std::string hybrid_heads_unsupported_reason(int q_heads, int kv_heads, int group_size) {
  if (q_heads % group_size != 0)
    return fmt::format("Ulysses size {} does not divide the {} query heads", group_size, q_heads);
  if (kv_heads % group_size != 0 && group_size % kv_heads != 0)
    return fmt::format("Ulysses size {} and the {} kv heads do not divide one another", group_size, kv_heads);
  return {};
}

std::string valid_hybrid_group_sizes(int q_heads, int kv_heads, int world) {
  std::string sizes;
  for (int u = 1; u <= world; ++u)
    if (world % u == 0 && hybrid_heads_unsupported_reason(q_heads, kv_heads, u).empty())
      sizes += (sizes.empty() ? "" : ", ") + std::to_string(u);
  return sizes;
}

namespace {

// The exchange of one tensor inside group `group` from the sequence slices to the head shares:
// toward member m, this member's tokens times m's heads; from member m, m's tokens times this
// member's heads. What one member sends another receives by construction.
AllToAll to_heads(PlanTensor tensor, int world, int group, int member, const std::vector<std::int64_t>& member_tokens,
                  const std::vector<HeadRange>& member_heads) {
  const auto peers = static_cast<std::size_t>(world);
  AllToAll a{tensor, std::vector<std::int64_t>(peers), std::vector<std::int64_t>(peers), std::vector<HeadRange>(peers),
             std::vector<HeadRange>(peers)};
  const int group_size = static_cast<int>(member_tokens.size());
  const auto me = static_cast<std::size_t>(member);
  for (int m = 0; m < group_size; ++m) {
    const auto peer = static_cast<std::size_t>(group * group_size + m), im = static_cast<std::size_t>(m);
    a.send_counts[peer] = member_tokens[me] * member_heads[im].count;
    a.send_heads[peer] = member_heads[im];
    a.recv_counts[peer] = member_tokens[im] * member_heads[me].count;
    a.recv_heads[peer] = member_heads[me];
  }
  return a;
}

// The reverse exchange: head shares back to the members' slices.
AllToAll to_slices(PlanTensor tensor, int world, int group, int member, const std::vector<std::int64_t>& member_tokens,
                   const std::vector<HeadRange>& member_heads) {
  AllToAll a = to_heads(tensor, world, group, member, member_tokens, member_heads);
  std::swap(a.send_counts, a.recv_counts);
  std::swap(a.send_heads, a.recv_heads);
  return a;
}

}  // namespace

RankPlan hybrid_rank_plan(const ShardPlan& shards, bool causal, int rank, int q_heads, int kv_heads) {
  LONGATTN_INVALID(q_heads >= 1 && kv_heads >= 1 && q_heads % kv_heads == 0,
                   "query heads ({}) must be a positive multiple of key/value heads ({})", q_heads, kv_heads);
  const int world = shards.world(), group_size = shards.group_size();
  if (const auto reason = hybrid_heads_unsupported_reason(q_heads, kv_heads, group_size); !reason.empty())
    throw Error(ErrorCode::invalid_argument,
                fmt::format("{}: use a Ulysses size of {} for {} query and {} kv heads on {} ranks", reason,
                            valid_hybrid_group_sizes(q_heads, kv_heads, world), q_heads, kv_heads, world));
  LONGATTN_INVALID(rank >= 0 && rank < world, "rank {} is outside [0, {})", rank, world);
  const int group = rank / group_size, member = rank % group_size;

  std::vector<std::int64_t> member_tokens(static_cast<std::size_t>(group_size));
  std::vector<HeadRange> q_of(static_cast<std::size_t>(group_size)), kv_of(static_cast<std::size_t>(group_size));
  for (int m = 0; m < group_size; ++m) {
    member_tokens[static_cast<std::size_t>(m)] = shards.local_tokens(group * group_size + m);
    q_of[static_cast<std::size_t>(m)] = ulysses_q_heads(q_heads, group_size, m);
    kv_of[static_cast<std::size_t>(m)] = ulysses_kv_heads(q_heads, kv_heads, group_size, m);
  }
  const HeadRange own_heads = q_of[static_cast<std::size_t>(member)];

  RankPlan plan = ring_rank_plan(shards.group_plan(), causal, group, q_heads, kv_heads);
  auto rank_of = [&](int group_index) { return group_index * group_size + member; };
  for (auto& step : plan.steps) {
    step.rows = RowSpace::group;
    if (step.ring) {
      step.ring->send_to = rank_of(step.ring->send_to);
      step.ring->recv_from = rank_of(step.ring->recv_from);
    }
    for (auto& call : step.calls) call.heads = own_heads;
  }
  auto exchange_in = [&](PlanTensor t, const std::vector<HeadRange>& heads) {
    return to_heads(t, world, group, member, member_tokens, heads);
  };
  auto exchange_out = [&](PlanTensor t) { return to_slices(t, world, group, member, member_tokens, q_of); };
  plan.steps.front().all_to_all = {exchange_in(PlanTensor::q, q_of), exchange_in(PlanTensor::k, kv_of),
                                   exchange_in(PlanTensor::v, kv_of)};
  Step back;
  back.rows = RowSpace::group;
  back.all_to_all = {exchange_out(PlanTensor::o), exchange_out(PlanTensor::lse)};
  plan.steps.push_back(std::move(back));
  return plan;
}

Plan hybrid_plan(const ShardPlan& shards, bool causal, int q_heads, int kv_heads) {
  Plan plan = whole_plan(Strategy::hybrid, shards.world(), causal, q_heads, kv_heads,
                         [&](int rank) { return hybrid_rank_plan(shards, causal, rank, q_heads, kv_heads); });
  plan.group_size = shards.group_size();
  return plan;
}

}  // namespace longattn::partition
