// Fused attention forward (flash style): one block per (128-query tile, head, sequence); keys and
// values stream through shared memory in 64-key tiles; online softmax in registers; tensor-core
// mma.sync m16n8k16. Tiles fully hidden by the causal mask (decided from the min/max absolute
// positions of both tiles) are skipped; fully visible ones skip the element mask.
#include <cmath>

#include "common/check.hpp"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/flash_accumulators.cuh"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_dispatch.hpp"
#include "kernels/cuda/flash_epilogue.cuh"
#include "kernels/cuda/flash_softmax.cuh"
#include "kernels/cuda/flash_tiles.hpp"

namespace longattn::kernels::cuda {
namespace {

template <class T, int D, bool kHasPos>
__global__ void __launch_bounds__(FwdTile<D>::kThreads, FwdTile<D>::kMinBlocks) flash_fwd_kernel(const FlashParams p) {
  using Tile = FwdTile<D>;
  constexpr int kBM = Tile::kBM, kBN = Tile::kBN, kNT = Tile::kThreads, kMT = Tile::kMT;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * D;
  T* sV = sK + kBN * D;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const QueryTile qt = query_tile<kBM, D>(p);
  if (qt.empty()) return;
  const std::int64_t q_start = qt.q_start, k_start = qt.k_start, q_stride = qt.q_stride, kv_stride = qt.kv_stride;
  const int len_q = qt.len_q, len_k = qt.len_k, m0 = qt.m0, rows_q = qt.rows_q;
  const T* qg = static_cast<const T*>(p.q) + qt.q_offset;
  const T* kg = static_cast<const T*>(p.k) + qt.kv_offset;
  const T* vg = static_cast<const T*>(p.v) + qt.kv_offset;

  // Positions of this block's rows and of this thread's rows: m-tile mt, half r (+8 rows).
  int qmin, qmax;
  if (kHasPos && p.pos_q) {
    warp_minmax<kBM / 32>(p.pos_q + q_start + m0, rows_q, lane, qmin, qmax);
  } else {
    qmin = m0;
    qmax = m0 + rows_q - 1;
  }
  const int r_loc0 = warp * 16 * kMT + lane / 4;  // row (m-tile mt, half r) = r_loc0 + 16 mt + 8 r
  int qpos[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = m0 + r_loc0 + 16 * mt + 8 * i;
      qpos[mt][i] = (kHasPos && p.pos_q) ? (r < len_q ? p.pos_q[q_start + r] : -0x7fffffff) : r;
    }

  TileWalk tiles{kHasPos ? p.pos_k : nullptr, k_start, len_k, kBN, (len_k + kBN - 1) / kBN, p.causal, false, qmin, qmax};
  if (p.causal && tiles.pos == nullptr) tiles.end = min(tiles.end, max(0, (qmax + 1 + kBN - 1) / kBN));

  load_tile<kBM, D, kNT>(sQ, qg, q_stride, rows_q, tid);
  int n = tiles.next(0, lane);
  if (n < tiles.end) load_tile<kBN, D, kNT>(sK, kg + static_cast<std::int64_t>(n) * kBN * kv_stride, kv_stride, len_k - n * kBN, tid);
  cp_async_commit();

  float acc_o[kMT][D / 8][4];
  clear(MmaRows<kMT, D>{acc_o});
  OnlineSoftmax<2 * kMT> softmax(p.scale);

  while (n < tiles.end) {
    cp_async_wait<0>();
    __syncthreads();  // K(n) (and Q) landed; every warp is done with the previous V
    const int kn0 = n * kBN;
    load_tile<kBN, D, kNT>(sV, vg + static_cast<std::int64_t>(kn0) * kv_stride, kv_stride, len_k - kn0, tid);
    cp_async_commit();

    float s[kMT][kBN / 8][4];
    clear(MmaRows<kMT, kBN>{s});
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      std::uint32_t qf[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        ldmatrix_x4(qf[mt], smem_addr(sQ + SwizzledTile<D>::offset(warp * 16 * kMT + mt * 16 + lane % 16, 2 * kk + lane / 16)));
#pragma unroll
      for (int j = 0; j < kBN / 16; ++j) {
        std::uint32_t bf[4];
        ldmatrix_x4(bf, smem_addr(sK + SwizzledTile<D>::offset(j * 16 + (lane / 16) * 8 + lane % 8, 2 * kk + (lane / 8) % 2)));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma16816<T>(s[mt][2 * j], qf[mt], bf);
          mma16816<T>(s[mt][2 * j + 1], qf[mt], bf + 2);
        }
      }
    }

    // Mask: the tail tile of a sequence always, causal tiles that straddle the diagonal.
    const bool partial = tiles.mask(n, lane) == TileMask::partial;
    const bool tail = kn0 + kBN > len_k;
    if (partial || tail) {
#pragma unroll
      for (int t = 0; t < kBN / 8; ++t) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = kn0 + t * 8 + (lane % 4) * 2 + c;
          const bool in = key < len_k;
          const int kp = in ? ((kHasPos && p.pos_k) ? p.pos_k[k_start + key] : key) : 0;
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
              if (!in || (partial && kp > qpos[mt][r])) s[mt][t][2 * r + c] = -INFINITY;
        }
      }
    }

    float alpha[2 * kMT];
    softmax.update(MmaRows<kMT, kBN>{s}, alpha);
    // Rescale the output only when some row of the warp saw a new maximum (alpha is exactly 1
    // otherwise, so skipping is bit-identical); long rows rarely do after their first tiles.
    if (__any_sync(0xffffffffu, softmax.any_rescale(alpha))) softmax.rescale(MmaRows<kMT, D>{acc_o}, alpha);

    const int nxt = tiles.next(n + 1, lane);
    cp_async_wait<0>();
    __syncthreads();  // V(n) landed; every warp is done with K(n)
    if (nxt < tiles.end)
      load_tile<kBN, D, kNT>(sK, kg + static_cast<std::int64_t>(nxt) * kBN * kv_stride, kv_stride, len_k - nxt * kBN, tid);
    cp_async_commit();

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      std::uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = Pack<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = Pack<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = Pack<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = Pack<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        std::uint32_t bf[4];
        ldmatrix_x4_trans(bf, smem_addr(sV + SwizzledTile<D>::offset(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, 2 * j + lane / 16)));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma16816<T>(acc_o[mt][2 * j], pa[mt], bf);
          mma16816<T>(acc_o[mt][2 * j + 1], pa[mt], bf + 2);
        }
      }
    }
    n = nxt;
  }
  cp_async_wait<0>();

  store_output<T>(p, qt, r_loc0, lane, MmaRows<kMT, D>{acc_o}, softmax);
}

template <class T, int D>
void launch_fwd(const FlashParams& p, cudaStream_t stream) {
  using Tile = FwdTile<D>;
  const int smem = (Tile::kBM + 2 * Tile::kBN) * D * static_cast<int>(sizeof(T));
  dim3 grid((p.max_len_q + Tile::kBM - 1) / Tile::kBM, p.hq, p.batch);
  if (grid.x == 0) return;
  auto kernel = (p.pos_q || p.pos_k) ? flash_fwd_kernel<T, D, true> : flash_fwd_kernel<T, D, false>;
  launch_with_smem(kernel, grid, Tile::kThreads, smem, stream, p);
}

}  // namespace

void flash_forward(const FlashParams& p, cudaStream_t stream) {
  dispatch_16bit_head_dim(p.dtype, p.d, [&]<class T, int D>() { launch_fwd<T, D>(p, stream); });
}

}  // namespace longattn::kernels::cuda
