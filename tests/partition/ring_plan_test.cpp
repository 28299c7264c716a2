// ring_plan as data: for every layout x causal/full x 1..8 ranks x odd lengths and varlen batches,
// every (query, key) pair the mask allows is computed exactly once and no other; the transfers form
// a ring that brings every shard to every rank once; per-rank work is what the layout promises.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>

#include "longattn/error.hpp"
#include "partition/ring_plan.hpp"
#include "plan_simulation.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using partition::MaskKind;
using partition::Plan;

// The batches a case runs on: three odd single lengths (short ones leave ranks without a token)
// and a random packed batch (with an empty and a one-token sequence among them, see
// random_cu_seqlens).
std::vector<std::vector<std::int32_t>> batches_for(std::mt19937_64& rng, int world) {
  auto odd = [&](int at_least) { return static_cast<std::int32_t>(2 * (at_least + static_cast<int>(rng() % 30)) + 1); };
  return {{0, odd(1)}, {0, odd(2 * world)}, {0, odd(40)}, test::random_cu_seqlens(rng, 2 + static_cast<int>(rng() % 3), 40)};
}

std::string describe(const ShardPlan& shards, bool causal) {
  std::ostringstream s;
  s << to_string(shards.layout()) << (causal ? " causal" : " full") << ", P " << shards.world() << ", cu_seqlens";
  for (auto c : shards.cu_seqlens()) s << ' ' << c;
  return s.str();
}

TEST(RingPlan, EveryAllowedPairOnceForEveryLayout) {
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (int world = 1; world <= 8; ++world)
      for (const auto& cu : batches_for(rng, world))
        for (bool causal : {false, true}) {
          const ShardPlan shards(cu, layout, world);
          SCOPED_TRACE(describe(shards, causal) + ", seed " + std::to_string(seed));
          const Plan plan = partition::ring_plan(shards, causal);
          ASSERT_EQ(plan.ranks.size(), static_cast<std::size_t>(world));
          auto cov = test::simulate_plan(plan, shards);
          test::expect_every_allowed_pair_once(cov, shards, causal);
          if (HasFatalFailure()) return;
          // A single sequence never costs the kernels per-token positions (every layout splits into
          // plain blocks).
          if (shards.batch() == 1) {
            for (const auto& rank : plan.ranks)
              for (const auto& step : rank.steps)
                for (const auto& call : step.calls) {
                  EXPECT_NE(call.mask, MaskKind::positions);
                }
          }
        }
}

TEST(RingPlan, TransfersFormARingThatBringsEveryShardOnce) {
  std::mt19937_64 rng(test::fresh_seed());
  for (int world = 1; world <= 8; ++world) {
    const auto layout = static_cast<Layout>(rng() % 3);
    const ShardPlan shards(test::random_cu_seqlens(rng, 3, 30), layout, world);
    SCOPED_TRACE(describe(shards, true));
    // Each rank makes its own part, as an executing rank does; together they must form the ring.
    Plan plan;
    for (int r = 0; r < world; ++r) plan.ranks.push_back(partition::ring_rank_plan(shards, true, r));
    for (int r = 0; r < world; ++r) {
      const auto& steps = plan.ranks[static_cast<std::size_t>(r)].steps;
      ASSERT_EQ(steps.size(), static_cast<std::size_t>(world));
      std::vector<int> seen(static_cast<std::size_t>(world), 0);
      for (int s = 0; s < world; ++s) {
        const auto& step = steps[static_cast<std::size_t>(s)];
        ++seen[static_cast<std::size_t>(step.key_shard)];
        EXPECT_EQ(step.key_shard, s == 0 ? r : steps[static_cast<std::size_t>(s - 1)].ring->recv_shard)
            << "rank " << r << " step " << s << " computes on a shard it does not hold";
        if (s + 1 == world) {
          EXPECT_FALSE(step.ring.has_value()) << "the last step moves nothing";
          continue;
        }
        ASSERT_TRUE(step.ring.has_value());
        EXPECT_EQ(step.ring->send_shard, step.key_shard) << "a rank sends the shard it holds";
        // What r sends at step s, its peer receives from r at the same step.
        const int peer = step.ring->send_to;
        ASSERT_TRUE(peer >= 0 && peer < world);
        const auto& theirs = plan.ranks[static_cast<std::size_t>(peer)].steps[static_cast<std::size_t>(s)].ring;
        ASSERT_TRUE(theirs.has_value());
        EXPECT_EQ(theirs->recv_from, r);
        EXPECT_EQ(theirs->recv_shard, step.ring->send_shard);
      }
      EXPECT_EQ(seen, std::vector<int>(static_cast<std::size_t>(world), 1)) << "rank " << r;
    }
    EXPECT_EQ(plan.ranks, partition::ring_plan(shards, true).ranks) << "one rank's part differs from the whole plan's";
  }
}

TEST(RingPlan, PerRankWorkIsWhatTheLayoutPromises) {
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (int world = 2; world <= 8; ++world)
      for (const auto& cu : batches_for(rng, world)) {
        const ShardPlan shards(cu, layout, world);
        SCOPED_TRACE(describe(shards, true) + ", seed " + std::to_string(seed));
        // Without a mask a rank computes its tokens against their whole sequences, exactly.
        const auto full = test::simulate_plan(partition::ring_plan(shards, false), shards);
        for (int r = 0; r < world; ++r) {
          std::int64_t want = 0;
          for (int b = 0; b + 1 < static_cast<int>(cu.size()); ++b) {
            const ShardPlan seq({0, cu[static_cast<std::size_t>(b) + 1] - cu[static_cast<std::size_t>(b)]}, layout, world);
            want += seq.local_tokens(r) * seq.total_tokens();
          }
          EXPECT_EQ(full.pairs_of_rank[static_cast<std::size_t>(r)], want) << "rank " << r;
        }
        const auto causal = test::simulate_plan(partition::ring_plan(shards, true), shards);
        const auto& work = causal.pairs_of_rank;
        const auto [lo, hi] = std::minmax_element(work.begin(), work.end());
        std::int64_t one_row = 0, balance_bound = 0;
        for (std::size_t b = 0; b + 1 < cu.size(); ++b) {
          one_row += cu[b + 1] - cu[b];
          balance_bound += 2 * (cu[b + 1] - cu[b] + 2 * world);
        }
        if (layout == Layout::contiguous) {
          // Unbalanced by design: later ranks hold later positions, so their work grows with the
          // rank, short of the one token (at most one row of pairs per sequence) that the first
          // ranks of an uneven split hold more.
          for (int r = 1; r < world; ++r)
            EXPECT_GE(work[static_cast<std::size_t>(r)] + one_row, work[static_cast<std::size_t>(r) - 1]) << "rank " << r;
          if (shards.batch() == 1 && one_row >= 8 * world) {
            EXPECT_GT(work.back(), 2 * work.front());
          }
        } else {
          // Balanced: chunks differ by at most one token, so a rank's work is off the others' by at
          // most about two full rows (2 (L + 2P) pairs) per sequence of length L, against
          // L^2 / (2P) per rank.
          EXPECT_LE(*hi - *lo, balance_bound);
        }
        // Zigzag balances every step, not just the sum: at step s every rank computes against a
        // whole pair of chunks (about 2 (L/2P)^2 pairs), off by at most one token per chunk side.
        if (layout == Layout::zigzag) {
          std::int64_t step_bound = 0;
          for (std::size_t b = 0; b + 1 < cu.size(); ++b) step_bound += 4 * ((cu[b + 1] - cu[b]) / (2 * world) + 1);
          for (int s = 1; s < world; ++s) {
            std::int64_t step_lo = INT64_MAX, step_hi = 0;
            for (int r = 0; r < world; ++r) {
              const auto pairs = causal.pairs_of_step[static_cast<std::size_t>(r)][static_cast<std::size_t>(s)];
              step_lo = std::min(step_lo, pairs);
              step_hi = std::max(step_hi, pairs);
            }
            EXPECT_LE(step_hi - step_lo, step_bound) << "step " << s;
          }
        }
      }
}

TEST(RingPlan, RefusesHeadsThatDoNotGroup) {
  std::mt19937_64 rng(test::fresh_seed());
  const int kv_heads = 2 + static_cast<int>(rng() % 4);
  const ShardPlan shards = ShardPlan::single_sequence(17, Layout::zigzag, 2);
  try {
    partition::ring_plan(shards, true, kv_heads + 1, kv_heads);
    FAIL() << "heads not a multiple of kv heads were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("multiple of key/value heads"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn
