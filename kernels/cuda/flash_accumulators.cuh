// The accumulator layouts of the forward kernels behind one accessor, so the online softmax and
// the epilogue are written once (flash_softmax.cuh, flash_epilogue.cuh). In both layouts a thread
// holds kRows rows of its block's tile, row r being its first row + 8 r, and in every 8-column group
// of a row the two adjacent columns 2 (lane % 4) + {0, 1}; the 4 lanes of a quad share each row.
// mma.sync m16n8 fragments and the wgmma m64nN accumulator are both of this shape, they only
// number the elements differently. Rows come in pairs, 2 k and 2 k + 1 being the two 8-row halves
// of one 16-row slice; the shared code loops over them as (pair, half), the fragments' own nesting,
// because a flat loop over rows unrolls into a schedule that needs more registers.
#pragma once

namespace longattn::kernels::cuda {

// kMT m-tiles of 16 rows x N columns of mma.sync m16n8 fragments: float[kMT][N / 8][4], rows
// (m-tile, half) in the order m-tile major.
template <int kMT, int N>
struct MmaRows {
  static constexpr int kRows = 2 * kMT;  // pair mt: m-tile mt
  static constexpr int kGroups = N / 8;
  float (&acc)[kMT][N / 8][4];
  __device__ __forceinline__ float& operator()(int row, int group, int column) const {
    return acc[row / 2][group][2 * (row % 2) + column];
  }
};

// One wgmma m64nN fp32 accumulator: float[N / 2], element 4 group + 2 row + column.
template <int N>
struct WgmmaRows {
  static constexpr int kRows = 2;
  static constexpr int kGroups = N / 8;
  float (&acc)[N / 2];
  __device__ __forceinline__ float& operator()(int row, int group, int column) const { return acc[4 * group + 2 * row + column]; }
};

template <class Rows>
__device__ __forceinline__ void clear(Rows acc) {
#pragma unroll
  for (int r = 0; r < Rows::kRows; ++r)
#pragma unroll
    for (int g = 0; g < Rows::kGroups; ++g) acc(r, g, 0) = acc(r, g, 1) = 0.0f;
}

}  // namespace longattn::kernels::cuda
