// See ring_plan.hpp. Plans from the shards' runs only, so its cost does not grow with the tokens.
#include "partition/ring_plan.hpp"

#include <span>

#include "common/check.hpp"
#include "partition/step_blocks.hpp"

namespace longattn::partition {
namespace {

struct SequenceRows {
  std::vector<TokenRun> runs;  // the runs of one sequence (local order, so rows are contiguous)
  std::int64_t begin = 0, count = 0;
};

// Runs of each sequence of one rank's shard.
std::vector<SequenceRows> rows_by_sequence(const ShardPlan& shards, int rank) {
  std::vector<SequenceRows> by_seq(static_cast<std::size_t>(shards.batch()));
  for (const auto& run : shards.runs(rank)) {
    auto& s = by_seq[static_cast<std::size_t>(run.seq)];
    if (s.runs.empty()) s.begin = run.row;
    s.runs.push_back(run);
    s.count += run.count;
  }
  return by_seq;
}

void add_sequence_calls(const SequenceRows& q, const SequenceRows& k, bool causal, bool same_shard, HeadRange heads,
                        std::vector<KernelCall>& calls) {
  if (q.count == 0 || k.count == 0) return;
  auto whole = [&](MaskKind mask) { calls.push_back({q.begin, q.count, k.begin, k.count, mask, 0, heads}); };
  if (!causal) return whole(MaskKind::none);
  // The same shard's queries and keys: positions increase inside a sequence, so the index mask is
  // the position mask.
  if (same_shard) return whole(MaskKind::causal_by_index);
  const auto blocks = causal_step_blocks(std::span<const TokenRun>(q.runs), std::span<const TokenRun>(k.runs));
  if (!blocks) return whole(MaskKind::positions);
  for (const auto& b : *blocks)
    calls.push_back({b.q_begin, b.q_count, b.k_begin, b.k_count, b.causal ? MaskKind::causal_by_index : MaskKind::none, 0, heads});
}

}  // namespace

RankPlan ring_rank_plan(const ShardPlan& shards, bool causal, int rank, int q_heads, int kv_heads) {
  LONGATTN_INVALID(q_heads >= 1 && kv_heads >= 1 && q_heads % kv_heads == 0,
                   "query heads ({}) must be a positive multiple of key/value heads ({})", q_heads, kv_heads);
  const int world = shards.world();
  LONGATTN_INVALID(rank >= 0 && rank < world, "rank {} is outside [0, {})", rank, world);
  std::vector<std::vector<SequenceRows>> rows;
  rows.reserve(static_cast<std::size_t>(world));
  for (int r = 0; r < world; ++r) rows.push_back(rows_by_sequence(shards, r));

  RankPlan plan;
  plan.steps.resize(static_cast<std::size_t>(world));
  for (int s = 0; s < world; ++s) {
    auto& step = plan.steps[static_cast<std::size_t>(s)];
    step.rows = RowSpace::shards;
    step.key_shard = (rank - s + world) % world;
    if (s + 1 < world)
      step.ring = RingTransfer{(rank + 1) % world, step.key_shard, (rank - 1 + world) % world, (rank - s - 1 + world) % world};
    const auto& own = rows[static_cast<std::size_t>(rank)];
    const auto& keys = rows[static_cast<std::size_t>(step.key_shard)];
    for (std::size_t b = 0; b < own.size(); ++b)
      add_sequence_calls(own[b], keys[b], causal, step.key_shard == rank, HeadRange{0, q_heads}, step.calls);
  }
  return plan;
}

Plan ring_plan(const ShardPlan& shards, bool causal, int q_heads, int kv_heads) {
  return whole_plan(Strategy::ring, shards.world(), causal, q_heads, kv_heads,
                    [&](int rank) { return ring_rank_plan(shards, causal, rank, q_heads, kv_heads); });
}

}  // namespace longattn::partition
