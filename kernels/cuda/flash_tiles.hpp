// Tile sizes of the fused attention kernels, in one place with the reason beside each.
#pragma once

namespace longattn::kernels::cuda {

// Forward: each warp owns kMT x 16 query rows. With mma.sync every warp reads the whole K and V
// tile from shared memory per step, so the shared-memory bytes per FLOP fall as 1 / (rows per
// warp): 16 rows left the kernel bound by shared-memory bandwidth (278 TFLOP/s at D=128 on H100),
// 32 rows halve that traffic (the FlashAttention-2 shape). 4 warps x 32 rows = 128 rows per block;
// 64 keys per step keep scores at 2 x 32 registers next to the 2 x 64 of the D=128 accumulator.
// The two knobs can be overridden at build time (-DLONGATTN_FWD_MT=1, -DLONGATTN_FWD_BN_D128=32) to
// compare variants in one GPU session; the defaults are the measured best.
#ifndef LONGATTN_FWD_MT
#define LONGATTN_FWD_MT 2
#endif
#ifndef LONGATTN_FWD_BN_D128
#define LONGATTN_FWD_BN_D128 64
#endif
template <int D>
struct FwdTile {
  static constexpr int kMT = LONGATTN_FWD_MT;  // 16-row m-tiles per warp
  static constexpr int kWarps = 8 / kMT;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = kWarps * 16 * kMT;
  static constexpr int kBN = D == 128 ? LONGATTN_FWD_BN_D128 : 64;
  static constexpr int kMinBlocks = kMT == 1 ? 1 : 2;  // register cap: 255 per thread either way
};

// Backward dK/dV: each warp owns 16 keys (128 per block) and holds their dK and dV accumulators
// (2 x 64 registers at D=128) across the whole query loop; the query step is small at D=128 so the
// transposed score and dP fragments (kBMq/2 registers each) still fit without spilling.
template <int D>
struct BwdKVTile {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBN = kWarps * 16;
  static constexpr int kBMq = D == 128 ? 32 : 64;
};

// Backward dQ: the forward's shape (each warp 16 query rows) with double-buffered key/value tiles,
// since K is needed twice per step (scores, then dQ += dS K).
template <int D>
struct BwdQTile {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = kWarps * 16;
  static constexpr int kBN = D == 128 ? 32 : 64;
};

}  // namespace longattn::kernels::cuda
