// Fused attention backward, deterministic and atomic-free, in two kernels:
//  - dK/dV: one block per (128-key tile, kv head, sequence); each warp owns 32 keys x D/2 columns
//    of dK and dV in registers while the block walks every query tile of every query head of its
//    GQA group, recomputing P^T = exp(K Q^T - lse) and dS^T = P^T (V dO^T - delta) in transposed
//    form and exchanging them between warps through shared memory (see BwdKVTile);
//  - dQ: one block per (128-query tile, head, sequence), the forward's walk over key tiles,
//    recomputing P and dS and accumulating dQ = dS K.
// Recomputing the scores twice costs 7 instead of 5 tile products, but no gradient is ever summed
// by atomics: the result is bit-identical from run to run and `accumulate` is a plain add. That is
// the deterministic mode. The default mode skips the dQ kernel: the dK/dV kernel stages dS of each
// step in shared memory and adds dQ += dS K into an fp32 buffer with atomics (FlashAttention-2's
// scheme), 5 tile products per step, run-to-run differences at fp32 rounding level.
#include <cmath>

#include "common/check.hpp"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_tiles.hpp"

namespace longattn::kernels::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// dQ
template <class T, int D, bool kHasPos>
__global__ void __launch_bounds__(BwdQTile<D>::kThreads, 1) flash_bwd_dq_kernel(const FlashParams p) {
  using Tile = BwdQTile<D>;
  constexpr int kBM = Tile::kBM, kBN = Tile::kBN, kNT = Tile::kThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBM * D;
  T* sK = sdO + kBM * D;  // two buffers of kBN x D
  T* sV = sK + 2 * kBN * D;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const QueryTile qt = query_tile<kBM, D>(p);
  if (qt.empty()) return;
  const std::int64_t q_start = qt.q_start, k_start = qt.k_start, q_stride = qt.q_stride, kv_stride = qt.kv_stride;
  const int len_q = qt.len_q, len_k = qt.len_k, m0 = qt.m0, rows_q = qt.rows_q, h = qt.h;
  const std::int64_t q_off = qt.q_offset;
  const T* kg = static_cast<const T*>(p.k) + qt.kv_offset;
  const T* vg = static_cast<const T*>(p.v) + qt.kv_offset;

  int qmin, qmax;
  if (kHasPos && p.pos_q) {
    warp_minmax<kBM / 32>(p.pos_q + q_start + m0, rows_q, lane, qmin, qmax);
  } else {
    qmin = m0;
    qmax = m0 + rows_q - 1;
  }
  const int r_loc0 = warp * 16 + lane / 4;
  int qpos[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + r_loc0 + 8 * i;
    const bool in = r < len_q;
    qpos[i] = (kHasPos && p.pos_q) ? (in ? p.pos_q[q_start + r] : -0x7fffffff) : r;
    const float l = in ? p.lse_in[static_cast<std::int64_t>(h) * p.tq + q_start + r] : -INFINITY;
    lse2[i] = l == -INFINITY ? INFINITY : l * kLog2e;  // a row that saw nothing gets p = 0
    delta[i] = in ? p.delta[static_cast<std::int64_t>(h) * p.tq + q_start + r] : 0.0f;
  }

  TileWalk tiles{kHasPos ? p.pos_k : nullptr, k_start, len_k, kBN, (len_k + kBN - 1) / kBN, p.causal, false, qmin, qmax};
  if (p.causal && tiles.pos == nullptr) tiles.end = min(tiles.end, max(0, (qmax + 1 + kBN - 1) / kBN));

  load_tile<kBM, D, kNT>(sQ, static_cast<const T*>(p.q) + q_off, q_stride, rows_q, tid);
  load_tile<kBM, D, kNT>(sdO, static_cast<const T*>(p.d_o) + q_off, q_stride, rows_q, tid);
  int n = tiles.next(0, lane);
  if (n < tiles.end) {
    load_tile<kBN, D, kNT>(sK, kg + static_cast<std::int64_t>(n) * kBN * kv_stride, kv_stride, len_k - n * kBN, tid);
    load_tile<kBN, D, kNT>(sV, vg + static_cast<std::int64_t>(n) * kBN * kv_stride, kv_stride, len_k - n * kBN, tid);
  }
  cp_async_commit();

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  const float scale_log2 = p.scale * kLog2e;

  cp_async_wait<0>();
  __syncthreads();
  std::uint32_t qf[D / 16][4], dof[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk], smem_addr(sQ + SwizzledTile<D>::offset(warp * 16 + lane % 16, 2 * kk + lane / 16)));
    ldmatrix_x4(dof[kk], smem_addr(sdO + SwizzledTile<D>::offset(warp * 16 + lane % 16, 2 * kk + lane / 16)));
  }

  int buf = 0;
  while (n < tiles.end) {
    cp_async_wait<0>();
    __syncthreads();  // tile n is in buffer `buf`; every warp is done with the other buffer
    const int nxt = tiles.next(n + 1, lane);
    if (nxt < tiles.end) {
      const std::int64_t off = static_cast<std::int64_t>(nxt) * kBN * kv_stride;
      load_tile<kBN, D, kNT>(sK + (buf ^ 1) * kBN * D, kg + off, kv_stride, len_k - nxt * kBN, tid);
      load_tile<kBN, D, kNT>(sV + (buf ^ 1) * kBN * D, vg + off, kv_stride, len_k - nxt * kBN, tid);
    }
    cp_async_commit();
    const T* cK = sK + buf * kBN * D;
    const T* cV = sV + buf * kBN * D;
    const int kn0 = n * kBN;

    float s[kBN / 8][4], dp[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = dp[i][j] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < kBN / 16; ++j) {
        std::uint32_t bk[4], bv[4];
        const int off = SwizzledTile<D>::offset(j * 16 + (lane / 16) * 8 + lane % 8, 2 * kk + (lane / 8) % 2);
        ldmatrix_x4(bk, smem_addr(cK + off));
        ldmatrix_x4(bv, smem_addr(cV + off));
        mma16816<T>(s[2 * j], qf[kk], bk);
        mma16816<T>(s[2 * j + 1], qf[kk], bk + 2);
        mma16816<T>(dp[2 * j], dof[kk], bv);
        mma16816<T>(dp[2 * j + 1], dof[kk], bv + 2);
      }
    }

    const bool partial = tiles.mask(n, lane) == TileMask::partial;
    const bool tail = kn0 + kBN > len_k;
#pragma unroll
    for (int t = 0; t < kBN / 8; ++t) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = kn0 + t * 8 + (lane % 4) * 2 + c;
        bool in = true;
        int kp = 0;
        if (partial || tail) {
          in = key < len_k;
          kp = in ? ((kHasPos && p.pos_k) ? p.pos_k[k_start + key] : key) : 0;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const bool vis = in && !(partial && kp > qpos[r]);
          const float pr = vis ? fast_exp2(s[t][2 * r + c] * scale_log2 - lse2[r]) : 0.0f;
          s[t][2 * r + c] = pr * (dp[t][2 * r + c] - delta[r]) * p.scale;  // dS
        }
      }
    }

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      std::uint32_t a[4];
      a[0] = Pack<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Pack<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Pack<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Pack<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        std::uint32_t bf[4];
        ldmatrix_x4_trans(bf, smem_addr(cK + SwizzledTile<D>::offset(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, 2 * j + lane / 16)));
        mma16816<T>(acc[2 * j], a, bf);
        mma16816<T>(acc[2 * j + 1], a, bf + 2);
      }
    }
    buf ^= 1;
    n = nxt;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + r_loc0 + 8 * r;
    if (row >= len_q) continue;
    const std::int64_t base = (q_start + row) * q_stride + static_cast<std::int64_t>(h) * D + (lane % 4) * 2;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store_grad_pair(p.dq, p.grad_dtype_q, p.accumulate, base + dt * 8, acc[dt][2 * r], acc[dt][2 * r + 1]);
  }
}

// ---------------------------------------------------------------------------------------------
// dK, dV
// One block owns 128 keys; 8 warps. Every step (one 64-query tile of one head of the group):
//  1. S^T = K Q^T and dP^T = V dO^T: warp (wk = warp % 4, wq = warp / 4) computes keys
//     [32 wk, 32 wk + 32) x queries [32 wq, 32 wq + 32); P^T and dS^T go to shared memory (bf16/fp16,
//     [keys][queries], swizzled, conflict-free 32-bit stores);
//  2. atomic mode: dQ (64 x D) += dS K, warp (warp % 2, warp / 2) takes 32 queries x D/4 columns;
//  3. dV += P^T dO, dK += dS^T Q: warp (wk, wd = warp / 4) owns keys [32 wk, +32) x columns
//     [D/2 wd, +D/2) of dK and dV in registers for the whole walk.
// Each warp works on 32-row operands in every product, so a Q/dO fragment read from shared memory
// feeds more mma instructions than with 16-key slices per warp: fewer shared-memory reads per mma.
template <class T, int D, bool kHasPos, bool kAtomicDQ>
__global__ void __launch_bounds__(BwdKVTile<D>::kThreads, 1) flash_bwd_dkdv_kernel(const FlashParams p) {
  using Tile = BwdKVTile<D>;
  constexpr int kBN = Tile::kBN, kBM = Tile::kBMq, kNT = Tile::kThreads;
  static_assert(kBN == 128 && (kBM == 64 || kBM == 128) && Tile::kWarps == 8, "warp roles below assume 128 keys, 8 warps");
  constexpr int kSQ = kBM / 2;   // queries per warp in the score products
  constexpr int kQW = kBM / 32;  // dQ: warps along the queries (32 each); the rest split D
  constexpr int kDD = D / 2;  // dK/dV columns per warp
  constexpr int kQD = D * kQW / 8;  // dQ columns per warp
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * D;
  T* sQ = sV + kBN * D;       // two buffers of kBM x D
  T* sdO = sQ + 2 * kBM * D;  // two buffers
  T* sP = sdO + 2 * kBM * D;  // [kBN][kBM] P^T of the step, swizzled
  T* sdS = sP + kBN * kBM;    // [kBN][kBM] dS^T of the step
  float* sLse = reinterpret_cast<float*>(sdS + kBN * kBM);  // [2][kBM], log2 domain
  float* sDelta = sLse + 2 * kBM;                           // [2][kBM]
  int* sQpos = reinterpret_cast<int*>(sDelta + 2 * kBM);    // [2][kBM]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wk = warp % 4, wh = warp / 4;
  const KeyTile kt = key_tile<kBN, D>(p);
  if (kt.empty()) return;
  const std::int64_t q_start = kt.q_start, k_start = kt.k_start, q_stride = kt.q_stride, kv_stride = kt.kv_stride;
  const int len_q = kt.len_q, len_k = kt.len_k, n0 = kt.n0, rows_k = kt.rows_k, hk = kt.hk, group = kt.group;
  const std::int64_t kv_off = kt.kv_offset;

  int kmin, kmax;
  if (kHasPos && p.pos_k) {
    warp_minmax<kBN / 32>(p.pos_k + k_start + n0, rows_k, lane, kmin, kmax);
  } else {
    kmin = n0;
    kmax = n0 + rows_k - 1;
  }
  // This thread's keys (block-local): wk * 32 + mt * 16 + lane / 4 + 8 r.
  int kpos[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = n0 + wk * 32 + mt * 16 + lane / 4 + 8 * r;
      kpos[mt][r] = (kHasPos && p.pos_k) ? (key < len_k ? p.pos_k[k_start + key] : 0x7fffffff) : key;
    }

  TileWalk tiles{kHasPos ? p.pos_q : nullptr, q_start, len_q, kBM, (len_q + kBM - 1) / kBM, p.causal, true, kmin, kmax};
  int t_begin = 0;
  if (p.causal && tiles.pos == nullptr) t_begin = min(tiles.end, max(0, kmin) / kBM);

  // Work items are (query head of the group, query tile), heads outer.
  auto next_item = [&](int g, int t, int& g_out, int& t_out) {
    t = tiles.next(t, lane);
    while (t >= tiles.end && ++g < group) t = tiles.next(t_begin, lane);
    g_out = g;
    t_out = t;
  };
  auto load_item = [&](int g, int t, int bf) {
    const int h = hk * group + g;
    const int m0 = t * kBM;
    const int rows = min(kBM, len_q - m0);
    const std::int64_t q_off = (q_start + m0) * q_stride + static_cast<std::int64_t>(h) * D;
    load_tile<kBM, D, kNT>(sQ + bf * kBM * D, static_cast<const T*>(p.q) + q_off, q_stride, rows, tid);
    load_tile<kBM, D, kNT>(sdO + bf * kBM * D, static_cast<const T*>(p.d_o) + q_off, q_stride, rows, tid);
    if (tid < kBM) {
      const bool in = tid < rows;
      const std::int64_t li = static_cast<std::int64_t>(h) * p.tq + q_start + m0 + tid;
      const float l = in ? p.lse_in[li] : -INFINITY;
      sLse[bf * kBM + tid] = l == -INFINITY ? INFINITY : l * kLog2e;
      sDelta[bf * kBM + tid] = in ? p.delta[li] : 0.0f;
      sQpos[bf * kBM + tid] = (kHasPos && p.pos_q) ? (in ? p.pos_q[q_start + m0 + tid] : -0x7fffffff) : m0 + tid;
    }
  };

  load_tile<kBN, D, kNT>(sK, static_cast<const T*>(p.k) + kv_off, kv_stride, rows_k, tid);
  load_tile<kBN, D, kNT>(sV, static_cast<const T*>(p.v) + kv_off, kv_stride, rows_k, tid);
  int g, t;
  next_item(0, t_begin, g, t);
  if (g < group) load_item(g, t, 0);
  cp_async_commit();

  float dk[2][kDD / 8][4], dv[2][kDD / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < kDD / 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dk[mt][i][j] = dv[mt][i][j] = 0.0f;
  const float scale_log2 = p.scale * kLog2e;

  int buf = 0;
  while (g < group) {
    cp_async_wait<0>();
    __syncthreads();  // item (g, t) is in buffer `buf`; every warp is done with the other one and with sP/sdS
    int g2, t2;
    next_item(g, t + 1, g2, t2);
    if (g2 < group) load_item(g2, t2, buf ^ 1);
    cp_async_commit();
    const T* cQ = sQ + buf * kBM * D;
    const T* cdO = sdO + buf * kBM * D;
    const float* cL = sLse + buf * kBM;
    const float* cD = sDelta + buf * kBM;
    const int* cP = sQpos + buf * kBM;

    {
      float s[2][kSQ / 8][4], dp[2][kSQ / 8][4];  // [key m-tile][query n-tile][fragment]
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < kSQ / 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) s[mt][i][j] = dp[mt][i][j] = 0.0f;
#pragma unroll 2
      for (int kk = 0; kk < D / 16; ++kk) {
        std::uint32_t ak[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4(ak[mt], smem_addr(sK + SwizzledTile<D>::offset(wk * 32 + mt * 16 + lane % 16, 2 * kk + lane / 16)));
#pragma unroll
        for (int j = 0; j < kSQ / 16; ++j) {
          std::uint32_t bq[4];
          ldmatrix_x4(bq, smem_addr(cQ + SwizzledTile<D>::offset(wh * kSQ + j * 16 + (lane / 16) * 8 + lane % 8, 2 * kk + (lane / 8) % 2)));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816<T>(s[mt][2 * j], ak[mt], bq);
            mma16816<T>(s[mt][2 * j + 1], ak[mt], bq + 2);
          }
        }
        std::uint32_t av[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4(av[mt], smem_addr(sV + SwizzledTile<D>::offset(wk * 32 + mt * 16 + lane % 16, 2 * kk + lane / 16)));
#pragma unroll
        for (int j = 0; j < kSQ / 16; ++j) {
          std::uint32_t bo[4];
          ldmatrix_x4(bo, smem_addr(cdO + SwizzledTile<D>::offset(wh * kSQ + j * 16 + (lane / 16) * 8 + lane % 8, 2 * kk + (lane / 8) % 2)));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816<T>(dp[mt][2 * j], av[mt], bo);
            mma16816<T>(dp[mt][2 * j + 1], av[mt], bo + 2);
          }
        }
      }

      const bool partial = tiles.mask(t, lane) == TileMask::partial;
      // P^T and dS^T, straight to shared memory.
#pragma unroll
      for (int nt = 0; nt < kSQ / 8; ++nt) {
        float pr[2][2][2], ds[2][2][2];  // [mt][r][c]
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = wh * kSQ + nt * 8 + (lane % 4) * 2 + c;
          const float l2 = cL[col], dl = cD[col];
          const int qp = cP[col];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const bool vis = !(partial && kpos[mt][r] > qp);
              const float x = s[mt][nt][2 * r + c] * scale_log2 - l2;
              const float e = vis ? fast_exp2(x) : 0.0f;
              pr[mt][r][c] = e;
              ds[mt][r][c] = e * (dp[mt][nt][2 * r + c] - dl) * p.scale;
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int key = wk * 32 + mt * 16 + lane / 4 + 8 * r;
            const int off = SwizzledTile<kBM>::offset(key, wh * (kSQ / 8) + nt) + (lane % 4) * 2;
            *reinterpret_cast<std::uint32_t*>(sP + off) = Pack<T>::pack(pr[mt][r][0], pr[mt][r][1]);
            *reinterpret_cast<std::uint32_t*>(sdS + off) = Pack<T>::pack(ds[mt][r][0], ds[mt][r][1]);
          }
      }
    }
    __syncthreads();  // P^T and dS^T of the whole 128 x 64 tile are staged

    if constexpr (kAtomicDQ) {
      // dQ (kBM x D) += dS (kBM x kBN) K (kBN x D); dS read transposed from the [keys][queries] tile.
      const int wq2 = warp % kQW, wn = warp / kQW;
      float acc[2][kQD / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < kQD / 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[mt][i][j] = 0.0f;
#pragma unroll Tile::kDqUnroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        std::uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4_trans(a[mt], smem_addr(sdS + SwizzledTile<kBM>::offset(kk * 16 + (lane / 16) * 8 + lane % 8, 4 * wq2 + 2 * mt + (lane / 8) % 2)));
#pragma unroll
        for (int j = 0; j < kQD / 16; ++j) {
          std::uint32_t bf[4];
          ldmatrix_x4_trans(bf, smem_addr(sK + SwizzledTile<D>::offset(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, wn * (kQD / 8) + 2 * j + lane / 16)));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816<T>(acc[mt][2 * j], a[mt], bf);
            mma16816<T>(acc[mt][2 * j + 1], a[mt], bf + 2);
          }
        }
      }
      const int h = hk * group + g;
      const int m0 = t * kBM;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = m0 + wq2 * 32 + mt * 16 + lane / 4 + 8 * r;
          if (row >= len_q) continue;
          float* dst = p.dq_accum + (q_start + row) * q_stride + static_cast<std::int64_t>(h) * D + wn * kQD + (lane % 4) * 2;
#pragma unroll
          for (int nt = 0; nt < kQD / 8; ++nt)
            atomicAdd(reinterpret_cast<float2*>(dst + nt * 8), make_float2(acc[mt][nt][2 * r], acc[mt][nt][2 * r + 1]));
        }
    }

    // dV += P^T dO, dK += dS^T Q over this warp's keys x D/2 columns.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      std::uint32_t ap[2][4], ads[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int off = SwizzledTile<kBM>::offset(wk * 32 + mt * 16 + lane % 16, 2 * kk + lane / 16);
        ldmatrix_x4(ap[mt], smem_addr(sP + off));
        ldmatrix_x4(ads[mt], smem_addr(sdS + off));
      }
#pragma unroll
      for (int j = 0; j < kDD / 16; ++j) {
        std::uint32_t bo[4], bq[4];
        const int off = SwizzledTile<D>::offset(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, wh * (kDD / 8) + 2 * j + lane / 16);
        ldmatrix_x4_trans(bo, smem_addr(cdO + off));
        ldmatrix_x4_trans(bq, smem_addr(cQ + off));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T>(dv[mt][2 * j], ap[mt], bo);
          mma16816<T>(dv[mt][2 * j + 1], ap[mt], bo + 2);
          mma16816<T>(dk[mt][2 * j], ads[mt], bq);
          mma16816<T>(dk[mt][2 * j + 1], ads[mt], bq + 2);
        }
      }
    }
    buf ^= 1;
    g = g2;
    t = t2;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = n0 + wk * 32 + mt * 16 + lane / 4 + 8 * r;
      if (row >= len_k) continue;
      const std::int64_t base = (k_start + row) * kv_stride + static_cast<std::int64_t>(hk) * D + wh * kDD + (lane % 4) * 2;
#pragma unroll
      for (int dt = 0; dt < kDD / 8; ++dt) {
        store_grad_pair(p.dk, p.grad_dtype_k, p.accumulate, base + dt * 8, dk[mt][dt][2 * r], dk[mt][dt][2 * r + 1]);
        store_grad_pair(p.dv, p.grad_dtype_v, p.accumulate, base + dt * 8, dv[mt][dt][2 * r], dv[mt][dt][2 * r + 1]);
      }
    }
}

template <class T, int D>
void launch_bwd(const FlashParams& p, cudaStream_t stream) {
  const bool pos = p.pos_q || p.pos_k;
  {
    using Tile = BwdKVTile<D>;
    const int smem = (2 * Tile::kBN + 4 * Tile::kBMq) * D * static_cast<int>(sizeof(T)) + 6 * Tile::kBMq * 4 +
                     2 * Tile::kBMq * Tile::kBN * static_cast<int>(sizeof(T));  // + P^T and dS^T of the step
    dim3 grid((p.max_len_k + Tile::kBN - 1) / Tile::kBN, p.hkv, p.batch);
    if (grid.x > 0) {
      auto kernel = p.deterministic ? (pos ? flash_bwd_dkdv_kernel<T, D, true, false> : flash_bwd_dkdv_kernel<T, D, false, false>)
                                    : (pos ? flash_bwd_dkdv_kernel<T, D, true, true> : flash_bwd_dkdv_kernel<T, D, false, true>);
      launch_with_smem(kernel, grid, Tile::kThreads, smem, stream, p);
    }
  }
  {
    using Tile = BwdQTile<D>;
    const int smem = (2 * Tile::kBM + 4 * Tile::kBN) * D * static_cast<int>(sizeof(T));
    dim3 grid((p.max_len_q + Tile::kBM - 1) / Tile::kBM, p.hq, p.batch);
    if (grid.x > 0 && p.deterministic) {
      auto kernel = pos ? flash_bwd_dq_kernel<T, D, true> : flash_bwd_dq_kernel<T, D, false>;
      launch_with_smem(kernel, grid, Tile::kThreads, smem, stream, p);
    }
  }
}

}  // namespace

void flash_backward(const FlashParams& p, cudaStream_t stream) {
  if (p.d != 64 && p.d != 128) throw_unsupported("cuda attention: only head_dim 64 and 128 are built");
  if (p.dtype == DType::bf16) {
    if (p.d == 64) launch_bwd<__nv_bfloat16, 64>(p, stream);
    else launch_bwd<__nv_bfloat16, 128>(p, stream);
  } else {
    if (p.d == 64) launch_bwd<__half, 64>(p, stream);
    else launch_bwd<__half, 128>(p, stream);
  }
}

}  // namespace longattn::kernels::cuda
