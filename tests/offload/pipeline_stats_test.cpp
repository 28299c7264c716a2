// offload_decode's pipeline report on timings worked out by hand, and its GPU-memory estimate, the
// largest batch that fits and the out-of-memory refusal (the CPU side of --device cuda).
#include <gtest/gtest.h>

#include <string>

#include "../../examples/offload_decode/capacity.hpp"
#include "../../examples/offload_decode/pipeline_stats.hpp"

namespace offload_decode {
namespace {

using std::chrono::milliseconds;

TEST(OffloadPipelineStats, AttentionBusyTimeCountsQueuedTimeOnce) {
  const auto t0 = std::chrono::steady_clock::now();
  // Sent at 0, 2 and 20 ms; answered at 10, 15 and 24 ms: the second waited behind the first
  // until 10 ms, so the attention side was busy 10 + 5 + 4 = 19 ms.
  const std::vector<RoundTrip> trips{{t0, t0 + milliseconds(10)}, {t0 + milliseconds(2), t0 + milliseconds(15)},
                                     {t0 + milliseconds(20), t0 + milliseconds(24)}};
  EXPECT_NEAR(attention_busy_seconds(trips), 0.019, 1e-9);
  // 1 step, 1 layer, 3 micro-batches of a batch of 6 in 30 ms with 12 ms of model compute:
  // 4 ms per part on the model, 19/3 ms on the attention side; bound 6 / (3 * 19/3 ms) = 315.8
  // tokens/s against 6 / 30 ms = 200 reached.
  const PipelineReport r = pipeline_report(trips, 0.012, 0.003, 0.030, 1, 1, 3, 6);
  EXPECT_NEAR(r.compute_busy_fraction, 0.4, 1e-12);
  EXPECT_NEAR(r.compute_s_per_part, 0.004, 1e-12);
  EXPECT_NEAR(r.attention_s_per_part, 0.019 / 3, 1e-9);
  EXPECT_NEAR(r.bound_tokens_per_s, 6 / 0.019, 1e-6);
  EXPECT_NEAR(r.tokens_per_s, 200, 1e-9);
  EXPECT_NEAR(r.ratio(), 200 * 0.019 / 6, 1e-9);
  EXPECT_NEAR(r.attention_wait_s_per_step, 0.003, 1e-12);
  EXPECT_NEAR(r.time_between_tokens_s, 0.030, 1e-12);
}

// 2 layers, 4/2 heads x 8 (hidden 32, 16 values per kv row), bf16, context 100 + 4 steps.
Config small(bool local) {
  Config c;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 8;
  c.context = 100;
  c.steps = 4;
  c.dtype = longattn::DType::bf16;
  c.local_attention = local;
  return c;
}

TEST(OffloadDecodeCapacity, EstimateByHand) {
  // Weights 2 layers * 2 B * (2*32*32 + 2*32*16) = 12288; activations per sequence 2*32*4 (x, y)
  // + 2*32*4 (q, o) + 2*16*4 (k, v) + 4*4 (lse) + 32*2 (q in bf16) = 720; local KV per sequence
  // 2 layers * 2 * 104 tokens * 16 * 2 B = 13312; offloaded: the new token's k, v (64 per sequence)
  // and one sequence's prefill staging 2 * 100 * 16 * 2 = 6400.
  const GpuBytes local = gpu_decode_bytes(small(true), 3);
  EXPECT_EQ(local.weights, 12288u);
  EXPECT_EQ(local.activations, 3u * 720);
  EXPECT_EQ(local.kv, 3u * 13312);
  EXPECT_EQ(local.staging, 0u);
  const GpuBytes offloaded = gpu_decode_bytes(small(false), 3);
  EXPECT_EQ(offloaded.kv, 3u * 64);
  EXPECT_EQ(offloaded.staging, 6400u);
  EXPECT_EQ(offloaded.total(), 12288u + 3 * 720 + 3 * 64 + 6400);
}

TEST(OffloadDecodeCapacity, LargestBatchAndRefusal) {
  // Below 5.12 GiB free the fixed 256 MiB reserve applies: usable = free - 256 MiB.
  const std::size_t reserve = kGpuReserveBytes;
  const std::size_t per_sequence = 720 + 13312;
  const std::size_t free_bytes = reserve + 12288 + 10 * per_sequence;
  EXPECT_EQ(usable_gpu_bytes(free_bytes), 12288 + 10 * per_sequence);
  EXPECT_EQ(largest_gpu_batch(small(true), free_bytes), 10);
  EXPECT_EQ(largest_gpu_batch(small(true), free_bytes - 1), 9);
  EXPECT_EQ(largest_gpu_batch(small(true), reserve + 12288), 0);
  // 80 GiB free: the 5% reserve (4 GiB) applies.
  EXPECT_EQ(usable_gpu_bytes(std::size_t{80} << 30), std::size_t{76} << 30);

  Config c = small(true);
  c.batch = 10;
  EXPECT_NO_THROW(require_gpu_fits(c, free_bytes));
  c.batch = 11;
  try {
    require_gpu_fits(c, free_bytes);
    FAIL() << "batch 11 does not fit";
  } catch (const longattn::Error& e) {
    EXPECT_EQ(e.code(), longattn::ErrorCode::out_of_capacity);
    const std::string what = e.what();
    EXPECT_NE(what.find("batch 11"), std::string::npos) << what;
    EXPECT_NE(what.find("largest batch that fits is 10"), std::string::npos) << what;
    EXPECT_NE(what.find("offloading"), std::string::npos) << what;
  }
  // The same batch offloaded keeps its KV off the GPU and fits.
  Config off = small(false);
  off.batch = 11;
  EXPECT_NO_THROW(require_gpu_fits(off, free_bytes));
}

}  // namespace
}  // namespace offload_decode
