// hybrid_plan as data, on two-level shards for U x R in {1x4, 2x2, 4x1, 2x3, 4x2, 8x1, 1x8}: every
// head's every allowed (query, key) pair computed exactly once and no other, for every layout x
// causal/full x GQA/MQA x odd lengths and varlen batches with empty and one-token sequences; calls
// read only the heads their rank received; the all-to-alls stay inside the group and agree between
// sender and receiver; the ring links the ranks of one member index and brings every group's rows
// once; zigzag balances causal work per rank and per step; Ulysses is the one-group hybrid and U = 1
// computes what the ring plan does; heads a group cannot split are refused naming the valid sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>

#include "longattn/error.hpp"
#include "partition/hybrid_plan.hpp"
#include "partition/ring_plan.hpp"
#include "partition/ulysses_plan.hpp"
#include "plan_simulation.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using partition::HeadRange;
using partition::Plan;
using partition::PlanTensor;

struct Degrees {
  int ulysses, ring;
  int world() const { return ulysses * ring; }
};
constexpr Degrees kDegrees[] = {{1, 4}, {2, 2}, {4, 1}, {2, 3}, {4, 2}, {8, 1}, {1, 8}};

// Query heads a multiple of U, and kv heads drawn among those the rule allows (dividing U or a
// multiple of it), MQA included.
struct Heads {
  int q, kv;
};
Heads random_heads(std::mt19937_64& rng, int ulysses) {
  const int q = ulysses * (1 + static_cast<int>(rng() % 2));
  std::vector<int> kv_choices;
  for (int d = 1; d <= q; ++d)
    if (q % d == 0 && (d % ulysses == 0 || ulysses % d == 0)) kv_choices.push_back(d);
  return {q, kv_choices[rng() % kv_choices.size()]};
}

// Batches: an odd single length (short, so some ranks hold no token), an odd one of a few chunks a
// rank, and a packed batch (with an empty and a one-token sequence, see random_cu_seqlens).
std::vector<std::vector<std::int32_t>> batches_for(std::mt19937_64& rng, int world) {
  auto odd = [&](int at_least) { return static_cast<std::int32_t>(2 * (at_least + static_cast<int>(rng() % 12)) + 1); };
  return {{0, odd(1)}, {0, odd(2 * world)}, test::random_cu_seqlens(rng, 2 + static_cast<int>(rng() % 3), 24)};
}

std::string describe(const ShardPlan& shards, bool causal, Heads heads) {
  std::ostringstream s;
  s << to_string(shards.layout()) << (causal ? " causal" : " full") << ", " << shards.group_size() << " x " << shards.groups()
    << ", heads " << heads.q << "/" << heads.kv << ", cu_seqlens";
  for (auto c : shards.cu_seqlens()) s << ' ' << c;
  return s.str();
}

const partition::AllToAll& exchange(const Plan& plan, int rank, std::size_t step, PlanTensor tensor) {
  for (const auto& a : plan.ranks[static_cast<std::size_t>(rank)].steps[step].all_to_all)
    if (a.tensor == tensor) return a;
  throw std::logic_error(std::string("no all-to-all of ") + partition::to_string(tensor));
}

TEST(HybridPlan, EveryHeadsEveryAllowedPairOnceOnTheRanksHeads) {
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  for (const auto d : kDegrees)
    for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
      for (const auto& cu : batches_for(rng, d.world()))
        for (bool causal : {false, true}) {
          const Heads heads = random_heads(rng, d.ulysses);
          const ShardPlan shards(cu, layout, d.world(), d.ulysses);
          SCOPED_TRACE(describe(shards, causal, heads) + ", seed " + std::to_string(seed));
          const Plan plan = partition::hybrid_plan(shards, causal, heads.q, heads.kv);
          ASSERT_EQ(plan.ranks.size(), static_cast<std::size_t>(d.world()));
          EXPECT_EQ(plan.group_size, d.ulysses);
          EXPECT_EQ(plan.strategy, partition::Strategy::hybrid);
          auto cov = test::simulate_plan(plan, shards);
          test::expect_every_allowed_pair_once(cov, shards, causal);
          if (HasFatalFailure()) return;
          // R ring steps and the exchange back; every call on the q heads the rank received and the
          // kv heads it received for them.
          const int per_kv = heads.q / heads.kv;
          for (int r = 0; r < d.world(); ++r) {
            const auto& steps = plan.ranks[static_cast<std::size_t>(r)].steps;
            ASSERT_EQ(steps.size(), static_cast<std::size_t>(d.ring) + 1);
            EXPECT_TRUE(steps.back().calls.empty());
            const HeadRange q = exchange(plan, r, 0, PlanTensor::q).recv_heads[static_cast<std::size_t>(r)];
            const HeadRange kv = exchange(plan, r, 0, PlanTensor::k).recv_heads[static_cast<std::size_t>(r)];
            EXPECT_EQ(q, partition::ulysses_q_heads(heads.q, d.ulysses, r % d.ulysses));
            for (const auto& step : steps)
              for (const auto& call : step.calls) {
                EXPECT_EQ(step.rows, partition::RowSpace::group);
                EXPECT_GE(call.heads.begin, q.begin);
                EXPECT_LE(call.heads.begin + call.heads.count, q.begin + q.count);
                EXPECT_GE(call.heads.begin / per_kv, kv.begin);
                EXPECT_LE((call.heads.begin + call.heads.count - 1) / per_kv, kv.begin + kv.count - 1);
              }
          }
        }
}

TEST(HybridPlan, AllToAllsStayInTheGroupAndAgree) {
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  for (const auto d : kDegrees) {
    const Heads heads = random_heads(rng, d.ulysses);
    const ShardPlan shards(test::random_cu_seqlens(rng, 3, 40), static_cast<Layout>(rng() % 3), d.world(), d.ulysses);
    const bool causal = rng() % 2 == 0;
    SCOPED_TRACE(describe(shards, causal, heads) + ", seed " + std::to_string(seed));
    // Each rank makes its own part, as an executing rank does; the parts must agree with each other.
    Plan plan;
    for (int r = 0; r < d.world(); ++r) plan.ranks.push_back(partition::hybrid_rank_plan(shards, causal, r, heads.q, heads.kv));
    EXPECT_EQ(plan.ranks, partition::hybrid_plan(shards, causal, heads.q, heads.kv).ranks);
    const auto last = static_cast<std::size_t>(d.ring);
    const struct {
      std::size_t step;
      PlanTensor tensor;
    } exchanges[] = {{0, PlanTensor::q}, {0, PlanTensor::k}, {0, PlanTensor::v}, {last, PlanTensor::o}, {last, PlanTensor::lse}};
    for (const auto& x : exchanges)
      for (int a = 0; a < d.world(); ++a) {
        const auto& mine = exchange(plan, a, x.step, x.tensor);
        ASSERT_EQ(mine.send_counts.size(), static_cast<std::size_t>(d.world()));
        ASSERT_EQ(mine.recv_counts.size(), static_cast<std::size_t>(d.world()));
        const int group = a / d.ulysses;
        std::int64_t sent = 0, received = 0;
        for (int b = 0; b < d.world(); ++b) {
          const auto ia = static_cast<std::size_t>(a), ib = static_cast<std::size_t>(b);
          const auto& theirs = exchange(plan, b, x.step, x.tensor);
          EXPECT_EQ(mine.send_counts[ib], theirs.recv_counts[ia]) << to_string(x.tensor) << " from " << a << " to " << b;
          EXPECT_EQ(mine.send_heads[ib], theirs.recv_heads[ia]) << to_string(x.tensor) << " from " << a << " to " << b;
          if (b / d.ulysses != group) {
            EXPECT_EQ(mine.send_counts[ib], 0) << to_string(x.tensor) << " from " << a << " leaves its group to " << b;
            EXPECT_EQ(mine.recv_counts[ib], 0) << to_string(x.tensor) << " to " << a << " from outside its group, " << b;
          }
          sent += mine.send_counts[ib];
          received += mine.recv_counts[ib];
        }
        // In the head layout a rank holds its group's rows for its heads; in the slice layout its
        // own rows for all heads (each kv head once per member that reads it).
        const std::int64_t own = shards.local_tokens(a), group_rows = shards.group_plan().local_tokens(group);
        const int member = a % d.ulysses;
        const int q_share = heads.q / d.ulysses;
        const int kv_share = partition::ulysses_kv_heads(heads.q, heads.kv, d.ulysses, member).count;
        if (x.tensor == PlanTensor::q) {
          EXPECT_EQ(sent, own * heads.q);
          EXPECT_EQ(received, group_rows * q_share);
        } else if (x.tensor == PlanTensor::o || x.tensor == PlanTensor::lse) {
          EXPECT_EQ(sent, group_rows * q_share);
          EXPECT_EQ(received, own * heads.q);
        } else {
          EXPECT_EQ(received, group_rows * kv_share);
        }
      }
  }
}

TEST(HybridPlan, RingLinksOneMemberIndexAndBringsEveryGroupOnce) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const auto d : kDegrees) {
    const Heads heads = random_heads(rng, d.ulysses);
    const ShardPlan shards(test::random_cu_seqlens(rng, 3, 30), static_cast<Layout>(rng() % 3), d.world(), d.ulysses);
    SCOPED_TRACE(describe(shards, true, heads));
    const Plan plan = partition::hybrid_plan(shards, true, heads.q, heads.kv);
    for (int r = 0; r < d.world(); ++r) {
      const auto& steps = plan.ranks[static_cast<std::size_t>(r)].steps;
      std::vector<int> seen(static_cast<std::size_t>(d.ring), 0);
      for (int s = 0; s < d.ring; ++s) {
        const auto& step = steps[static_cast<std::size_t>(s)];
        ASSERT_TRUE(step.key_shard >= 0 && step.key_shard < d.ring);
        ++seen[static_cast<std::size_t>(step.key_shard)];
        EXPECT_EQ(step.key_shard, s == 0 ? r / d.ulysses : steps[static_cast<std::size_t>(s - 1)].ring->recv_shard)
            << "rank " << r << " step " << s << " computes on a group's rows it does not hold";
        if (s + 1 == d.ring) {
          EXPECT_FALSE(step.ring.has_value()) << "the last ring step moves nothing";
          continue;
        }
        ASSERT_TRUE(step.ring.has_value());
        EXPECT_EQ(step.ring->send_shard, step.key_shard);
        // The next group's rank of the same member index, U ranks on; it receives what r sends.
        EXPECT_EQ(step.ring->send_to, (r + d.ulysses) % d.world());
        EXPECT_EQ(step.ring->recv_from, (r - d.ulysses + d.world()) % d.world());
        const auto& theirs = plan.ranks[static_cast<std::size_t>(step.ring->send_to)].steps[static_cast<std::size_t>(s)].ring;
        ASSERT_TRUE(theirs.has_value());
        EXPECT_EQ(theirs->recv_from, r);
        EXPECT_EQ(theirs->recv_shard, step.ring->send_shard);
      }
      EXPECT_EQ(seen, std::vector<int>(static_cast<std::size_t>(d.ring), 1)) << "rank " << r;
      EXPECT_FALSE(steps.back().ring.has_value());
    }
  }
}

TEST(HybridPlan, PerRankWorkIsWhatTheLayoutPromises) {
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  for (const auto d : kDegrees)
    for (Layout layout : {Layout::zigzag, Layout::striped, Layout::contiguous})
      for (const auto& cu : batches_for(rng, d.world())) {
        const int q_heads = d.ulysses * (1 + static_cast<int>(rng() % 2));
        const ShardPlan shards(cu, layout, d.world(), d.ulysses);
        SCOPED_TRACE(describe(shards, true, {q_heads, q_heads}) + ", seed " + std::to_string(seed));
        const int share = q_heads / d.ulysses;
        // Without a mask a rank computes its group's tokens against their whole sequences, for
        // its share of the heads, exactly.
        const auto full = test::simulate_plan(partition::hybrid_plan(shards, false, q_heads, q_heads), shards);
        for (int r = 0; r < d.world(); ++r) {
          std::int64_t want = 0;
          for (std::size_t b = 0; b + 1 < cu.size(); ++b) {
            const ShardPlan seq({0, cu[b + 1] - cu[b]}, layout, d.ring);
            want += seq.local_tokens(r / d.ulysses) * seq.total_tokens() * share;
          }
          EXPECT_EQ(full.pairs_of_rank[static_cast<std::size_t>(r)], want) << "rank " << r;
        }
        if (layout == Layout::contiguous) continue;  // unbalanced under a causal mask by design
        // Balanced: the groups' chunks differ by at most one token, so a group's causal work is off
        // the others' by at most about two full rows (2 (L + 2R) pairs) per sequence of length L,
        // for each of the rank's heads.
        const auto causal = test::simulate_plan(partition::hybrid_plan(shards, true, q_heads, q_heads), shards);
        const auto& work = causal.pairs_of_rank;
        const auto [lo, hi] = std::minmax_element(work.begin(), work.end());
        std::int64_t balance_bound = 0, step_bound = 0;
        for (std::size_t b = 0; b + 1 < cu.size(); ++b) {
          balance_bound += 2 * (cu[b + 1] - cu[b] + 2 * d.ring) * share;
          step_bound += 4 * ((cu[b + 1] - cu[b]) / (2 * d.ring) + 1) * share;
        }
        EXPECT_LE(*hi - *lo, balance_bound);
        // Zigzag balances every ring step, not just the sum.
        if (layout != Layout::zigzag) continue;
        for (int s = 1; s < d.ring; ++s) {
          std::int64_t step_lo = INT64_MAX, step_hi = 0;
          for (int r = 0; r < d.world(); ++r) {
            const auto pairs = causal.pairs_of_step[static_cast<std::size_t>(r)][static_cast<std::size_t>(s)];
            step_lo = std::min(step_lo, pairs);
            step_hi = std::max(step_hi, pairs);
          }
          EXPECT_LE(step_hi - step_lo, step_bound) << "step " << s;
        }
        // Lengths a multiple of 2R give every group equal chunks: then equal work exactly.
        const auto even = static_cast<std::int32_t>(2 * d.ring * (1 + static_cast<int>(rng() % 6)));
        const ShardPlan even_shards({0, even}, Layout::zigzag, d.world(), d.ulysses);
        const auto exact = test::simulate_plan(partition::hybrid_plan(even_shards, true, q_heads, q_heads), even_shards);
        for (int r = 0; r < d.world(); ++r)
          EXPECT_EQ(exact.pairs_of_step[static_cast<std::size_t>(r)], exact.pairs_of_step[0]) << "rank " << r << ", length " << even;
      }
}

TEST(HybridPlan, UlyssesIsOneGroupAndUOneComputesWhatTheRingDoes) {
  std::mt19937_64 rng(test::fresh_seed());
  for (int world = 1; world <= 8; ++world) {
    const auto cu = test::random_cu_seqlens(rng, 3, 30);
    const auto layout = static_cast<Layout>(rng() % 3);
    const bool causal = rng() % 2 == 0;
    const Heads heads = random_heads(rng, world);
    SCOPED_TRACE(testing::Message() << "P " << world << ", heads " << heads.q << "/" << heads.kv);
    const ShardPlan one_group(cu, layout, world, world);
    const Plan ulysses = partition::ulysses_plan(one_group, causal, heads.q, heads.kv);
    EXPECT_EQ(ulysses.strategy, partition::Strategy::ulysses);
    EXPECT_EQ(ulysses.group_size, world);
    EXPECT_EQ(ulysses.ranks, partition::hybrid_plan(one_group, causal, heads.q, heads.kv).ranks);
    // U = 1: the same calls on the same shards as the ring plan; the exchanges are a rank's own
    // rows to itself.
    const ShardPlan ring_shards(cu, layout, world);
    const Plan ring = partition::ring_plan(ring_shards, causal, heads.q, heads.kv);
    const Plan hybrid = partition::hybrid_plan(ShardPlan(cu, layout, world, 1), causal, heads.q, heads.kv);
    for (int r = 0; r < world; ++r) {
      const auto& h = hybrid.ranks[static_cast<std::size_t>(r)].steps;
      const auto& g = ring.ranks[static_cast<std::size_t>(r)].steps;
      ASSERT_EQ(h.size(), g.size() + 1);
      for (std::size_t s = 0; s < g.size(); ++s) {
        EXPECT_EQ(h[s].calls, g[s].calls) << "rank " << r << " step " << s;
        EXPECT_EQ(h[s].ring, g[s].ring) << "rank " << r << " step " << s;
        EXPECT_EQ(h[s].key_shard, g[s].key_shard);
      }
      for (const auto& a : h.front().all_to_all)
        for (int b = 0; b < world; ++b)
          if (b != r) {
            EXPECT_EQ(a.send_counts[static_cast<std::size_t>(b)], 0);
          }
    }
  }
}

TEST(HybridPlan, RefusesHeadsTheGroupCannotSplitNamingTheValidSizes) {
  std::mt19937_64 rng(test::fresh_seed());
  const auto cu = test::random_cu_seqlens(rng, 2, 30);
  auto message_of = [&](int world, int group, int q_heads, int kv_heads) -> std::string {
    try {
      partition::hybrid_plan(ShardPlan(cu, Layout::zigzag, world, group), true, q_heads, kv_heads);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      return e.what();
    }
    ADD_FAILURE() << group << " x " << world / group << " accepted for " << q_heads << "/" << kv_heads << " heads";
    return {};
  };
  // 12 query heads, 3 kv heads on 6 ranks: groups of 2 would split a kv head between members
  // (query heads 0-5 read kv heads 0 and 1); 1, 3 and 6 work.
  const std::string straddle = message_of(6, 2, 12, 3);
  EXPECT_NE(straddle.find("Ulysses size 2 and the 3 kv heads do not divide one another"), std::string::npos) << straddle;
  EXPECT_NE(straddle.find("use a Ulysses size of 1, 3, 6 for 12 query and 3 kv heads on 6 ranks"), std::string::npos)
      << straddle;
  // 12 query heads on groups of 8: 8 does not divide them; of 1, 2, 4, 8, the first three work.
  const std::string heads = message_of(8, 8, 12, 12);
  EXPECT_NE(heads.find("Ulysses size 8 does not divide the 12 query heads"), std::string::npos) << heads;
  EXPECT_NE(heads.find("use a Ulysses size of 1, 2, 4 for"), std::string::npos) << heads;
  const std::string gqa = message_of(4, 2, 6, 4);
  EXPECT_NE(gqa.find("multiple of key/value heads"), std::string::npos) << gqa;
}

}  // namespace
}  // namespace longattn
