// The cost model against hand-computed cases: rate lookups (exact points, log-length interpolation,
// clamps, curve choice), FLOP counts, link tiers and times, the overlap sum, strategy estimates
// worked out by hand, the hybrid beating a ring over a slow network, and the rate-file loader.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <sstream>

#include "longattn/error.hpp"
#include "longattn/layout.hpp"
#include "partition/cost_model.hpp"
#include "partition/hybrid_plan.hpp"
#include "partition/ring_plan.hpp"
#include "partition/ulysses_plan.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using namespace partition;

double uniform(std::mt19937_64& rng, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
int uniform_int(std::mt19937_64& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// Runs f, expects longattn::Error with `code` whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, ErrorCode code, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks " << p;
  }
}

TEST(CostModelRates, ExactPointsInterpolationAndClamps) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int i = uniform_int(rng, 6, 10), j = uniform_int(rng, 1, 3);
  const std::int64_t a = std::int64_t{1} << i, mid = std::int64_t{1} << (i + j), b = std::int64_t{1} << (i + 2 * j);
  const RatePoint low{a, uniform(rng, 50, 300), uniform(rng, 20, 200)};
  const RatePoint high{b, uniform(rng, 400, 700), uniform(rng, 300, 600)};
  KernelRateTable table;
  table.add(true, 128, high);  // out of order on purpose
  table.add(true, 128, low);

  EXPECT_DOUBLE_EQ(table.forward_tflops(a, a, true, 128), low.forward_tflops);
  EXPECT_DOUBLE_EQ(table.backward_tflops(b, b, true, 128), high.backward_tflops);
  // mid is the log-midpoint of a and b: the mean of the two rates.
  EXPECT_NEAR(table.forward_tflops(mid, mid, true, 128), (low.forward_tflops + high.forward_tflops) / 2, 1e-9);
  EXPECT_NEAR(table.backward_tflops(mid, mid, true, 128), (low.backward_tflops + high.backward_tflops) / 2, 1e-9);
  // A quarter of the way in log length.
  const auto quarter = static_cast<std::int64_t>(std::llround(std::pow(2.0, i + j / 2.0)));
  const double t = (std::log(static_cast<double>(quarter)) - std::log(static_cast<double>(a))) /
                   (std::log(static_cast<double>(b)) - std::log(static_cast<double>(a)));
  EXPECT_NEAR(table.forward_tflops(quarter, quarter, true, 128),
              low.forward_tflops + t * (high.forward_tflops - low.forward_tflops), 1e-9);
  // A rectangle a x b is looked up at its geometric mean, mid.
  EXPECT_NEAR(table.forward_tflops(a, b, true, 128), (low.forward_tflops + high.forward_tflops) / 2, 1e-9);
  // Outside the points: the end points.
  EXPECT_DOUBLE_EQ(table.forward_tflops(a / 4, a / 2, true, 128), low.forward_tflops);
  EXPECT_DOUBLE_EQ(table.forward_tflops(1, 1, true, 128), low.forward_tflops);
  EXPECT_DOUBLE_EQ(table.backward_tflops(b * 8, b * 3, true, 128), high.backward_tflops);
}

TEST(CostModelRates, CurveByCausalityAndNearestHeadDim) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const double causal64 = uniform(rng, 100, 200), causal128 = uniform(rng, 300, 400), full128 = uniform(rng, 500, 600);
  KernelRateTable table;
  table.add(true, 64, {4096, causal64, causal64 / 2});
  table.add(true, 128, {4096, causal128, causal128 / 2});
  table.add(false, 128, {4096, full128, full128 / 2});
  EXPECT_DOUBLE_EQ(table.forward_tflops(4096, 4096, true, 64), causal64);
  EXPECT_DOUBLE_EQ(table.forward_tflops(4096, 4096, true, 80), causal64);
  EXPECT_DOUBLE_EQ(table.forward_tflops(4096, 4096, true, 256), causal128);
  EXPECT_DOUBLE_EQ(table.forward_tflops(4096, 4096, false, 64), full128);  // the only full curve
  EXPECT_DOUBLE_EQ(table.backward_tflops(4096, 4096, false, 128), full128 / 2);

  KernelRateTable causal_only;
  causal_only.add(true, 128, {4096, causal128, causal128 / 2});
  EXPECT_DOUBLE_EQ(causal_only.forward_tflops(4096, 4096, false, 128), causal128);  // falls back
}

TEST(CostModelRates, BadPointsRefused) {
  KernelRateTable table;
  table.add(true, 128, {1024, 300, 200});
  expect_error([&] { table.add(true, 128, {1024, 310, 210}); }, ErrorCode::invalid_argument, {"second point", "1024"});
  expect_error([&] { table.add(true, 128, {0, 310, 210}); }, ErrorCode::invalid_argument, {"length must be positive"});
  expect_error([&] { table.add(true, 128, {2048, -1, 210}); }, ErrorCode::invalid_argument, {"rates must be positive"});
  expect_error([&] { table.add(true, 0, {2048, 1, 2}); }, ErrorCode::invalid_argument, {"head dim"});
  expect_error([] { KernelRateTable{}.forward_tflops(8, 8, true, 128); }, ErrorCode::invalid_argument, {"empty"});
}

TEST(CostModelFlops, FullCausalAndBackward) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const std::int64_t q = uniform_int(rng, 10, 5000), k = uniform_int(rng, 10, 5000);
  const int d = 64 * uniform_int(rng, 1, 2), h = uniform_int(rng, 1, 64);
  EXPECT_DOUBLE_EQ(forward_flops(q, k, false, d, h), 4.0 * q * k * d * h);
  // Square diagonal block: the lower triangle with its diagonal.
  EXPECT_DOUBLE_EQ(forward_flops(q, q, true, d, h), 4.0 * (q * (q + 1) / 2.0) * d * h);
  // Four queries over two keys, causal by index: rows see 1, 2, 2, 2 keys.
  EXPECT_DOUBLE_EQ(visible_pairs(4, 2, true), 7.0);
  // Two queries over five keys: rows see 1 and 2 keys.
  EXPECT_DOUBLE_EQ(visible_pairs(2, 5, true), 3.0);
  EXPECT_DOUBLE_EQ(visible_pairs(q, 0, true), 0.0);
  EXPECT_DOUBLE_EQ(backward_flops(q, k, true, d, h), 2.5 * forward_flops(q, k, true, d, h));
  // Large causal squares cost about half of full ones.
  EXPECT_NEAR(forward_flops(100000, 100000, true, d, h) / forward_flops(100000, 100000, false, d, h), 0.5, 1e-4);
}

TEST(CostModelFlops, CausalOffsetAgainstCounting) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const int q = uniform_int(rng, 0, 40), k = uniform_int(rng, 0, 40), offset = uniform_int(rng, -50, 50);
    std::int64_t counted = 0;
    for (int i = 0; i < q; ++i)
      for (int j = 0; j < k; ++j) counted += j <= i + offset ? 1 : 0;
    ASSERT_DOUBLE_EQ(visible_pairs_with_offset(q, k, offset), static_cast<double>(counted))
        << q << " x " << k << " offset " << offset;
  }
  EXPECT_DOUBLE_EQ(visible_pairs_with_offset(37, 23, 0), visible_pairs(37, 23, true));
}

TEST(CostModelLinks, TierAndTransferTime) {
  EXPECT_EQ(tier_between(0, 7, 8), Tier::intra_node);
  EXPECT_EQ(tier_between(7, 8, 8), Tier::inter_node);
  EXPECT_EQ(tier_between(9, 14, 8), Tier::intra_node);
  EXPECT_EQ(group_tier(8, 8, 1, 8), Tier::intra_node);   // ranks 8..15: node 1
  EXPECT_EQ(group_tier(4, 8, 1, 8), Tier::inter_node);   // ranks 4..11 straddle nodes 0 and 1
  EXPECT_EQ(group_tier(3, 2, 8, 8), Tier::inter_node);   // ranks 3 and 11
  EXPECT_EQ(group_tier(3, 2, 2, 8), Tier::intra_node);   // ranks 3 and 5
  EXPECT_EQ(group_tier(5, 1, 8, 8), Tier::intra_node);

  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  MachineModel m;
  m.intra_node = {uniform(rng, 1e11, 5e11), uniform(rng, 1e-6, 1e-5)};
  m.inter_node = {uniform(rng, 1e10, 5e10), uniform(rng, 1e-5, 1e-4)};
  const double bytes = uniform(rng, 1e6, 1e9);
  const int messages = uniform_int(rng, 1, 7);
  EXPECT_DOUBLE_EQ(m.transfer_seconds(bytes, Tier::intra_node, messages),
                   bytes / m.intra_node.bytes_per_second + messages * m.intra_node.latency_seconds);
  EXPECT_DOUBLE_EQ(m.transfer_seconds(bytes, Tier::inter_node),
                   bytes / m.inter_node.bytes_per_second + m.inter_node.latency_seconds);
  m.inter_node.bytes_per_second = 0;
  expect_error([&] { m.transfer_seconds(bytes, Tier::inter_node); }, ErrorCode::invalid_argument, {"inter-node", "bandwidth"});
}

TEST(CostModelOverlap, MaxPerStepPlusExposed) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const double unit = uniform(rng, 1e-4, 1e-2);
  const std::vector<double> compute{3 * unit, 1 * unit, 2 * unit}, transfer{1 * unit, 4 * unit, 0};
  // max(3, 1) + max(1, 4) + max(2, 0) = 9, plus 0.5 before and 0.25 after.
  EXPECT_NEAR(overlapped_steps_seconds(compute, transfer, 0.5 * unit, 0.25 * unit), 9.75 * unit, 1e-12);
  EXPECT_NEAR(overlapped_steps_seconds(compute, transfer), 9 * unit, 1e-12);
  expect_error([&] { overlapped_steps_seconds(compute, std::span<const double>(transfer).first(2)); },
               ErrorCode::invalid_argument, {"3 compute steps but 2 transfers"});
}

// A machine with one flat rate everywhere, so estimates can be worked out by hand.
MachineModel flat_machine(std::mt19937_64& rng) {
  MachineModel m;
  m.rates.add(false, 128, {1024, uniform(rng, 300, 600), uniform(rng, 200, 500)});
  m.intra_node = {uniform(rng, 1e11, 5e11), uniform(rng, 1e-6, 1e-5)};
  m.inter_node = {uniform(rng, 1e10, 5e10), uniform(rng, 1e-5, 1e-4)};
  m.linear_seconds_per_token = uniform(rng, 1e-9, 1e-7);
  return m;
}

TEST(CostModelStrategies, RingByHand) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const auto m = flat_machine(rng);
  const double fwd_rate = m.rates.curves()[0].points[0].forward_tflops * 1e12;
  const double bwd_rate = m.rates.curves()[0].points[0].backward_tflops * 1e12;
  // Two ranks on two nodes, full attention: step 0 local, step 1 the neighbour's shard.
  const AttentionShape shape{.seq_len = 2 * 1000 * uniform_int(rng, 1, 16), .query_heads = 8, .kv_heads = 2,
                             .head_dim = 128, .causal = false};
  const double n = shape.seq_len / 2.0;
  const double step_fwd = 4 * n * n * 128 * 8 / fwd_rate, step_bwd = 2.5 * 4 * n * n * 128 * 8 / bwd_rate;
  const double kv = 2 * n * 2 * 128 * 2, dkv = 2 * n * 2 * 128 * 4;
  const auto& net = m.inter_node;
  const double move_fwd = kv / net.bytes_per_second + 2 * net.latency_seconds;
  const double move_bwd = (kv + dkv) / net.bytes_per_second + 4 * net.latency_seconds;
  const double home = dkv / net.bytes_per_second + 2 * net.latency_seconds;
  const double linear = m.linear_seconds_per_token * n;

  const auto e = estimate_strategy(m, shape, {.ranks = 2, .gpus_per_node = 1}, 1);
  EXPECT_EQ(e.name(), "ring");
  EXPECT_EQ(e.ring, 2);
  EXPECT_EQ(e.ring_tier, Tier::inter_node);
  EXPECT_NEAR(e.forward_seconds, std::max(step_fwd, move_fwd) + step_fwd + linear, 1e-12);
  EXPECT_NEAR(e.backward_seconds, std::max(step_bwd, move_bwd) + step_bwd + home + 2 * linear, 1e-12);
  EXPECT_NEAR(e.attention_compute_seconds, 2 * (step_fwd + step_bwd), 1e-12);

  // Causal: zigzag shards, so step 0 is the diagonal (causal by index) and step 1 sees half the keys.
  auto causal = shape;
  causal.causal = true;
  const double diagonal_fwd = 4 * (n * (n + 1) / 2) * 128 * 8 / fwd_rate, half_fwd = 4 * n * (n / 2) * 128 * 8 / fwd_rate;
  const auto c = estimate_strategy(m, causal, {.ranks = 2, .gpus_per_node = 1}, 1);
  EXPECT_NEAR(c.forward_seconds, std::max(diagonal_fwd, move_fwd) + half_fwd + linear, 1e-12);
  EXPECT_NEAR(c.backward_seconds, std::max(2.5 * diagonal_fwd * fwd_rate / bwd_rate, move_bwd) +
                                      2.5 * half_fwd * fwd_rate / bwd_rate + home + 2 * linear,
              1e-12);

  // On one node the same ring runs over the intra-node link.
  const auto same_node = estimate_strategy(m, shape, {.ranks = 2, .gpus_per_node = 2}, 1);
  EXPECT_EQ(same_node.ring_tier, Tier::intra_node);
  EXPECT_LE(same_node.forward_seconds, e.forward_seconds);
}

TEST(CostModelStrategies, UlyssesByHand) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const auto m = flat_machine(rng);
  const double fwd_rate = m.rates.curves()[0].points[0].forward_tflops * 1e12;
  // Four ranks of one node, 8 query heads over 2 kv heads (each rank keeps a copy of one kv head).
  const AttentionShape shape{.seq_len = 4 * 512 * uniform_int(rng, 1, 16), .query_heads = 8, .kv_heads = 2,
                             .head_dim = 128, .causal = false};
  const double L = static_cast<double>(shape.seq_len), local = L / 4;
  const auto& link = m.intra_node;
  // q (2 heads) + k + v (1 head each) of the local tokens to 3 peers; o (2 heads) + lse back.
  const double qkv = 3 * local * (2 + 2) * 128 * 2 / link.bytes_per_second + 3 * link.latency_seconds;
  const double o = 3 * local * 2 * (128 * 2 + 4) / link.bytes_per_second + 3 * link.latency_seconds;
  const double compute = 4 * L * L * 128 * 2 / fwd_rate;
  const auto e = estimate_strategy(m, shape, {.ranks = 4, .gpus_per_node = 4}, 4);
  EXPECT_EQ(e.name(), "ulysses");
  EXPECT_EQ(e.all_to_all_tier, Tier::intra_node);
  EXPECT_NEAR(e.forward_seconds, qkv + compute + o + m.linear_seconds_per_token * local, 1e-12);
}

TEST(CostModelStrategies, HybridBeatsRingOverSlowNetwork) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  auto m = default_machine(uniform_int(rng, 0, 1) ? "h100" : "h200");
  m.intra_node = {uniform(rng, 5e11, 1e12), 1e-6};  // fast inside a node
  m.inter_node = {uniform(rng, 1e9, 5e9), 2e-5};    // slow across nodes
  // Eight heads: Ulysses reaches at most one node's worth of ranks, so every candidate rings.
  const AttentionShape shape{.seq_len = 131072, .query_heads = 8, .kv_heads = 8, .head_dim = 128, .causal = true};
  const NodeLayout layout{.ranks = 16, .gpus_per_node = 8};
  const auto ranked = rank_strategies(m, shape, layout);
  ASSERT_EQ(ranked.size(), 4u);  // U = 1, 2, 4, 8
  EXPECT_EQ(ranked.front().ulysses, 8) << ranked.front().name();
  EXPECT_EQ(ranked.front().name(), "hybrid 8 x 2");
  EXPECT_EQ(ranked.front().all_to_all_tier, Tier::intra_node);
  EXPECT_EQ(ranked.front().ring_tier, Tier::inter_node);
  // The flat ring crosses the slow link at every one of its 15 steps: last.
  EXPECT_EQ(ranked.back().name(), "ring");
  EXPECT_LT(2 * ranked.front().total_seconds(), ranked.back().total_seconds());
  for (std::size_t i = 1; i < ranked.size(); ++i) EXPECT_LE(ranked[i - 1].total_seconds(), ranked[i].total_seconds());
}

// The plan generators' plans, priced call by call, agree with the closed-form strategy estimate
// (with one flat rate, the two differ only in how the diagonal step is cut, which keeps its pairs).
TEST(CostModelPlans, RingPlanMatchesStrategyEstimate) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  auto m = flat_machine(rng);
  m.linear_seconds_per_token = 0;
  const int world = uniform_int(rng, 2, 6);
  for (const bool causal : {false, true})
    for (const int gpus_per_node : {1, uniform_int(rng, 1, world), world}) {
      const std::int64_t seq_len = 2LL * world * uniform_int(rng, 50, 400);
      const AttentionShape shape{.seq_len = seq_len, .query_heads = 4, .kv_heads = 2, .head_dim = 128, .causal = causal};
      const auto shards = ShardPlan::single_sequence(seq_len, causal ? Layout::zigzag : Layout::contiguous, world);
      const Plan plan = ring_plan(shards, causal, shape.query_heads, shape.kv_heads);
      PlanCostInputs inputs{.head_dim = 128, .element_bytes = 2, .gpus_per_node = gpus_per_node, .shard_tokens = {}};
      for (int r = 0; r < world; ++r) inputs.shard_tokens.push_back(shards.local_tokens(r));
      const auto priced = estimate_plan_forward(m, plan, inputs);
      const auto closed = estimate_strategy(m, shape, {.ranks = world, .gpus_per_node = gpus_per_node}, 1);
      SCOPED_TRACE(::testing::Message() << world << " ranks, " << gpus_per_node << " per node, causal " << causal);
      EXPECT_NEAR(priced.step_seconds, closed.forward_seconds, 1e-9 * closed.forward_seconds);
      const double backward = estimate_plan_backward(m, plan, inputs).step_seconds;
      EXPECT_NEAR(backward, closed.backward_seconds, 1e-9 * closed.backward_seconds);
      ASSERT_EQ(priced.rank_compute_seconds.size(), static_cast<std::size_t>(world));
      // Zigzag balances: every rank computes the same.
      for (const double c : priced.rank_compute_seconds) EXPECT_NEAR(c, priced.rank_compute_seconds[0], 1e-9 * c);
    }
}

TEST(CostModelPlans, UlyssesPlanMatchesStrategyEstimate) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  auto m = flat_machine(rng);
  m.linear_seconds_per_token = 0;
  // The plan sends q, k, v and o, lse as separate exchanges, the estimate as one each: compare bytes.
  m.intra_node.latency_seconds = m.inter_node.latency_seconds = 0;
  const int world = 4;
  const std::int64_t seq_len = world * uniform_int(rng, 100, 2000);
  const AttentionShape shape{.seq_len = seq_len, .query_heads = 8, .kv_heads = 4, .head_dim = 128, .causal = false};
  const ShardPlan shards({0, static_cast<std::int32_t>(seq_len)}, Layout::contiguous, world, world);
  const Plan plan = ulysses_plan(shards, false, shape.query_heads, shape.kv_heads);
  auto inputs = [](int gpus_per_node) {
    return PlanCostInputs{.head_dim = 128, .element_bytes = 2, .gpus_per_node = gpus_per_node, .shard_tokens = {}};
  };
  auto estimates = [&](int gpus_per_node) {
    return std::pair{estimate_plan_forward(m, plan, inputs(gpus_per_node)),
                     estimate_strategy(m, shape, {.ranks = world, .gpus_per_node = gpus_per_node}, world)};
  };
  {
    const auto [priced, closed] = estimates(world);  // one node
    EXPECT_NEAR(priced.step_seconds, closed.forward_seconds, 1e-9 * closed.forward_seconds);
    const double backward = estimate_plan_backward(m, plan, inputs(world)).step_seconds;
    EXPECT_NEAR(backward, closed.backward_seconds, 1e-9 * closed.backward_seconds);
  }
  const auto [priced, closed] = estimates(2);
  // Across two nodes a rank's exchange goes to one peer over NVLink and two over the network at
  // once, so each exchange takes the slower of the two; the closed form sends all over the network.
  EXPECT_LT(priced.step_seconds, closed.forward_seconds);
  const double local = static_cast<double>(seq_len) / world;
  double by_hand = 4.0 * seq_len * seq_len * 128 * 2 / (m.rates.curves()[0].points[0].forward_tflops * 1e12);
  // q: 2 heads, k and v: 1 head each, o: 2 heads of 128 elements; lse: 2 heads of one fp32.
  for (const double bytes_per_peer : {local * 2 * 256, local * 256, local * 256, local * 2 * 256, local * 2 * 4})
    by_hand += std::max(bytes_per_peer / m.intra_node.bytes_per_second, 2 * bytes_per_peer / m.inter_node.bytes_per_second);
  EXPECT_NEAR(priced.step_seconds, by_hand, 1e-9 * by_hand);
}

// The hybrid plan, priced call by call, agrees with the closed-form estimate for U x R on nodes of 8
// GPUs (groups inside a node, the ring across nodes for 16 ranks). With one flat rate the two
// differ only in latency: the plan posts q, k, v and o, lse as five exchanges of U - 1 messages
// where the closed form counts one each way, so the plan is 3 (U - 1) intra-node latencies slower
// in each direction, and otherwise equal to 1e-9.
TEST(CostModelPlans, HybridPlanMatchesStrategyEstimate) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  auto m = flat_machine(rng);
  m.linear_seconds_per_token = 0;
  const int gpus_per_node = 8;
  for (const int world : {8, 16})
    for (const int ulysses : {1, 2, 4, 8})
      for (const bool causal : {false, true}) {
        const int kv_heads = rng() % 2 == 0 ? 4 : 1;
        const std::int64_t seq_len = 2LL * world * uniform_int(rng, 20, 100);
        const AttentionShape shape{.seq_len = seq_len, .query_heads = 16, .kv_heads = kv_heads, .head_dim = 128, .causal = causal};
        const ShardPlan shards({0, static_cast<std::int32_t>(seq_len)}, causal ? Layout::zigzag : Layout::contiguous, world,
                               ulysses);
        const Plan plan = hybrid_plan(shards, causal, shape.query_heads, shape.kv_heads);
        PlanCostInputs inputs{.head_dim = 128, .element_bytes = 2, .gpus_per_node = gpus_per_node, .shard_tokens = {}};
        for (int r = 0; r < world; ++r) inputs.shard_tokens.push_back(shards.local_tokens(r));
        const auto closed = estimate_strategy(m, shape, {.ranks = world, .gpus_per_node = gpus_per_node}, ulysses);
        SCOPED_TRACE(::testing::Message() << ulysses << " x " << world / ulysses << ", kv heads " << kv_heads << ", causal "
                                          << causal << ", length " << seq_len);
        const double extra_latency = 3.0 * (ulysses - 1) * m.intra_node.latency_seconds;
        const auto priced = estimate_plan_forward(m, plan, inputs);
        EXPECT_NEAR(priced.step_seconds, closed.forward_seconds + extra_latency, 1e-9 * closed.forward_seconds);
        const double backward = estimate_plan_backward(m, plan, inputs).step_seconds;
        EXPECT_NEAR(backward, closed.backward_seconds + extra_latency, 1e-9 * closed.backward_seconds);
        // Every rank computes the same: zigzag over the groups, an equal share of heads inside them.
        for (const double c : priced.rank_compute_seconds) EXPECT_NEAR(c, priced.rank_compute_seconds[0], 1e-9 * c);
      }
}

TEST(CostModelPlans, CallsPricedByTheirMask) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  MachineModel m;
  const double causal_rate = uniform(rng, 100, 300), full_rate = uniform(rng, 400, 700);
  m.rates.add(true, 64, {4096, causal_rate, causal_rate});
  m.rates.add(false, 64, {4096, full_rate, full_rate});
  const std::int64_t q = uniform_int(rng, 100, 900), k = uniform_int(rng, 100, 900);
  const int heads = uniform_int(rng, 1, 8);
  auto price = [&](KernelCall call) {
    call.heads = {0, heads};
    Plan plan;
    plan.ranks.resize(1);
    plan.ranks[0].steps.push_back({.rows = RowSpace::gathered, .key_shard = -1, .ring = {}, .all_to_all = {}, .calls = {call}});
    return estimate_plan_forward(m, plan, {.head_dim = 64, .element_bytes = 2, .gpus_per_node = 1, .shard_tokens = {}})
        .step_seconds;
  };
  const double per_pair = 4.0 * 64 * heads / 1e12;
  const KernelCall none{.q_begin = 0, .q_count = q, .k_begin = 0, .k_count = k, .mask = MaskKind::none, .causal_offset = 0, .heads = {}};
  EXPECT_NEAR(price(none), q * k * per_pair / full_rate, 1e-15);
  auto diagonal = none;
  diagonal.mask = MaskKind::causal_by_index;
  EXPECT_NEAR(price(diagonal), visible_pairs(q, k, true) * per_pair / causal_rate, 1e-15);
  auto all_visible = diagonal;  // an offset past the last key hides nothing: a full block's speed
  all_visible.causal_offset = k;
  EXPECT_NEAR(price(all_visible), q * k * per_pair / full_rate, 1e-15);
  auto positions = none;
  positions.mask = MaskKind::positions;
  EXPECT_NEAR(price(positions), q * k / 2.0 * per_pair / causal_rate, 1e-15);
}

TEST(CostModelPlans, BadInputsRefused) {
  const auto m = default_machine("h200");
  const auto shards = ShardPlan::single_sequence(64, Layout::zigzag, 2);
  const Plan plan = ring_plan(shards, true, 2, 2);
  expect_error([&] { estimate_plan_forward(m, plan, {.head_dim = 128, .element_bytes = 2, .gpus_per_node = 8, .shard_tokens = {}}); },
               ErrorCode::invalid_argument, {"shard_tokens has 0 entries"});
  expect_error([&] { estimate_plan_forward(m, plan, {.head_dim = 0, .element_bytes = 2, .gpus_per_node = 8, .shard_tokens = {}}); },
               ErrorCode::invalid_argument, {"head dim"});
}

TEST(CostModelPlans, LockstepTakesTheSlowestRankOfEachStep) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  MachineModel m;
  m.rates.add(false, 64, {4096, uniform(rng, 100, 700), uniform(rng, 100, 700)});
  const std::int64_t big = uniform_int(rng, 500, 900), small = uniform_int(rng, 10, 100);
  auto step = [](std::int64_t rows) {
    return Step{.rows = RowSpace::gathered, .key_shard = -1, .ring = {}, .all_to_all = {},
                .calls = {{.q_begin = 0, .q_count = rows, .k_begin = 0, .k_count = rows, .mask = MaskKind::none,
                           .causal_offset = 0, .heads = {0, 1}}}};
  };
  // Rank 0 is slow at step 0, rank 1 at step 1: the plan waits for each in turn.
  Plan plan;
  plan.world = 2;
  plan.ranks.resize(2);
  plan.ranks[0].steps = {step(big), step(small)};
  plan.ranks[1].steps = {step(small), step(big)};
  const auto e = estimate_plan_forward(m, plan, {.head_dim = 64, .element_bytes = 2, .gpus_per_node = 2, .shard_tokens = {}});
  const double one_big = m.forward_seconds(big, big, false, 64, 1), one_small = m.forward_seconds(small, small, false, 64, 1);
  EXPECT_NEAR(e.step_seconds, 2 * one_big, 1e-15);
  EXPECT_NEAR(e.rank_seconds[0], one_big + one_small, 1e-15);
  EXPECT_NEAR(e.rank_compute_seconds[1], one_big + one_small, 1e-15);
}

TEST(CostModelStrategies, InvalidDegreeNamesValidOnes) {
  const auto m = default_machine("h100");
  const AttentionShape shape{.seq_len = 8192, .query_heads = 12, .kv_heads = 4, .head_dim = 128};
  const NodeLayout layout{.ranks = 8, .gpus_per_node = 8};
  expect_error([&] { estimate_strategy(m, shape, layout, 8); }, ErrorCode::invalid_argument,
               {"does not divide the 12 query heads", "valid Ulysses sizes here: 1, 2, 4"});
  expect_error([&] { estimate_strategy(m, shape, layout, 3); }, ErrorCode::invalid_argument, {"does not divide the 8 ranks"});
  EXPECT_EQ(rank_strategies(m, shape, layout).size(), 3u);
  expect_error([&] { rank_strategies(m, shape, {.ranks = 0, .gpus_per_node = 8}); }, ErrorCode::invalid_argument,
               {"ranks and GPUs per node must be positive"});
}

TEST(CostModelFile, RoundTripAndComments) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  KernelRateTable table;
  for (int i = 0; i < 5; ++i) {
    table.add(i % 2 == 0, 64 << (i % 2), {std::int64_t{128} << i, uniform(rng, 100, 700), uniform(rng, 50, 600)});
    table.add(i % 2 != 0, 128, {3000 + 1000 * std::int64_t{i}, uniform(rng, 100, 700), uniform(rng, 50, 600)});
  }
  std::stringstream text;
  text << "\n  # measured by hand\n";
  table.write(text);
  const auto back = parse_rate_table(text, "rates.txt");
  ASSERT_EQ(back.curves().size(), table.curves().size());
  for (std::size_t c = 0; c < table.curves().size(); ++c) {
    EXPECT_EQ(back.curves()[c].causal, table.curves()[c].causal);
    EXPECT_EQ(back.curves()[c].head_dim, table.curves()[c].head_dim);
    ASSERT_EQ(back.curves()[c].points.size(), table.curves()[c].points.size());
    for (std::size_t p = 0; p < table.curves()[c].points.size(); ++p) {
      EXPECT_EQ(back.curves()[c].points[p].length, table.curves()[c].points[p].length);
      EXPECT_EQ(back.curves()[c].points[p], table.curves()[c].points[p]);  // written to round-trip exactly
    }
  }
}

TEST(CostModelFile, MalformedLinesRefusedWithFileAndLine) {
  const std::string good = "# kind d length fwd bwd\ncausal 128 1024 480.5 300\n";
  for (const auto& [bad, what] : std::vector<std::pair<std::string, std::string>>{
           {"causal 128 abc 480 300", "expected `causal|full"},
           {"diagonal 128 2048 480 300", "expected `causal|full"},
           {"full 128 2048 480", "expected `causal|full"},
           {"full 128 2048 480 300 7", "expected `causal|full"},
           {"causal 128 1024 500 310", "second point at length 1024"},
           {"full 128 2048 -5 300", "rates must be positive"},
       }) {
    std::istringstream in(good + "\n" + bad + "\n");
    expect_error([&] { parse_rate_table(in, "calib/h100.txt"); }, ErrorCode::io, {"calib/h100.txt:4:", what});
  }
  std::istringstream only_comments("# nothing\n\n");
  expect_error([&] { parse_rate_table(only_comments, "empty.txt"); }, ErrorCode::io, {"empty.txt: no kernel-rate points"});
  expect_error([] { load_rate_table("/nonexistent/longattn-rates.txt"); }, ErrorCode::io,
               {"cannot open kernel-rate table /nonexistent/longattn-rates.txt"});
}

TEST(CostModelDefaults, BuiltInCurvesFromTheMeasurements) {
  const auto h200 = default_machine("h200");
  // bench/results/cost_model_defaults_2026-12-05.md, cuDNN causal on one H200: forward at 2k and 128 tokens, and the backward
  // derived from forward / forward+backward (counted 2.5x): 2.5 / (3.5 / 378 - 1 / 545) at 2k.
  EXPECT_DOUBLE_EQ(h200.rates.forward_tflops(2048, 2048, true, 128), 545);
  EXPECT_DOUBLE_EQ(h200.rates.forward_tflops(128, 128, true, 128), 138);
  EXPECT_NEAR(h200.rates.backward_tflops(2048, 2048, true, 128), 2.5 / (3.5 / 378 - 1 / 545.0), 1e-9);
  // Between 512 (381) and 1k (487): the log-midpoint is the mean.
  EXPECT_NEAR(h200.rates.forward_tflops(512, 1024, true, 128), (381 + 487) / 2.0, 1e-9);
  EXPECT_EQ(h200.intra_node.bytes_per_second, 348e9);
  EXPECT_EQ(h200.inter_node.bytes_per_second, 50e9);

  const auto h100 = default_machine("h100");
  // bench/results/gpu_kernels_h100_2026-11-23.md, 21:22 UTC, ours cudnn.
  EXPECT_DOUBLE_EQ(h100.rates.forward_tflops(32768, 32768, true, 128), 659);
  EXPECT_DOUBLE_EQ(h100.rates.backward_tflops(131072, 131072, false, 128), 547);
  EXPECT_DOUBLE_EQ(h100.rates.forward_tflops(8192, 8192, true, 64), 446);
  // Below 8k the H200 shape scaled to the H100's 8k point.
  EXPECT_NEAR(h100.rates.forward_tflops(128, 128, true, 128), 138 * 586 / 572.0, 1e-9);
  EXPECT_LT(h100.rates.forward_tflops(256, 256, false, 64), h100.rates.forward_tflops(8192, 8192, false, 64));
  EXPECT_GT(h100.linear_seconds_per_token, 0);

  expect_error([] { default_machine("a100"); }, ErrorCode::invalid_argument, {"unknown machine `a100`", "h100, h200"});
}

}  // namespace
}  // namespace longattn
