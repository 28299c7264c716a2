// Runs a partition::Plan as data: which (query, key) pairs of which head every call computes,
// mapped back to global tokens, so tests can compare a plan against the mask pair by pair.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "longattn/layout.hpp"
#include "partition/plan.hpp"

namespace longattn::test {

struct PlanCoverage {
  std::int64_t tokens = 0;
  int heads = 0;
  std::vector<int> times;                   // [head][query token][key token]: how often computed
  std::vector<std::int64_t> pairs_of_rank;  // (query, key, head) triples each rank computes
  std::vector<std::vector<std::int64_t>> pairs_of_step;  // [rank][step]: the same per step
  int& at(int h, std::int64_t i, std::int64_t j) { return times[(static_cast<std::size_t>(h) * tokens + i) * tokens + j]; }
};

// The sequence and position inside it of every token of the packed batch.
struct TokenPlaces {
  std::vector<int> seq;
  std::vector<std::int32_t> pos;
  explicit TokenPlaces(const std::vector<std::int32_t>& cu) {
    for (std::size_t b = 0; b + 1 < cu.size(); ++b)
      for (std::int32_t p = 0; p < cu[b + 1] - cu[b]; ++p) {
        seq.push_back(static_cast<int>(b));
        pos.push_back(p);
      }
  }
};

// Fails the test (and stops counting) on a call whose rows or heads fall outside what it may read,
// and on a plan whose groups (Plan::group_size) are not the shards' groups.
inline PlanCoverage simulate_plan(const partition::Plan& plan, const ShardPlan& shards) {
  using partition::MaskKind;
  PlanCoverage cov;
  cov.tokens = shards.total_tokens();
  cov.heads = plan.q_heads;
  cov.times.assign(static_cast<std::size_t>(cov.heads * cov.tokens * cov.tokens), 0);
  cov.pairs_of_rank.assign(static_cast<std::size_t>(plan.world), 0);
  cov.pairs_of_step.assign(static_cast<std::size_t>(plan.world), {});
  const TokenPlaces places(shards.cu_seqlens());
  std::vector<std::vector<std::int64_t>> shard_of_rows;
  for (int r = 0; r < plan.world; ++r) shard_of_rows.push_back(shards.shard(r).global_index);
  const std::vector<std::int64_t> all_rows = [&] {
    std::vector<std::int64_t> rows(static_cast<std::size_t>(cov.tokens));
    for (std::int64_t t = 0; t < cov.tokens; ++t) rows[static_cast<std::size_t>(t)] = t;
    return rows;
  }();
  // RowSpace::group: a group's rows are its members' rows concatenated, the group plan's shard.
  std::vector<std::vector<std::int64_t>> group_rows;
  bool uses_groups = false;
  for (const auto& rank : plan.ranks)
    for (const auto& step : rank.steps) uses_groups = uses_groups || step.rows == partition::RowSpace::group;
  if (uses_groups) {
    if (shards.group_size() != plan.group_size) {
      ADD_FAILURE() << "a plan for groups of " << plan.group_size << " ranks simulated on shards in groups of "
                    << shards.group_size();
      return cov;
    }
    const ShardPlan by_group = shards.group_plan();
    for (int g = 0; g < by_group.world(); ++g) group_rows.push_back(by_group.shard(g).global_index);
  }
  for (int r = 0; r < plan.world; ++r)
    for (const auto& step : plan.ranks[static_cast<std::size_t>(r)].steps) {
      auto& step_pairs = cov.pairs_of_step[static_cast<std::size_t>(r)].emplace_back(0);
      for (const auto& call : step.calls) {
        const bool gathered = step.rows == partition::RowSpace::gathered;
        const bool grouped = step.rows == partition::RowSpace::group;
        const auto& key_shards = grouped ? group_rows : shard_of_rows;
        if (!gathered && (step.key_shard < 0 || step.key_shard >= static_cast<int>(key_shards.size()))) {
          ADD_FAILURE() << "rank " << r << ": a step reads the shard of " << (grouped ? "group " : "rank ") << step.key_shard;
          return cov;
        }
        const auto& q_rows = gathered ? all_rows
                             : grouped ? group_rows[static_cast<std::size_t>(r / plan.group_size)]
                                       : shard_of_rows[static_cast<std::size_t>(r)];
        const auto& k_rows = gathered ? all_rows : key_shards[static_cast<std::size_t>(step.key_shard)];
        const auto nq = static_cast<std::int64_t>(q_rows.size()), nk = static_cast<std::int64_t>(k_rows.size());
        if (call.q_begin < 0 || call.q_count < 1 || call.q_begin + call.q_count > nq || call.k_begin < 0 || call.k_count < 1 ||
            call.k_begin + call.k_count > nk || call.heads.begin < 0 || call.heads.count < 1 ||
            call.heads.begin + call.heads.count > plan.q_heads) {
          ADD_FAILURE() << "rank " << r << ": a call outside its rows or heads: q [" << call.q_begin << ", +" << call.q_count
                        << ") of " << nq << ", k [" << call.k_begin << ", +" << call.k_count << ") of " << nk << ", heads ["
                        << call.heads.begin << ", +" << call.heads.count << ")";
          return cov;
        }
        for (std::int64_t i = 0; i < call.q_count; ++i)
          for (std::int64_t j = 0; j < call.k_count; ++j) {
            const auto qi = q_rows[static_cast<std::size_t>(call.q_begin + i)];
            const auto kj = k_rows[static_cast<std::size_t>(call.k_begin + j)];
            bool visible = true;
            if (call.mask == MaskKind::causal_by_index) visible = j <= i + call.causal_offset;
            if (call.mask == MaskKind::positions)
              visible = places.pos[static_cast<std::size_t>(kj)] <= places.pos[static_cast<std::size_t>(qi)];
            if (!visible) continue;
            for (int h = call.heads.begin; h < call.heads.begin + call.heads.count; ++h) ++cov.at(h, qi, kj);
            cov.pairs_of_rank[static_cast<std::size_t>(r)] += call.heads.count;
            step_pairs += call.heads.count;
          }
      }
    }
  return cov;
}

// Fails the test unless every pair the mask allows (same sequence, and key position <= query
// position when causal) is computed exactly once for every head, and no other pair at all.
inline void expect_every_allowed_pair_once(PlanCoverage& cov, const ShardPlan& shards, bool causal) {
  const TokenPlaces places(shards.cu_seqlens());
  for (int h = 0; h < cov.heads; ++h)
    for (std::int64_t i = 0; i < cov.tokens; ++i)
      for (std::int64_t j = 0; j < cov.tokens; ++j) {
        const auto qi = static_cast<std::size_t>(i), kj = static_cast<std::size_t>(j);
        const bool allowed = places.seq[qi] == places.seq[kj] && (!causal || places.pos[kj] <= places.pos[qi]);
        ASSERT_EQ(cov.at(h, i, j), allowed ? 1 : 0)
            << "head " << h << ", query token " << i << " (sequence " << places.seq[qi] << ", position " << places.pos[qi]
            << "), key token " << j << " (sequence " << places.seq[kj] << ", position " << places.pos[kj] << ")";
      }
}

}  // namespace longattn::test
