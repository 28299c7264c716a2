// causal_step_blocks against brute force: the blocks must cover every visible (query, key) pair
// exactly once and no hidden pair, for every layout's shards (P = 1..7, uneven lengths) and for
// random sorted position sets; and zigzag/striped off-diagonal steps must cost one call.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "longattn/layout.hpp"
#include "partition/step_blocks.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using partition::StepBlock;

// Fails the test unless blocks cover exactly the pairs with kpos[j] <= qpos[i], each once, and every
// causal block really is "causal by index" there.
void expect_exact(const std::vector<std::int32_t>& qpos, const std::vector<std::int32_t>& kpos,
                  const std::vector<StepBlock>& blocks) {
  const auto n = qpos.size(), m = kpos.size();
  std::vector<int> cover(n * m, 0);
  for (const auto& b : blocks) {
    ASSERT_GE(b.q_begin, 0);
    ASSERT_GE(b.k_begin, 0);
    ASSERT_GT(b.q_count, 0);
    ASSERT_GT(b.k_count, 0);
    ASSERT_LE(static_cast<std::size_t>(b.q_begin + b.q_count), n);
    ASSERT_LE(static_cast<std::size_t>(b.k_begin + b.k_count), m);
    for (auto i = 0; i < b.q_count; ++i)
      for (auto j = 0; j < b.k_count; ++j)
        if (!b.causal || j <= i) ++cover[(b.q_begin + i) * m + (b.k_begin + j)];
  }
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < m; ++j) {
      const int want = kpos[j] <= qpos[i] ? 1 : 0;
      ASSERT_EQ(cover[i * m + j], want) << "query " << i << " (pos " << qpos[i] << "), key " << j << " (pos " << kpos[j] << ")";
    }
}

TEST(StepBlocks, EveryLayoutsShardsSplitExactly) {
  std::mt19937_64 rng(test::fresh_seed());
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (int world = 1; world <= 7; ++world) {
      const std::int64_t len = 3 * 2 * world + static_cast<std::int64_t>(rng() % 97);  // uneven chunks
      const auto plan = ShardPlan::single_sequence(len, layout, world);
      for (int r = 0; r < world; ++r)
        for (int src = 0; src < world; ++src) {
          SCOPED_TRACE(testing::Message() << to_string(layout) << " P " << world << " len " << len << " rank " << r << " src " << src);
          const auto q = plan.shard(r).positions, k = plan.shard(src).positions;
          const auto blocks = partition::causal_step_blocks(q, k);
          ASSERT_TRUE(blocks.has_value()) << "no plain decomposition";
          expect_exact(q, k, *blocks);
          if (src == r) {
            EXPECT_EQ(blocks->size(), 1u);
          } else if (layout != Layout::contiguous) {
            EXPECT_LE(blocks->size(), 1u) << "an off-diagonal step should be one call";
          }
        }
    }
}

TEST(StepBlocks, RandomPositionsAreExactOrRefused) {
  std::mt19937_64 rng(test::fresh_seed());
  int decomposed = 0;
  for (int trial = 0; trial < 300; ++trial) {
    auto draw = [&](int runs) {
      std::vector<std::int32_t> pos;
      std::int32_t p = static_cast<std::int32_t>(rng() % 50);
      const int stride = 1 + static_cast<int>(rng() % 3);
      for (int r = 0; r < runs; ++r) {
        const int len = 1 + static_cast<int>(rng() % 20);
        for (int i = 0; i < len; ++i, p += stride) pos.push_back(p);
        p += static_cast<std::int32_t>(rng() % 40);
      }
      return pos;
    };
    const auto q = draw(1 + static_cast<int>(rng() % 3)), k = draw(1 + static_cast<int>(rng() % 3));
    SCOPED_TRACE(testing::Message() << "trial " << trial);
    const auto blocks = partition::causal_step_blocks(q, k, 8);
    if (!blocks) continue;
    ++decomposed;
    expect_exact(q, k, *blocks);
  }
  EXPECT_GT(decomposed, 100) << "almost nothing decomposed";
}

// Positions spelled out from runs.
std::vector<std::int32_t> positions_of(const std::vector<TokenRun>& runs) {
  std::vector<std::int32_t> pos;
  for (const auto& r : runs)
    for (std::int64_t i = 0; i < r.count; ++i) pos.push_back(static_cast<std::int32_t>(r.first + i * r.stride));
  return pos;
}

// Planning from runs gives the very blocks that planning from the positions gives, for every
// layout's shards (lengths down to fewer tokens than ranks, so some chunks are empty).
TEST(StepBlocks, RunsGiveTheBlocksOfThePositions) {
  std::mt19937_64 rng(test::fresh_seed());
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (int world = 1; world <= 7; ++world)
      for (std::int64_t len : {std::int64_t{1} + static_cast<std::int64_t>(rng() % 5), 3 * 2 * world + static_cast<std::int64_t>(rng() % 97)}) {
        const auto plan = ShardPlan::single_sequence(len, layout, world);
        for (int r = 0; r < world; ++r)
          for (int src = 0; src < world; ++src) {
            SCOPED_TRACE(testing::Message() << to_string(layout) << " P " << world << " len " << len << " rank " << r << " src " << src);
            const auto qr = plan.runs(r), kr = plan.runs(src);
            ASSERT_EQ(positions_of(qr), plan.shard(r).positions);
            EXPECT_EQ(partition::causal_step_blocks(std::span<const TokenRun>(qr), std::span<const TokenRun>(kr)),
                      partition::causal_step_blocks(plan.shard(r).positions, plan.shard(src).positions));
          }
      }
}

// The same for random increasing runs of mixed strides, where some steps cannot be cut into few
// blocks: both refuse together, or give the same blocks.
TEST(StepBlocks, RandomRunsAgreeWithTheirPositions) {
  std::mt19937_64 rng(test::fresh_seed());
  int decomposed = 0;
  for (int trial = 0; trial < 400; ++trial) {
    auto draw = [&](int count) {
      std::vector<TokenRun> runs;
      std::int32_t p = static_cast<std::int32_t>(rng() % 50);
      std::int64_t row = 0;
      for (int r = 0; r < count; ++r) {
        const auto stride = static_cast<std::int32_t>(1 + rng() % 3);
        const auto n = static_cast<std::int64_t>(1 + rng() % 12);
        runs.push_back({0, row, n, p, stride});
        row += n;
        p += static_cast<std::int32_t>(n * stride + static_cast<std::int64_t>(rng() % 4) * stride * static_cast<std::int64_t>(rng() % 2));
        if (rng() % 2) p += static_cast<std::int32_t>(rng() % 30);
      }
      return runs;
    };
    const auto q = draw(1 + static_cast<int>(rng() % 3)), k = draw(1 + static_cast<int>(rng() % 3));
    SCOPED_TRACE(testing::Message() << "trial " << trial);
    const auto from_runs = partition::causal_step_blocks(std::span<const TokenRun>(q), std::span<const TokenRun>(k), 8);
    EXPECT_EQ(from_runs, partition::causal_step_blocks(positions_of(q), positions_of(k), 8));
    decomposed += from_runs.has_value();
  }
  EXPECT_GT(decomposed, 100) << "almost nothing decomposed";
}

TEST(StepBlocks, EmptySidesAndTooManyRuns) {
  const std::vector<std::int32_t> none, some{1, 2, 3};
  EXPECT_TRUE(partition::causal_step_blocks(none, some)->empty());
  EXPECT_TRUE(partition::causal_step_blocks(some, none)->empty());
  std::vector<std::int32_t> scattered;
  for (int i = 0; i < 40; ++i) scattered.push_back(i * i);
  EXPECT_FALSE(partition::causal_step_blocks(scattered, scattered.size() > 1 ? std::vector<std::int32_t>{0, 5, 7, 30, 31, 90} : none).has_value());
}

}  // namespace
}  // namespace longattn
