// The online softmax of the forward kernels, for any accumulator layout of flash_accumulators.cuh:
// per row the running maximum and sum of exponentials over the key tiles seen so far, the update
// that turns one tile's scores into probabilities in place, and the factor by which the output
// accumulated so far must shrink when a row's maximum grows.
#pragma once

#include <cmath>

#include "kernels/cuda/flash_common.cuh"

namespace longattn::kernels::cuda {

template <int kRows>
struct OnlineSoftmax {
  static_assert(kRows % 2 == 0, "rows come in pairs (flash_accumulators.cuh)");
  // row_max holds the raw (unscaled) maximum of each row, so an exponent is
  // scale * log2(e) * (s - max): one FFMA per score, on the special-function unit's 2^x.
  float row_max[kRows];
  float row_sum[kRows];  // this thread's part; the quad's lanes are summed in total_sum()
  float scale_log2;

  __device__ __forceinline__ explicit OnlineSoftmax(float scale) : scale_log2(scale * kLog2e) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.0f;
    }
  }

  // Scores of one key tile -> probabilities in place; alpha[r]: the factor for what the output of
  // row r holds so far (exactly 1 when its maximum did not change). A row whose scores are all
  // -inf so far keeps exponent offset 0, so its probabilities are 0, never NaN.
  template <class Rows>
  __device__ __forceinline__ void update(Rows s, float (&alpha)[kRows]) {
    static_assert(Rows::kRows == kRows, "one softmax row per accumulator row");
#pragma unroll
    for (int pair = 0; pair < kRows / 2; ++pair)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 2 * pair + half;
        float mx = row_max[r];
#pragma unroll
        for (int g = 0; g < Rows::kGroups; ++g) mx = fmaxf(mx, fmaxf(s(r, g, 0), s(r, g, 1)));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_scaled = mx == -INFINITY ? 0.0f : mx * scale_log2;
        alpha[r] = fast_exp2(row_max[r] * scale_log2 - m_scaled);
        row_max[r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int g = 0; g < Rows::kGroups; ++g) {
          s(r, g, 0) = fast_exp2(fmaf(s(r, g, 0), scale_log2, -m_scaled));
          s(r, g, 1) = fast_exp2(fmaf(s(r, g, 1), scale_log2, -m_scaled));
          sum += s(r, g, 0) + s(r, g, 1);
        }
        row_sum[r] = row_sum[r] * alpha[r] + sum;
      }
  }

  // Whether some row of this thread must rescale its output (alpha != 1).
  __device__ __forceinline__ static bool any_rescale(const float (&alpha)[kRows]) {
    bool any = false;
#pragma unroll
    for (int pair = 0; pair < kRows / 2; ++pair) any |= (alpha[2 * pair] != 1.0f) | (alpha[2 * pair + 1] != 1.0f);
    return any;
  }

  template <class Rows>
  __device__ __forceinline__ static void rescale(Rows o, const float (&alpha)[kRows]) {
#pragma unroll
    for (int pair = 0; pair < kRows / 2; ++pair)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int g = 0; g < Rows::kGroups; ++g) {
          o(2 * pair + half, g, 0) *= alpha[2 * pair + half];
          o(2 * pair + half, g, 1) *= alpha[2 * pair + half];
        }
  }

  // The row's sum over all its keys (the 4 lanes of the quad each hold a quarter of the columns).
  __device__ __forceinline__ float total_sum(int r) const {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    return sum;
  }
};

}  // namespace longattn::kernels::cuda
