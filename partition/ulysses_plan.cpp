// See ulysses_plan.hpp. A rank's counts toward peer b are (tokens of the sequence-sharded side) x
// (heads of the head-sharded side): what rank a sends to b is what b receives from a by construction.
#include "partition/ulysses_plan.hpp"

#include "common/check.hpp"

namespace longattn::partition {

HeadRange ulysses_q_heads(int q_heads, int world, int rank) {
  const int per_rank = q_heads / world;
  return {rank * per_rank, per_rank};
}

HeadRange ulysses_kv_heads(int q_heads, int kv_heads, int world, int rank) {
  const HeadRange q = ulysses_q_heads(q_heads, world, rank);
  if (q.count == 0) return {};
  const int group = q_heads / kv_heads;  // query heads per kv head
  const int first = q.begin / group, last = (q.begin + q.count - 1) / group;
  return {first, last - first + 1};
}

std::string valid_ulysses_group_sizes(int q_heads) {
  std::string sizes;
  for (int d = 1; d <= q_heads; ++d)
    if (q_heads % d == 0) sizes += (sizes.empty() ? "" : ", ") + std::to_string(d);
  return sizes;
}

namespace {

// tokens(a) x heads(b) toward every peer b; `heads_here` are the heads the local rank holds after
// the exchange (head-sharded side) and `tokens` the sequence shard sizes.
AllToAll to_heads(PlanTensor tensor, int rank, const std::vector<std::int64_t>& tokens, const std::vector<HeadRange>& heads) {
  const auto world = tokens.size();
  AllToAll a{tensor, std::vector<std::int64_t>(world), std::vector<std::int64_t>(world), std::vector<HeadRange>(world),
             std::vector<HeadRange>(world)};
  const auto me = static_cast<std::size_t>(rank);
  for (std::size_t b = 0; b < world; ++b) {
    a.send_counts[b] = tokens[me] * heads[b].count;
    a.send_heads[b] = heads[b];
    a.recv_counts[b] = tokens[b] * heads[me].count;
    a.recv_heads[b] = heads[me];
  }
  return a;
}

// The reverse exchange: head shards back to sequence shards.
AllToAll to_sequence(PlanTensor tensor, int rank, const std::vector<std::int64_t>& tokens, const std::vector<HeadRange>& heads) {
  AllToAll a = to_heads(tensor, rank, tokens, heads);
  std::swap(a.send_counts, a.recv_counts);
  std::swap(a.send_heads, a.recv_heads);
  return a;
}

}  // namespace

RankPlan ulysses_rank_plan(const ShardPlan& shards, bool causal, int rank, int q_heads, int kv_heads) {
  const int world = shards.world();
  LONGATTN_INVALID(q_heads >= 1 && kv_heads >= 1 && q_heads % kv_heads == 0,
                   "query heads ({}) must be a positive multiple of key/value heads ({})", q_heads, kv_heads);
  LONGATTN_INVALID(q_heads % world == 0,
                   "Ulysses splits the {} query heads over a group of {} ranks, which does not divide them: use a "
                   "group size of {} (or the ring strategy)",
                   q_heads, world, valid_ulysses_group_sizes(q_heads));
  LONGATTN_INVALID(rank >= 0 && rank < world, "rank {} is outside [0, {})", rank, world);
  std::vector<std::int64_t> tokens(static_cast<std::size_t>(world));
  std::vector<HeadRange> q_of(static_cast<std::size_t>(world)), kv_of(static_cast<std::size_t>(world));
  for (int r = 0; r < world; ++r) {
    tokens[static_cast<std::size_t>(r)] = shards.local_tokens(r);
    q_of[static_cast<std::size_t>(r)] = ulysses_q_heads(q_heads, world, r);
    kv_of[static_cast<std::size_t>(r)] = ulysses_kv_heads(q_heads, kv_heads, world, r);
  }
  const auto& cu = shards.cu_seqlens();
  RankPlan plan;
  plan.steps.resize(2);
  auto& attend = plan.steps[0];
  attend.rows = RowSpace::gathered;
  attend.all_to_all = {to_heads(PlanTensor::q, rank, tokens, q_of), to_heads(PlanTensor::k, rank, tokens, kv_of),
                       to_heads(PlanTensor::v, rank, tokens, kv_of)};
  // Whole sequences in global order: positions are row indices inside each sequence.
  for (int b = 0; b < shards.batch(); ++b) {
    const std::int64_t begin = cu[static_cast<std::size_t>(b)], count = cu[static_cast<std::size_t>(b) + 1] - begin;
    if (count > 0)
      attend.calls.push_back(
          {begin, count, begin, count, causal ? MaskKind::causal_by_index : MaskKind::none, 0, q_of[static_cast<std::size_t>(rank)]});
  }
  auto& back = plan.steps[1];
  back.rows = RowSpace::gathered;
  back.all_to_all = {to_sequence(PlanTensor::o, rank, tokens, q_of), to_sequence(PlanTensor::lse, rank, tokens, q_of)};
  return plan;
}

Plan ulysses_plan(const ShardPlan& shards, bool causal, int q_heads, int kv_heads) {
  return whole_plan(Strategy::ulysses, shards.world(), causal, q_heads, kv_heads,
                    [&](int rank) { return ulysses_rank_plan(shards, causal, rank, q_heads, kv_heads); });
}

}  // namespace longattn::partition
