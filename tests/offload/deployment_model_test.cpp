// The offload deployment model on cases worked out by hand (the numbers in the comments), the
// 70B-class shape's weight count, and refusals of inputs that describe no deployment.
#include <gtest/gtest.h>

#include <random>

#include "longattn/error.hpp"
#include "offload/deployment_model.hpp"

namespace longattn::offload {
namespace {

// 2 layers, hidden 4, 2 heads, 1 kv head of dim 2, no MLP, 2-byte values:
// params per layer 4*4 + 2*4*2 + 4*4 = 48; KV per token and layer 2*1*2*2 = 8 bytes.
Deployment tiny() {
  Deployment d;
  d.shape = ModelShape{2, 4, 2, 1, 2, 0, 2};
  d.batch = 4;
  d.context = 1000;
  d.micro_batches = 2;
  d.gpus.gpus = 1;
  d.gpus.seconds_per_token_layer = 0.001;
  d.gpus.memory_bytes = 1e5;
  d.gpus.hbm_bytes_per_s = 1e7;
  d.gpus.price_per_hour = 2;
  d.attention.servers = 2;
  d.attention.kv_bytes_per_s = 1e6;
  d.attention.price_per_hour = 1;
  return d;
}

TEST(DeploymentModel, ShapeArithmetic) {
  const ModelShape s = tiny().shape;
  EXPECT_DOUBLE_EQ(s.layer_params(), 48);
  EXPECT_DOUBLE_EQ(s.weight_bytes(), 192);
  EXPECT_DOUBLE_EQ(s.kv_bytes_per_token_layer(), 8);
  // The 70B-class default shape: about 68.4e9 weights (embeddings not counted).
  const ModelShape big;
  EXPECT_NEAR(big.layer_params() * big.layers / 1e9, 68.45, 0.05);
  EXPECT_DOUBLE_EQ(big.kv_bytes_per_token_layer(), 4096);
}

TEST(DeploymentModel, OffloadedTwoMicroBatchesAttentionBound) {
  // m = 2 per micro-batch: c = 2 * 1 ms = 2 ms; a = 2 * 1000 * 8 B / (2 servers * 1 MB/s) = 8 ms.
  // One layer: max(c + a, 2c, 2a) = 16 ms; step 32 ms; 4 / 0.032 = 125 tokens/s; the bound
  // 4 / (2 * 2 * 8 ms) = 125 too; cost (2 + 2 * 1) $/h / 3600 / 125 * 1e6 = 8.889 $ per M tokens.
  const Prediction p = predict_offloaded(tiny());
  EXPECT_DOUBLE_EQ(p.compute_s, 0.002);
  EXPECT_DOUBLE_EQ(p.attention_s, 0.008);
  EXPECT_DOUBLE_EQ(p.step_s, 0.032);
  EXPECT_DOUBLE_EQ(p.tokens_per_s, 125);
  EXPECT_DOUBLE_EQ(p.bound_tokens_per_s, 125);
  EXPECT_NEAR(p.cost_per_million_tokens, 8.8889, 1e-4);
  EXPECT_DOUBLE_EQ(p.kv_bytes, 64000);  // 4 sequences * 1000 tokens * 2 layers * 8 B
  EXPECT_TRUE(p.kv_fits);
}

TEST(DeploymentModel, OneMicroBatchTakesTurns) {
  // m = 4: c = 4 ms, a = 16 ms; the sides take turns: 20 ms per layer, 40 ms per step, 100
  // tokens/s, while the bound (perfect overlap) is 4 / (2 * 16 ms) = 125.
  Deployment d = tiny();
  d.micro_batches = 1;
  const Prediction p = predict_offloaded(d);
  EXPECT_DOUBLE_EQ(p.step_s, 0.040);
  EXPECT_DOUBLE_EQ(p.tokens_per_s, 100);
  EXPECT_DOUBLE_EQ(p.bound_tokens_per_s, 125);
}

TEST(DeploymentModel, LinkAndGemmRate) {
  Deployment d = tiny();
  // Per token on the link: q out and o back (2 * 2 heads * 2 dims * 4 B = 32), k and v (8), lse
  // (2 heads * 4 B = 8): 48 B; m = 2 -> 96 B over 2 links of 1 MB/s = 48 us, plus 1 ms latency.
  d.attention.link_bytes_per_s = 1e6;
  d.attention.link_latency_s = 0.001;
  Prediction p = predict_offloaded(d);
  EXPECT_NEAR(p.link_s, 0.001048, 1e-12);
  EXPECT_NEAR(p.attention_s, 0.009048, 1e-12);
  // A GEMM rate of 96 flop/s: 2 * 48 flops per token -> 1 s per token; m = 2 -> 2 s, plus 0.5 s fixed.
  d.gpus.seconds_per_token_layer = 0;
  d.gpus.gemm_flops = 96;
  d.gpus.fixed_seconds_per_layer = 0.5;
  p = predict_offloaded(d);
  EXPECT_DOUBLE_EQ(p.compute_s, 2.5);
  // A fast GEMM is bounded by reading the layer's 96 B of weights at 1e7 B/s: 9.6 us, + 0.5 s.
  d.gpus.gemm_flops = 1e15;
  p = predict_offloaded(d);
  EXPECT_NEAR(p.compute_s, 0.5 + 9.6e-6, 1e-12);
}

TEST(DeploymentModel, AllOnGpu) {
  // Room: 1e5 * 0.9 - 192 B of weights = 89808 B; a sequence's KV 1000 * 2 * 8 = 16000 B -> 5.
  const Deployment d = tiny();
  EXPECT_EQ(largest_gpu_batch(d), 5);
  EXPECT_EQ(largest_gpu_batch(d, 0.0), 6);  // 99808 / 16000
  // Batch 4: per layer 4 ms of compute + 4 * 1000 * 8 B / 1e7 B/s = 3.2 ms; step 14.4 ms.
  const GpuOnly g = predict_all_on_gpu(d, 4);
  EXPECT_TRUE(g.fits);
  EXPECT_NEAR(g.step_s, 0.0144, 1e-12);
  EXPECT_NEAR(g.tokens_per_s, 4 / 0.0144, 1e-9);
  EXPECT_NEAR(g.cost_per_million_tokens, 2.0 / 3600 / (4 / 0.0144) * 1e6, 1e-9);
  EXPECT_FALSE(predict_all_on_gpu(d, 6).fits);
}

TEST(DeploymentModel, BalancedServers) {
  Deployment d = tiny();
  // The servers' work per micro-batch: 2 * 1000 * 8 B / 1 MB/s = 16 ms; c = 2 ms -> 8 servers.
  EXPECT_EQ(balanced_servers(d), 8);
  d.attention.servers = 8;
  const Prediction p = predict_offloaded(d);
  EXPECT_LE(p.attention_s, p.compute_s * (1 + 1e-12));
  // Memory: 64000 B of KV over servers of 5000 B needs 13.
  d.attention.memory_bytes = 5000;
  EXPECT_EQ(balanced_servers(d), 13);
  // A round trip slower than the compute can never be hidden.
  d.attention.link_latency_s = 0.002;
  EXPECT_EQ(balanced_servers(d), -1);
}

TEST(DeploymentModel, MoreMicroBatchesNeverSlowerOnRandomDeployments) {
  // With compute and attention time linear in the micro-batch's tokens (no fixed or latency
  // part), N >= 2 reaches the bound exactly and never predicts fewer tokens/s than N = 1.
  const auto seed = std::random_device{}();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.1, 10);
  for (int trial = 0; trial < 200; ++trial) {
    Deployment d = tiny();
    d.batch = 12;
    d.gpus.seconds_per_token_layer = u(rng) * 1e-3;
    d.attention.kv_bytes_per_s = u(rng) * 1e6;
    d.micro_batches = 1;
    const double one = predict_offloaded(d).tokens_per_s;
    for (int n : {2, 3, 4}) {
      d.micro_batches = n;
      const Prediction p = predict_offloaded(d);
      EXPECT_GE(p.tokens_per_s, one * (1 - 1e-12));
      EXPECT_NEAR(p.tokens_per_s, p.bound_tokens_per_s, 1e-9 * p.bound_tokens_per_s);
    }
  }
}

TEST(DeploymentModel, RefusesWhatIsNoDeployment) {
  auto refused = [](auto&& change) {
    Deployment d = tiny();
    change(d);
    try {
      predict_offloaded(d);
    } catch (const Error& e) {
      return e.code() == ErrorCode::invalid_argument;
    }
    return false;
  };
  EXPECT_TRUE(refused([](Deployment& d) { d.shape.kv_heads = 3; }));
  EXPECT_TRUE(refused([](Deployment& d) { d.micro_batches = 5; }));
  EXPECT_TRUE(refused([](Deployment& d) { d.gpus.seconds_per_token_layer = 0; }));
  EXPECT_TRUE(refused([](Deployment& d) { d.attention.kv_bytes_per_s = 0; }));
  EXPECT_TRUE(refused([](Deployment& d) { d.attention.price_per_hour = -1; }));
  EXPECT_TRUE(refused([](Deployment& d) { d.shape.dtype_bytes = 3; }));
  EXPECT_FALSE(refused([](Deployment&) {}));
}

}  // namespace
}  // namespace longattn::offload
