// runtime::varlen_rank_calls, the launches each rank of a varlen plan runs (what balance-measure
// times): over all ranks, every (query, key) pair the causal mask allows inside a sequence is
// computed exactly once for every head, and nothing else is, for the hierarchical plan, the
// baselines and a hybrid group, on fresh random batches with 0- and 1-token sequences and one
// sequence longer than all the others together.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <tuple>
#include <vector>

#include "longattn/error.hpp"
#include "partition/cost_model.hpp"
#include "partition/varlen_planner.hpp"
#include "runtime/varlen_rank_calls.hpp"

namespace longattn {
namespace {

using partition::VarlenPlan;

constexpr int kHeads = 4, kKvHeads = 2;

std::vector<std::int64_t> random_lengths(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> count(3, 8), length(2, 24);
  std::vector<std::int64_t> lengths{0, 1};
  const int n = count(rng);
  std::int64_t others = 1;
  for (int i = 0; i < n; ++i) {
    lengths.push_back(length(rng));
    others += lengths.back();
  }
  lengths.push_back(others + std::uniform_int_distribution<int>(1, 9)(rng));  // longer than all the others
  std::shuffle(lengths.begin(), lengths.end(), rng);
  return lengths;
}

// A row of a shard as (sequence of the plan, position in it).
struct Token {
  int sequence = 0;
  std::int32_t position = 0;
};

std::vector<Token> tokens_of(const ShardPlan& shards, int member, const partition::VarlenGroup& group) {
  const auto shard = shards.shard(member);
  const auto& cu = shards.cu_seqlens();
  std::vector<Token> out;
  for (std::size_t r = 0; r < shard.global_index.size(); ++r) {
    const auto b = static_cast<std::size_t>(std::upper_bound(cu.begin(), cu.end(), shard.global_index[r]) - cu.begin()) - 1;
    out.push_back({group.sequences[b], shard.positions[r]});
  }
  return out;
}

// (sequence, query position, key position, head) -> times computed.
using PairCounts = std::map<std::tuple<int, std::int32_t, std::int32_t, int>, int>;

void count_plan(const VarlenPlan& plan, PairCounts& counts) {
  for (int rank = 0; rank < plan.ranks; ++rank) {
    for (const auto& c : runtime::varlen_rank_calls(plan, rank, kHeads, kKvHeads, true)) {
      const auto& group = plan.groups[static_cast<std::size_t>(c.group)];
      const int member = rank - group.first_rank;
      const bool hybrid = group.sharding == partition::Sharding::hybrid;
      const ShardPlan shards = hybrid ? plan.group_shard_plan(c.group).group_plan() : plan.group_shard_plan(c.group);
      const int ring_member = hybrid ? member / group.ulysses : member;
      const auto queries = tokens_of(shards, ring_member, group);
      const auto keys = tokens_of(shards, c.key_shard, group);
      ASSERT_EQ(static_cast<std::int64_t>(queries.size()), c.query_rows);
      ASSERT_EQ(static_cast<std::int64_t>(keys.size()), c.key_rows);
      ASSERT_LE(c.q_begin + c.q_count, c.query_rows);
      ASSERT_LE(c.k_begin + c.k_count, c.key_rows);
      std::vector<std::int32_t> cu_q{0, static_cast<std::int32_t>(c.q_count)}, cu_k{0, static_cast<std::int32_t>(c.k_count)};
      if (!c.cu_q.empty()) {
        cu_q = c.cu_q;
        cu_k = c.cu_k;
      }
      ASSERT_EQ(cu_q.size(), cu_k.size());
      ASSERT_EQ(cu_q.back(), c.q_count);
      ASSERT_EQ(cu_k.back(), c.k_count);
      for (std::size_t b = 0; b + 1 < cu_q.size(); ++b)
        for (std::int64_t i = 0; i < cu_q[b + 1] - cu_q[b]; ++i)
          for (std::int64_t j = 0; j < cu_k[b + 1] - cu_k[b]; ++j) {
            if (c.causal && j > i) continue;
            const auto& q = queries[static_cast<std::size_t>(c.q_begin + cu_q[b] + i)];
            const auto& k = keys[static_cast<std::size_t>(c.k_begin + cu_k[b] + j)];
            for (int h = c.head_begin; h < c.head_begin + c.query_heads; ++h) {
              // A pair across sequences would be a wrong call: count it under the query's sequence
              // with an impossible key position so the comparison below names it.
              const std::int32_t key_position = q.sequence == k.sequence ? k.position : -1 - k.position;
              ++counts[{q.sequence, q.position, key_position, h}];
            }
          }
    }
  }
}

void expect_every_causal_pair_once(const VarlenPlan& plan, const char* what) {
  PairCounts counts;
  count_plan(plan, counts);
  if (testing::Test::HasFatalFailure()) return;
  PairCounts expected;
  for (std::size_t s = 0; s < plan.lengths.size(); ++s)
    for (std::int32_t i = 0; i < plan.lengths[s]; ++i)
      for (std::int32_t j = 0; j <= i; ++j)
        for (int h = 0; h < kHeads; ++h) expected[{static_cast<int>(s), i, j, h}] = 1;
  EXPECT_EQ(counts.size(), expected.size()) << what;
  int shown = 0;
  for (const auto& [key, n] : counts) {
    const auto it = expected.find(key);
    if ((it == expected.end() || n != 1) && shown++ < 5)
      ADD_FAILURE() << what << ": sequence " << std::get<0>(key) << " query " << std::get<1>(key) << " key " << std::get<2>(key)
                    << " head " << std::get<3>(key) << " computed " << n << " times";
  }
}

partition::VarlenProblem problem_of(std::vector<std::int64_t> lengths, int ranks, int gpus_per_node) {
  partition::VarlenProblem p;
  p.lengths = std::move(lengths);
  p.ranks = ranks;
  p.gpus_per_node = gpus_per_node;
  p.shape.query_heads = kHeads;
  p.shape.kv_heads = kKvHeads;
  p.shape.head_dim = 16;
  return p;
}

TEST(VarlenRankCalls, EveryPlanComputesEachCausalPairOnce) {
  std::mt19937_64 rng(std::random_device{}());
  const auto machine = partition::default_machine("h200");
  for (const auto& [ranks, gpus_per_node] : {std::pair{1, 1}, std::pair{2, 2}, std::pair{4, 4}, std::pair{8, 4}}) {
    const auto problem = problem_of(random_lengths(rng), ranks, gpus_per_node);
    SCOPED_TRACE(testing::Message() << ranks << " ranks, " << gpus_per_node << " per node, " << problem.lengths.size() << " sequences");
    expect_every_causal_pair_once(partition::plan_hierarchical(problem, machine), "hierarchical");
    expect_every_causal_pair_once(partition::plan_per_sequence_zigzag(problem, machine), "per-sequence-zigzag");
    expect_every_causal_pair_once(partition::plan_whole_sequences(problem, machine), "whole-sequences");
  }
}

TEST(VarlenRankCalls, HybridGroupSplitsHeadsAndRingsOverUlyssesGroups) {
  std::mt19937_64 rng(std::random_device{}());
  const auto machine = partition::default_machine("h200");
  for (const int ulysses : {2, 4}) {
    const auto problem = problem_of(random_lengths(rng), 8, 4);
    auto plan = partition::plan_per_sequence_zigzag(problem, machine);  // one group of all ranks
    ASSERT_EQ(plan.groups.size(), 1u);
    plan.groups[0].sharding = partition::Sharding::hybrid;
    plan.groups[0].ulysses = ulysses;
    SCOPED_TRACE(testing::Message() << "Ulysses groups of " << ulysses);
    expect_every_causal_pair_once(plan, "hybrid");
    const auto calls = runtime::varlen_rank_calls(plan, 1, kHeads, kKvHeads, true);
    ASSERT_FALSE(calls.empty());
    EXPECT_EQ(calls.front().query_heads, kHeads / ulysses);
  }
}

TEST(VarlenRankCalls, ChunkedPlanIsRefused) {
  const auto problem = problem_of({300, 40, 7}, 2, 2);
  const auto plan = partition::plan_flat_minheap(problem, partition::default_machine("h200"), 64);
  try {
    runtime::varlen_rank_calls(plan, 0, kHeads, kKvHeads, true);
    FAIL() << "a chunked plan was listed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no executor"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn
