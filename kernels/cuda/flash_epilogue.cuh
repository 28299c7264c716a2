// The epilogue of the forward kernels: normalize each row of the output accumulator by its softmax
// sum and store o (in the output's dtype) and lse (natural log) for the rows inside the sequence.
// A row that saw no key gets o = 0 and lse = -inf, never NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_softmax.cuh"

namespace longattn::kernels::cuda {

// first_row: this thread's first row inside the query tile (the accessor's row r is first_row + 8 r).
template <class T, class Rows, int kRows>
__device__ __forceinline__ void store_output(const FlashParams& p, const QueryTile& qt, int first_row, int lane, Rows o,
                                             const OnlineSoftmax<kRows>& softmax) {
  constexpr int D = Rows::kGroups * 8;
#pragma unroll
  for (int pair = 0; pair < kRows / 2; ++pair)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 2 * pair + half;
      const float sum = softmax.total_sum(r);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int row = qt.m0 + first_row + 8 * r;
      if (row >= qt.len_q) continue;
      const std::int64_t tok = qt.q_start + row;
      const std::int64_t obase = tok * qt.q_stride + static_cast<std::int64_t>(qt.h) * D + 2 * (lane % 4);
#pragma unroll
      for (int g = 0; g < Rows::kGroups; ++g) store_pair<T>(p.o, p.o_dtype, obase + 8 * g, o(r, g, 0) * inv, o(r, g, 1) * inv);
      if (lane % 4 == 0)
        p.lse[static_cast<std::int64_t>(qt.h) * p.tq + tok] = sum > 0.0f ? softmax.row_max[r] * p.scale + log2f(sum) * kLn2 : -INFINITY;
    }
}

}  // namespace longattn::kernels::cuda
