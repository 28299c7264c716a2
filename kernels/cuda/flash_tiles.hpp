// Tile sizes of the fused attention kernels, in one place with the reason beside each.
#pragma once

namespace longattn::kernels::cuda {

// Forward: 8 warps x 16 query rows = 128 rows per block, so one key/value tile loaded into shared
// memory serves 128 rows (halving L2 traffic against 64-row blocks); 64 keys per step keep the
// score fragment at 32 fp32 registers per thread next to the 64 of the D=128 output accumulator.
template <int D>
struct FwdTile {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = kWarps * 16;
  static constexpr int kBN = 64;
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
