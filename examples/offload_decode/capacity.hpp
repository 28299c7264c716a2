// GPU memory of offload_decode --device cuda, estimated before anything is allocated: what the
// all-on-GPU mode (--local-attention) and the offloaded mode each hold on the GPU, the largest
// batch that fits in the device's free memory, and the out-of-memory refusal, which names that
// batch instead of failing halfway through the allocations. Pure arithmetic on the run's shape.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <fmt/format.h>

#include "decode_common.hpp"
#include "longattn/error.hpp"
#include "longattn/tensor.hpp"

namespace offload_decode {

// Kept free beside the estimate: the CUDA backend's workspaces and the allocator's rounding are
// not counted one by one.
inline constexpr double kGpuReserveFraction = 0.05;
inline constexpr std::size_t kGpuReserveBytes = std::size_t{256} << 20;

struct GpuBytes {
  std::size_t weights = 0, activations = 0, kv = 0, staging = 0;
  std::size_t total() const { return weights + activations + kv + staging; }
};

// What run_gpu allocates for `batch` sequences: bf16 weights, f32 activations, and either the KV
// of every layer for context + steps tokens (local attention) or the new token's k, v and one
// sequence's prefill staging (offloaded).
inline GpuBytes gpu_decode_bytes(const Config& c, std::int64_t batch) {
  const std::size_t B = static_cast<std::size_t>(batch), H = static_cast<std::size_t>(c.heads), D = static_cast<std::size_t>(c.head_dim);
  const std::size_t L = static_cast<std::size_t>(c.layers), hidden = static_cast<std::size_t>(c.hidden()), row = c.kv_row();
  const std::size_t es = longattn::dtype_size(c.dtype), qn = B * H * D, cap = static_cast<std::size_t>(c.context + c.steps);
  GpuBytes g;
  g.weights = L * 2 * (2 * hidden * H * D + 2 * hidden * row);
  g.activations = 2 * B * hidden * 4 + 2 * qn * 4 + 2 * B * row * 4 + B * H * 4 + qn * es;
  if (c.local_attention) {
    g.kv = L * 2 * B * cap * row * es;
  } else {
    g.kv = 2 * B * row * es;
    g.staging = 2 * static_cast<std::size_t>(c.context) * row * es;
  }
  return g;
}

// Memory the run may use out of the device's free bytes.
inline std::size_t usable_gpu_bytes(std::size_t free_bytes) {
  const auto reserve = std::max<std::size_t>(kGpuReserveBytes, static_cast<std::size_t>(static_cast<double>(free_bytes) * kGpuReserveFraction));
  return free_bytes > reserve ? free_bytes - reserve : 0;
}

// The largest batch whose estimate fits in `free_bytes` (0 when not even one sequence does).
inline std::int64_t largest_gpu_batch(const Config& c, std::size_t free_bytes) {
  const std::size_t usable = usable_gpu_bytes(free_bytes);
  if (gpu_decode_bytes(c, 1).total() > usable) return 0;
  std::int64_t lo = 1, hi = 2;
  while (hi < (std::int64_t{1} << 40) && gpu_decode_bytes(c, hi).total() <= usable) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const std::int64_t mid = lo + (hi - lo) / 2;
    (gpu_decode_bytes(c, mid).total() <= usable ? lo : hi) = mid;
  }
  return lo;
}

// Throws Error(out_of_capacity) when the run's batch does not fit, naming what it needs, what is
// free, the largest batch that fits and (all on the GPU) that offloading runs this batch.
inline void require_gpu_fits(const Config& c, std::size_t free_bytes) {
  const GpuBytes need = gpu_decode_bytes(c, c.batch);
  const std::size_t usable = usable_gpu_bytes(free_bytes);
  if (need.total() <= usable) return;
  const double gib = double(1 << 30);
  throw longattn::Error(
      longattn::ErrorCode::out_of_capacity,
      fmt::format("out of GPU memory: batch {} needs {:.2f} GiB on the GPU ({:.2f} GiB of KV, {:.2f} GiB of weights) but {:.2f} GiB is "
                  "free ({:.2f} GiB usable); the largest batch that fits is {}{}",
                  c.batch, need.total() / gib, need.kv / gib, need.weights / gib, free_bytes / gib, usable / gib,
                  largest_gpu_batch(c, free_bytes),
                  c.local_attention ? "; offloading (drop --local-attention, add --servers) keeps the KV off the GPU" : "; use a smaller --context"));
}

}  // namespace offload_decode
