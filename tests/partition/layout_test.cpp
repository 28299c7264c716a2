// Shard plans: every token on exactly one rank, round trips, balance of the causal work.
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <set>

#include "longattn/error.hpp"
#include "longattn/layout.hpp"

namespace longattn {
namespace {

class Layouts : public ::testing::TestWithParam<std::tuple<Layout, int>> {};

TEST_P(Layouts, EveryTokenOnExactlyOneRankAndRoundTrip) {
  const auto [layout, world] = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_int_distribution<int> len(0, 50);
  std::vector<std::int32_t> cu{0};
  for (int b = 0; b < 6; ++b) cu.push_back(cu.back() + (b == 0 ? 0 : b == 1 ? 1 : len(rng)));
  ShardPlan plan(cu, layout, world);
  const auto total = cu.back();
  std::vector<std::int32_t> global(static_cast<std::size_t>(total));
  std::iota(global.begin(), global.end(), 1000);
  std::vector<std::int32_t> rebuilt(global.size(), -1);
  std::set<std::int64_t> seen;
  for (int r = 0; r < world; ++r) {
    const auto s = plan.shard(r);
    EXPECT_EQ(s.tokens(), plan.local_tokens(r));
    ASSERT_EQ(s.cu_seqlens.size(), cu.size());
    EXPECT_EQ(s.cu_seqlens.back(), s.tokens());
    for (std::size_t i = 0; i < s.global_index.size(); ++i) {
      EXPECT_TRUE(seen.insert(s.global_index[i]).second) << "token " << s.global_index[i] << " on two ranks";
      // position = index inside its sequence
      const auto g = s.global_index[i];
      const auto b = std::upper_bound(cu.begin(), cu.end(), g) - cu.begin() - 1;
      EXPECT_EQ(s.positions[i], g - cu[static_cast<std::size_t>(b)]);
    }
    std::vector<std::int32_t> local(static_cast<std::size_t>(s.tokens()));
    shard_rows(global.data(), local.data(), 4, s);
    unshard_rows(local.data(), rebuilt.data(), 4, s);
  }
  EXPECT_EQ(static_cast<std::int64_t>(seen.size()), total);
  EXPECT_EQ(rebuilt, global);
  // Chunks differ by at most a couple of tokens per sequence between ranks.
  std::int64_t lo = plan.local_tokens(0), hi = lo;
  for (int r = 1; r < world; ++r) {
    lo = std::min(lo, plan.local_tokens(r));
    hi = std::max(hi, plan.local_tokens(r));
  }
  EXPECT_LE(hi - lo, 2 * 6);
}

// The runs describe exactly the shard's tokens, row by row, with at most two runs per sequence.
TEST_P(Layouts, RunsAreTheShardWithoutPerTokenLists) {
  const auto [layout, world] = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_int_distribution<int> len(0, 70);
  std::vector<std::int32_t> cu{0};
  for (int b = 0; b < 5; ++b) cu.push_back(cu.back() + (b == 0 ? 1 : len(rng)));
  ShardPlan plan(cu, layout, world);
  for (int r = 0; r < world; ++r) {
    const auto s = plan.shard(r);
    const auto runs = plan.runs(r);
    EXPECT_LE(runs.size(), 2 * cu.size());
    std::vector<std::int32_t> positions;
    std::vector<std::int64_t> global;
    std::int64_t row = 0;
    for (const auto& run : runs) {
      EXPECT_EQ(run.row, row) << "runs out of local order";
      EXPECT_GT(run.count, 0);
      for (std::int64_t i = 0; i < run.count; ++i) {
        positions.push_back(static_cast<std::int32_t>(run.first + i * run.stride));
        global.push_back(cu[static_cast<std::size_t>(run.seq)] + positions.back());
      }
      row += run.count;
    }
    EXPECT_EQ(positions, s.positions) << "rank " << r;
    EXPECT_EQ(global, s.global_index) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(All, Layouts,
                         ::testing::Combine(::testing::Values(Layout::contiguous, Layout::zigzag, Layout::striped),
                                            ::testing::Range(1, 9)),
                         [](const auto& param_info) {
                           return std::string(to_string(std::get<0>(param_info.param))) + "_P" + std::to_string(std::get<1>(param_info.param));
                         });

// Causal work of rank r: number of (query, key) pairs with key position <= query position summed over
// ring steps = sum over local queries of (position + 1).
std::int64_t causal_work(const RankShard& s) {
  std::int64_t w = 0;
  for (auto p : s.positions) w += p + 1;
  return w;
}

TEST(Layouts, ZigzagAndStripedBalanceCausalWorkContiguousDoesNot) {
  const int world = 4;
  auto spread = [&](Layout l) {
    auto plan = ShardPlan::single_sequence(4096, l, world);
    std::int64_t lo = INT64_MAX, hi = 0;
    for (int r = 0; r < world; ++r) {
      lo = std::min(lo, causal_work(plan.shard(r)));
      hi = std::max(hi, causal_work(plan.shard(r)));
    }
    return static_cast<double>(hi) / static_cast<double>(lo);
  };
  EXPECT_LT(spread(Layout::zigzag), 1.001);
  EXPECT_LT(spread(Layout::striped), 1.01);
  EXPECT_GT(spread(Layout::contiguous), 5.0);
}

TEST(Layouts, ZigzagChunksAreTheRightOnes) {
  auto s = ShardPlan::single_sequence(16, Layout::zigzag, 2).shard(0);
  EXPECT_EQ(s.positions, (std::vector<std::int32_t>{0, 1, 2, 3, 12, 13, 14, 15}));
  s = ShardPlan::single_sequence(6, Layout::striped, 4).shard(1);
  EXPECT_EQ(s.positions, (std::vector<std::int32_t>{1, 5}));
}

TEST(Layouts, BadInputIsRefused) {
  EXPECT_THROW(ShardPlan::single_sequence(0, Layout::zigzag, 2), Error);
  EXPECT_THROW(ShardPlan({0, 5, 3}, Layout::zigzag, 2), Error);
  EXPECT_THROW(ShardPlan({0, 5}, Layout::zigzag, 0), Error);
  EXPECT_THROW(parse_layout("diagonal"), Error);
  EXPECT_THROW(ShardPlan::single_sequence(8, Layout::zigzag, 2).shard(2), Error);
}

// Two-level plans (Ulysses groups inside a ring of groups): a group's members hold contiguous slices
// of what the group holds under the one-level plan over groups, in order, so concatenating the
// members' rows gives the group's rows; runs, shards and counts agree.
TEST(TwoLevelLayouts, MembersSliceTheirGroupsShardInOrder) {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_int_distribution<int> len(0, 60);
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped}) {
    for (auto [world, group] : {std::pair{4, 2}, std::pair{6, 3}, std::pair{8, 4}, std::pair{4, 4}, std::pair{3, 1}}) {
      std::vector<std::int32_t> cu{0};
      for (int b = 0; b < 5; ++b) cu.push_back(cu.back() + (b == 0 ? 0 : b == 1 ? 1 : len(rng)));
      const ShardPlan plan(cu, layout, world, group);
      EXPECT_EQ(plan.groups(), world / group);
      const ShardPlan over_groups = plan.group_plan();
      for (int g = 0; g < plan.groups(); ++g) {
        std::vector<std::int64_t> members;
        std::int64_t lo = INT64_MAX, hi = 0;
        for (int u = 0; u < group; ++u) {
          const int r = g * group + u;
          const auto s = plan.shard(r);
          EXPECT_EQ(s.tokens(), plan.local_tokens(r));
          EXPECT_EQ(plan.group_row_begin(r), static_cast<std::int64_t>(members.size()));
          EXPECT_EQ(s.cu_seqlens.back(), s.tokens());
          members.insert(members.end(), s.global_index.begin(), s.global_index.end());
          lo = std::min(lo, s.tokens());
          hi = std::max(hi, s.tokens());
          // The runs spell out the same tokens, rows counted from the member's first row.
          std::int64_t row = 0;
          for (const auto& run : plan.runs(r)) {
            EXPECT_EQ(run.row, row);
            for (std::int64_t i = 0; i < run.count; ++i, ++row) {
              EXPECT_EQ(s.positions[static_cast<std::size_t>(row)], run.first + i * run.stride);
              EXPECT_EQ(s.global_index[static_cast<std::size_t>(row)], cu[static_cast<std::size_t>(run.seq)] + run.first + i * run.stride);
            }
          }
          EXPECT_EQ(row, s.tokens());
        }
        EXPECT_EQ(members, over_groups.shard(g).global_index) << to_string(layout) << " world " << world << " group " << group;
        EXPECT_LE(hi - lo, 1);
      }
    }
  }
}

TEST(TwoLevelLayouts, GroupSizeMustDivideTheRanks) {
  try {
    ShardPlan({0, 16}, Layout::zigzag, 6, 4);
    FAIL() << "a group of 4 in 6 ranks was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1, 2, 3, 6"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ShardPlan({0, 16}, Layout::zigzag, 4, 0), Error);
}

}  // namespace
}  // namespace longattn
