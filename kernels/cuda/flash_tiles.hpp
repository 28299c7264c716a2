// Tile sizes of the fused attention kernels, in one place with the reason beside each.
#pragma once

namespace longattn::kernels::cuda {

// Forward: each warp owns kMT x 16 query rows. With mma.sync every warp reads the whole K and V
// tile from shared memory per step, so the shared-memory bytes per FLOP fall as 1 / (rows per
// warp): with 16 rows the kernel is bound by shared-memory bandwidth, 32 rows halve that traffic
// (the FlashAttention-2 shape). 4 warps x 32 rows = 128 rows per block; 64 keys per step keep
// scores at 2 x 32 registers next to the 2 x 64 of the D=128 accumulator.
// The two knobs can be overridden at build time (-DLONGATTN_FWD_MT=1, -DLONGATTN_FWD_BN_D128=32) to
// compare variants in one GPU session; the defaults measured best
// (bench/results/gpu_kernels_h100_2026-11-23.md).
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

// Backward dK/dV: 128 keys per block, 8 warps, kBMq queries per step. The score products split
// the warps 4 (32 keys) x 2 (kBMq/2 queries); P^T and dS^T are exchanged through shared memory;
// dK and dV split them 4 (32 keys) x 2 (D/2 columns), so each warp holds 2 x 32 x D/2 accumulators
// (128 registers at D=128) and every product runs on 32-row operands (FlashAttention-2's layout):
// each query/dO fragment read from shared memory feeds several products, which keeps the kernel
// off the shared-memory bandwidth bound that 16 keys per warp over all D columns hits.
// kBMq: 64 at D=128 (the 2 x 32 score/dP registers fit beside the 128 accumulators), 128 at D=64
// (room for it there, and fewer steps). kDqUnroll: key-loop unrolling of the atomic dQ product
// (full at D=128; 4 at D=64 bounds the spills of the 128-query step). The measurements behind
// these choices: bench/results/gpu_kernels_h100_2026-11-23.md.
template <int D>
struct BwdKVTile {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBN = 128;
  static constexpr int kBMq = D == 64 ? 128 : 64;
  static constexpr int kDqUnroll = D == 64 ? 4 : 8;
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
