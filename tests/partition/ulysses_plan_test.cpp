// ulysses_plan as data: every head's every allowed (query, key) pair computed exactly once and no
// other, for every layout x causal/full x group sizes 1..8 x odd lengths and varlen batches; the
// all-to-all counts agree between sender and receiver and bring every token-head where it belongs;
// GQA/MQA kv heads go to exactly the ranks that read them; heads the group does not divide, kv
// heads that do not divide the group (nor it them), and one-level shards are refused.
#include <gtest/gtest.h>

#include <random>
#include <set>
#include <sstream>
#include <string>

#include "longattn/error.hpp"
#include "partition/ulysses_plan.hpp"
#include "plan_simulation.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using partition::HeadRange;
using partition::Plan;
using partition::PlanTensor;

struct Case {
  std::vector<std::int32_t> cu;
  Layout layout;
  int world, q_heads, kv_heads;
  bool causal;
  std::string describe() const {
    std::ostringstream s;
    s << to_string(layout) << (causal ? " causal" : " full") << ", P " << world << ", heads " << q_heads << "/" << kv_heads
      << ", cu_seqlens";
    for (auto c : cu) s << ' ' << c;
    return s.str();
  }
};

// Random shapes Ulysses accepts: q_heads a multiple of the group, kv_heads a divisor of q_heads that
// divides the group or is divisible by it.
std::vector<Case> random_cases(std::mt19937_64& rng) {
  std::vector<Case> cases;
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (int world = 1; world <= 8; ++world)
      for (bool causal : {false, true}) {
        const int q_heads = world * (1 + static_cast<int>(rng() % 2));
        std::vector<int> divisors;
        for (int d = 1; d <= q_heads; ++d)
          if (q_heads % d == 0 && (d % world == 0 || world % d == 0)) divisors.push_back(d);
        const int kv_heads = divisors[rng() % divisors.size()];
        const auto odd = static_cast<std::int32_t>(2 * (static_cast<int>(rng() % 20) + world) + 1);
        cases.push_back({{0, odd}, layout, world, q_heads, kv_heads, causal});
        cases.push_back({test::random_cu_seqlens(rng, 2 + static_cast<int>(rng() % 3), 25), layout, world, q_heads, kv_heads, causal});
      }
  return cases;
}

const partition::AllToAll& exchange(const Plan& plan, int rank, int step, PlanTensor tensor) {
  for (const auto& a : plan.ranks[static_cast<std::size_t>(rank)].steps[static_cast<std::size_t>(step)].all_to_all)
    if (a.tensor == tensor) return a;
  throw std::logic_error(std::string("no all-to-all of ") + partition::to_string(tensor));
}

TEST(UlyssesPlan, EveryHeadsEveryAllowedPairOnce) {
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  for (const auto& c : random_cases(rng)) {
    SCOPED_TRACE(c.describe() + ", seed " + std::to_string(seed));
    const ShardPlan shards(c.cu, c.layout, c.world, c.world);
    const Plan plan = partition::ulysses_plan(shards, c.causal, c.q_heads, c.kv_heads);
    auto cov = test::simulate_plan(plan, shards);
    test::expect_every_allowed_pair_once(cov, shards, c.causal);
    if (HasFatalFailure()) return;
    // A call reads only the heads its rank received: its q heads, and the kv heads they map to.
    const int group = c.q_heads / c.kv_heads;
    for (int r = 0; r < c.world; ++r) {
      const HeadRange q = exchange(plan, r, 0, PlanTensor::q).recv_heads[0];
      const HeadRange kv = exchange(plan, r, 0, PlanTensor::k).recv_heads[0];
      for (const auto& call : plan.ranks[static_cast<std::size_t>(r)].steps[0].calls) {
        EXPECT_GE(call.heads.begin, q.begin);
        EXPECT_LE(call.heads.begin + call.heads.count, q.begin + q.count);
        EXPECT_GE(call.heads.begin / group, kv.begin);
        EXPECT_LE((call.heads.begin + call.heads.count - 1) / group, kv.begin + kv.count - 1);
      }
    }
  }
}

TEST(UlyssesPlan, AllToAllCountsAgreeAndDeliverEveryTokenHead) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const auto& c : random_cases(rng)) {
    SCOPED_TRACE(c.describe());
    const ShardPlan shards(c.cu, c.layout, c.world, c.world);
    // Each rank makes its own part, as an executing rank does; the parts must agree with each other.
    Plan plan;
    for (int r = 0; r < c.world; ++r) plan.ranks.push_back(partition::ulysses_rank_plan(shards, c.causal, r, c.q_heads, c.kv_heads));
    EXPECT_EQ(plan.ranks, partition::ulysses_plan(shards, c.causal, c.q_heads, c.kv_heads).ranks);
    const struct {
      int step;
      PlanTensor tensor;
    } exchanges[] = {{0, PlanTensor::q}, {0, PlanTensor::k}, {0, PlanTensor::v}, {1, PlanTensor::o}, {1, PlanTensor::lse}};
    for (const auto& x : exchanges)
      for (int a = 0; a < c.world; ++a) {
        const auto& mine = exchange(plan, a, x.step, x.tensor);
        ASSERT_EQ(mine.send_counts.size(), static_cast<std::size_t>(c.world));
        std::int64_t sent = 0, received = 0;
        for (int b = 0; b < c.world; ++b) {
          const auto& theirs = exchange(plan, b, x.step, x.tensor);
          const auto ia = static_cast<std::size_t>(a), ib = static_cast<std::size_t>(b);
          EXPECT_EQ(mine.send_counts[ib], theirs.recv_counts[ia]) << to_string(x.tensor) << " from " << a << " to " << b;
          EXPECT_EQ(mine.send_heads[ib], theirs.recv_heads[ia]) << to_string(x.tensor) << " from " << a << " to " << b;
          sent += mine.send_counts[ib];
          received += mine.recv_counts[ib];
        }
        // A rank sends all of its tokens' heads (each kv head once per reader) and, in the head
        // layout, receives every token of its heads; back in the sequence layout, all heads of its
        // own tokens.
        const std::int64_t tokens = shards.local_tokens(a), total = shards.total_tokens();
        const int per_rank = c.q_heads / c.world;
        // The heads: in the head layout a rank receives its own q heads from every peer; back in
        // the sequence layout it sends the heads it computed and gets each head from the one rank
        // that computed it.
        const HeadRange own = partition::ulysses_q_heads(c.q_heads, c.world, a);
        std::vector<int> head_from(static_cast<std::size_t>(c.q_heads), 0);
        for (int b = 0; b < c.world; ++b) {
          const auto ib = static_cast<std::size_t>(b);
          if (x.tensor == PlanTensor::q) {
            EXPECT_EQ(mine.recv_heads[ib], own);
          }
          if (x.tensor == PlanTensor::o || x.tensor == PlanTensor::lse) {
            EXPECT_EQ(mine.send_heads[ib], own) << to_string(x.tensor) << " from " << a << " to " << b;
            for (int h = mine.recv_heads[ib].begin; h < mine.recv_heads[ib].begin + mine.recv_heads[ib].count; ++h)
              ++head_from[static_cast<std::size_t>(h)];
          }
        }
        if (x.tensor == PlanTensor::o || x.tensor == PlanTensor::lse) {
          EXPECT_EQ(head_from, std::vector<int>(static_cast<std::size_t>(c.q_heads), 1)) << to_string(x.tensor) << " to " << a;
        }
        if (x.tensor == PlanTensor::q) {
          EXPECT_EQ(sent, tokens * c.q_heads);
          EXPECT_EQ(received, total * per_rank);
        } else if (x.tensor == PlanTensor::o || x.tensor == PlanTensor::lse) {
          EXPECT_EQ(sent, total * per_rank);
          EXPECT_EQ(received, tokens * c.q_heads);
        } else {
          EXPECT_EQ(received, total * partition::ulysses_kv_heads(c.q_heads, c.kv_heads, c.world, a).count);
        }
      }
  }
}

TEST(UlyssesPlan, KvHeadsGoToExactlyTheRanksThatReadThem) {
  std::mt19937_64 rng(test::fresh_seed());
  for (int world = 1; world <= 8; ++world) {
    const int q_heads = world * (1 + static_cast<int>(rng() % 3));
    for (int kv_heads = 1; kv_heads <= q_heads; ++kv_heads) {
      if (q_heads % kv_heads != 0) continue;
      SCOPED_TRACE(testing::Message() << "P " << world << ", heads " << q_heads << "/" << kv_heads);
      const int group = q_heads / kv_heads;
      std::vector<std::set<int>> readers(static_cast<std::size_t>(kv_heads)), holders(static_cast<std::size_t>(kv_heads));
      for (int r = 0; r < world; ++r) {
        const auto q = partition::ulysses_q_heads(q_heads, world, r);
        for (int h = q.begin; h < q.begin + q.count; ++h) readers[static_cast<std::size_t>(h / group)].insert(r);
        const auto kv = partition::ulysses_kv_heads(q_heads, kv_heads, world, r);
        for (int k = kv.begin; k < kv.begin + kv.count; ++k) holders[static_cast<std::size_t>(k)].insert(r);
      }
      EXPECT_EQ(holders, readers);
      // MQA on P ranks: the one kv head on every rank, P copies in all.
      if (kv_heads == 1) {
        EXPECT_EQ(holders[0].size(), static_cast<std::size_t>(world));
      }
    }
  }
}

TEST(UlyssesPlan, RefusesHeadsTheGroupDoesNotDivideNamingTheValidSizes) {
  std::mt19937_64 rng(test::fresh_seed());
  const int q_heads = 12 * (1 + static_cast<int>(rng() % 2));  // 12 or 24
  const int world = q_heads == 12 ? 5 : 9;
  const ShardPlan shards({0, 31}, Layout::zigzag, world, world);
  const std::string valid = q_heads == 12 ? "1, 2, 3, 4, 6, 12" : "1, 2, 3, 4, 6, 8, 12, 24";
  try {
    partition::ulysses_plan(shards, true, q_heads, 1 + static_cast<int>(rng() % 2) * 2);
    FAIL() << "a group of " << world << " was accepted for " << q_heads << " heads";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find(valid), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(world)), std::string::npos) << e.what();
  }
}

TEST(UlyssesPlan, RefusesKvHeadsThatSplitAcrossTheGroupNamingTheValidSizes) {
  std::mt19937_64 rng(test::fresh_seed());
  // 12 query heads over 4 kv heads on 6 ranks: 2 query heads a rank, 3 to a kv head, so ranks 1 and 4
  // would read two kv heads each, one shared with each neighbour. Of the sizes that divide 6 ranks,
  // only 1 and 2 divide the 4 kv heads.
  const int world = 6;
  const ShardPlan shards({0, static_cast<std::int32_t>(13 + rng() % 20)}, Layout::zigzag, world, world);
  try {
    partition::ulysses_plan(shards, rng() % 2 == 0, 12, 4);
    FAIL() << "4 kv heads were accepted on a group of 6";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("Ulysses size 6 and the 4 kv heads do not divide one another"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("use a Ulysses size of 1, 2 for"), std::string::npos) << e.what();
  }
}

TEST(UlyssesPlan, RefusesOneLevelShardsNamingTheTwoLevelPlan) {
  std::mt19937_64 rng(test::fresh_seed());
  const int world = 2 + static_cast<int>(rng() % 3);
  const ShardPlan one_level({0, static_cast<std::int32_t>(9 + rng() % 20)}, Layout::zigzag, world);
  try {
    partition::ulysses_plan(one_level, true, world, world);
    FAIL() << "one-level shards over " << world << " ranks were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    const std::string two_level = "ShardPlan(cu_seqlens, layout, " + std::to_string(world) + ", " + std::to_string(world) + ")";
    EXPECT_NE(std::string(e.what()).find(two_level), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn
