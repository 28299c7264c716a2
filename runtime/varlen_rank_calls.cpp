// One rank's launches of a varlen plan (varlen_rank_calls.hpp), from the same pieces the executor
// and the ring use: the plan's group shard plans, ring_rank_plan and group_into_launches.
#include "runtime/varlen_rank_calls.hpp"

#include <algorithm>

#include "common/check.hpp"
#include "partition/ring_plan.hpp"
#include "partition/ulysses_plan.hpp"
#include "runtime/ring_launches.hpp"

namespace longattn::runtime {

namespace {

// The launches of one ring over `shards` as ring member `member` runs them on `heads` query heads.
void add_ring_calls(std::vector<VarlenRankCall>& out, int group, const ShardPlan& shards, int member, bool causal,
                    partition::HeadRange heads, int kv_heads) {
  const auto rank_plan = partition::ring_rank_plan(shards, causal, member, heads.count, kv_heads);
  const auto own_cu = shards.shard(member).cu_seqlens;
  for (std::size_t s = 0; s < rank_plan.steps.size(); ++s) {
    const auto& step = rank_plan.steps[s];
    for (auto& l : group_into_launches(step.calls, own_cu)) {
      LONGATTN_REQUIRE(l.mask != partition::MaskKind::positions, ErrorCode::unsupported,
                       "group {} step {}: a launch masked by explicit positions (the shards did not split into plain "
                       "blocks); it has no plain local call to list",
                       group, s);
      VarlenRankCall c;
      c.group = group;
      c.step = static_cast<int>(s);
      c.key_shard = step.key_shard;
      c.in_ring = true;
      c.head_begin = heads.begin;
      c.query_heads = heads.count;
      c.kv_heads = kv_heads;
      c.query_rows = shards.local_tokens(member);
      c.key_rows = shards.local_tokens(step.key_shard);
      c.q_begin = l.q_begin;
      c.q_count = l.q_count;
      c.k_begin = l.k_begin;
      c.k_count = l.k_count;
      c.causal = l.mask == partition::MaskKind::causal_by_index;
      c.cu_q = std::move(l.cu_q);
      c.cu_k = std::move(l.cu_k);
      c.max_seqlen_q = std::max(l.max_seqlen_q, 1);
      c.max_seqlen_k = std::max(l.max_seqlen_k, 1);
      out.push_back(std::move(c));
    }
  }
}

}  // namespace

std::vector<VarlenRankCall> varlen_rank_calls(const partition::VarlenPlan& plan, int rank, int q_heads, int kv_heads,
                                              bool causal) {
  LONGATTN_INVALID(q_heads >= 1 && kv_heads >= 1 && q_heads % kv_heads == 0,
                   "query heads ({}) must be a positive multiple of key/value heads ({})", q_heads, kv_heads);
  std::vector<VarlenRankCall> out;
  for (const int g : plan.groups_of_rank(rank)) {
    const auto& group = plan.groups[static_cast<std::size_t>(g)];
    LONGATTN_INVALID(group.sharding != partition::Sharding::chunks,
                     "the {} plan places chunks (flat-minheap), which no executor runs: it has no local calls to list",
                     plan.planner);
    const auto shards = plan.group_shard_plan(g);
    const int member = rank - group.first_rank;
    if (group.size == 1) {
      // The executor's one varlen call over the group's sequences, skipped when they hold no token.
      const auto& cu = shards.cu_seqlens();
      if (cu.back() == 0) continue;
      VarlenRankCall c;
      c.group = g;
      c.query_heads = q_heads;
      c.kv_heads = kv_heads;
      c.query_rows = c.key_rows = c.q_count = c.k_count = cu.back();
      c.causal = causal;
      c.cu_q = c.cu_k = cu;
      for (std::size_t b = 1; b < cu.size(); ++b) c.max_seqlen_q = std::max(c.max_seqlen_q, cu[b] - cu[b - 1]);
      c.max_seqlen_k = c.max_seqlen_q;
      out.push_back(std::move(c));
    } else if (group.sharding == partition::Sharding::hybrid) {
      // After the all-to-all the member holds its Ulysses group's rows for its share of the heads,
      // and rings with the members of the same index in the other Ulysses groups.
      const int U = group.ulysses;
      add_ring_calls(out, g, shards.group_plan(), member / U, causal, partition::ulysses_q_heads(q_heads, U, member % U),
                     partition::ulysses_kv_heads(q_heads, kv_heads, U, member % U).count);
    } else {
      add_ring_calls(out, g, shards, member, causal, partition::HeadRange{0, q_heads}, kv_heads);
    }
  }
  return out;
}

}  // namespace longattn::runtime
