// Fused attention backward on Hopper's warpgroup matrix instructions (wgmma), head dim 128, no
// explicit positions (causal by index inside each sequence, or no mask), atomic dQ (the default,
// non-deterministic mode). Other calls take the mma.sync kernels (flash_bwd.cu).
//
// One block of 2 warpgroups (256 threads) per (128-key tile, kv head, sequence); warpgroup w owns
// keys [64 w, 64 w + 64) and their dK and dV (64 x 128 each, fp32, in registers) for the whole
// walk over the 64-query tiles of every query head of its GQA group. Per query tile, in each
// warpgroup:
//   S^T = K Q^T and dP^T = V dO^T       m64n64k16, both operands K-major in shared memory;
//   P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta)     on the 32 fp32 values each thread holds;
//   dV += P^T dO, dK += dS^T Q          m64n128k16, A straight from registers (the accumulator
//                                       layout is the A-fragment layout), B = dO / Q transposed by
//                                       the instruction (as V in the forward's O += P V);
//   dS^T -> shared memory, then dQ (64 queries x 64 of the 128 columns, warpgroup w taking column
//   block w) = dS K over all 128 keys    m64n64k16 with both operands transposed by the instruction,
//   added into the fp32 dQ buffer with atomics.
// Q and dO tiles are double-buffered with cp.async one item ahead. Tiles use the forward's
// 128-byte swizzle (flash_wgmma.cuh).
//
// The default backward on Hopper (LONGATTN_CUDA_BWD_KERNEL=auto). Checked against the reference by
// the cuda-wgmma-bwd GPU test cases and WgmmaBwdTile.*; its speed: bench/results/.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/check.hpp"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_wgmma.cuh"

namespace longattn::kernels::cuda {
namespace {

using wgmma::acc_col;
using wgmma::acc_row;
using wgmma::kD;
using wgmma::sw128_offset;

constexpr int kBN = 128;  // keys per block (2 warpgroups x 64)
constexpr int kBM = 64;   // queries per step
constexpr int kThreads = 256;
// K, V (kBN x kD), Q and dO (2 buffers of kBM x kD), dS^T (kBN x kBM), lse and delta (2 x kBM
// floats each), alignment slack.
constexpr int kSmemBytes = 2 * kBN * kD * 2 + 4 * kBM * kD * 2 + kBN * kBM * 2 + 4 * kBM * 4 + 1024;

template <int ROWS, class T>
__device__ __forceinline__ void load_sw128(T* smem, const T* base, std::int64_t row_stride, int rows_valid, int tid) {
  wgmma::load_sw128<ROWS, kThreads>(smem, base, row_stride, rows_valid, tid);
}

// acc (64 x 64) = A B^T over the head dim: A = this warpgroup's 64 rows of a kBN-row tile (K or V)
// at a_addr, B = the kBM-row tile (Q or dO) at b_addr, both K-major; step kk reads column block
// kk / 4 at byte offset 32 (kk % 4) inside the swizzle rows.
template <class T>
__device__ __forceinline__ void product_over_d(float (&acc)[32], std::uint32_t a_addr, std::uint32_t b_addr) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const std::uint64_t da = wgmma::desc_sw128(a_addr + (kk / 4) * kBN * 128 + (kk % 4) * 32, 16, 1024);
    const std::uint64_t db = wgmma::desc_sw128(b_addr + (kk / 4) * kBM * 128 + (kk % 4) * 32, 16, 1024);
    wgmma::Mma64x64<T>::template ss<0>(acc, da, db, kk > 0 ? 1 : 0);
  }
}

// acc (64 keys x 128) += A (64 keys x kBM queries, registers) times the kBM-row tile at b_addr
// (queries x kD, transposed by the instruction): step kk takes queries 16 kk .. 16 kk + 15.
template <class T>
__device__ __forceinline__ void product_over_queries(float (&acc)[64], const std::uint32_t (&a)[kBM / 16][4], std::uint32_t b_addr) {
#pragma unroll
  for (int kk = 0; kk < kBM / 16; ++kk) {
    const std::uint64_t db = wgmma::desc_sw128(b_addr + kk * 16 * 128, kBM * 128, 1024);
    wgmma::Mma64x128<T>::rs(acc, a[kk], db);
  }
}

// acc (kBM queries x 64 columns) = dS K: A = dS^T stored [kBN keys][kBM queries] at ds_addr (one
// swizzle block: rows of 64 queries), B = column block `cb` of the K tile [kBN keys][kD]; K runs
// over the keys, both operands transposed by the instruction.
template <class T>
__device__ __forceinline__ void product_over_keys(float (&acc)[32], std::uint32_t ds_addr, std::uint32_t k_addr, int cb) {
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    const std::uint64_t da = wgmma::desc_sw128(ds_addr + kk * 16 * 128, kBN * 128, 1024);
    const std::uint64_t db = wgmma::desc_sw128(k_addr + cb * kBN * 128 + kk * 16 * 128, kBN * 128, 1024);
    wgmma::Mma64x64<T>::template ss<1>(acc, da, db, kk > 0 ? 1 : 0);
  }
}

template <class T, bool kCausal>
__global__ void __launch_bounds__(kThreads, 1) flash_bwd_wgmma_kernel(const FlashParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(wgmma::smem_aligned_1024(smem_raw));
  T* sV = sK + kBN * kD;
  T* sQ = sV + kBN * kD;       // two buffers of kBM x kD
  T* sdO = sQ + 2 * kBM * kD;  // two buffers
  T* sdS = sdO + 2 * kBM * kD; // [kBN][kBM] dS^T of the step, one swizzle block
  float* sLse = reinterpret_cast<float*>(sdS + kBN * kBM);  // [2][kBM], log2 domain
  float* sDelta = sLse + 2 * kBM;                           // [2][kBM]

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const KeyTile kt = key_tile<kBN, kD>(p);
  if (kt.empty()) return;
  const std::int64_t q_start = kt.q_start, k_start = kt.k_start, q_stride = kt.q_stride, kv_stride = kt.kv_stride;
  const int len_q = kt.len_q, len_k = kt.len_k, n0 = kt.n0, rows_k = kt.rows_k, hk = kt.hk, group = kt.group;
  const std::int64_t kv_off = kt.kv_offset;

  // Query tiles: all, or (causal) from the one holding query n0 on (earlier ones see none of these keys).
  const int t_end = (len_q + kBM - 1) / kBM;
  const int t_begin = kCausal ? min(t_end, n0 / kBM) : 0;

  auto load_item = [&](int g, int t, int bf) {
    const int h = hk * group + g;
    const int m0 = t * kBM;
    const int rows = min(kBM, len_q - m0);
    const std::int64_t q_off = (q_start + m0) * q_stride + static_cast<std::int64_t>(h) * kD;
    load_sw128<kBM>(sQ + bf * kBM * kD, static_cast<const T*>(p.q) + q_off, q_stride, rows, tid);
    load_sw128<kBM>(sdO + bf * kBM * kD, static_cast<const T*>(p.d_o) + q_off, q_stride, rows, tid);
    if (tid < kBM) {
      const bool in = tid < rows;
      const std::int64_t li = static_cast<std::int64_t>(h) * p.tq + q_start + m0 + tid;
      const float l = in ? p.lse_in[li] : -INFINITY;
      sLse[bf * kBM + tid] = l == -INFINITY ? INFINITY : l * kLog2e;  // a row that saw nothing gets p = 0
      sDelta[bf * kBM + tid] = in ? p.delta[li] : 0.0f;
    }
  };

  load_sw128<kBN>(sK, static_cast<const T*>(p.k) + kv_off, kv_stride, rows_k, tid);
  load_sw128<kBN>(sV, static_cast<const T*>(p.v) + kv_off, kv_stride, rows_k, tid);
  // Items (query head of the group, query tile), heads outer.
  int g = 0, t = t_begin;
  if (t >= t_end) g = group;  // no query tile sees these keys
  if (g < group) load_item(g, t, 0);
  cp_async_commit();

  float dk[64], dv[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) dk[i] = dv[i] = 0.0f;
  const float scale_log2 = p.scale * kLog2e;
  const std::uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV), ds_addr = smem_addr(sdS);
  const std::uint32_t k_rows = k_addr + wg * 64 * 128, v_rows = v_addr + wg * 64 * 128;  // this warpgroup's 64 keys

  int buf = 0;
  while (g < group) {
    cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();  // item (g, t) is in buffer `buf`; every warpgroup is done with the other one and with sdS
    int g2 = g, t2 = t + 1;
    if (t2 >= t_end) {
      ++g2;
      t2 = t_begin;
    }
    if (g2 < group) load_item(g2, t2, buf ^ 1);
    cp_async_commit();
    const std::uint32_t q_addr = smem_addr(sQ + buf * kBM * kD), do_addr = smem_addr(sdO + buf * kBM * kD);
    const float* cL = sLse + buf * kBM;
    const float* cD = sDelta + buf * kBM;
    const int m0 = t * kBM;

    float s[32], dp[32];
    wgmma::fence();
    product_over_d<T>(s, k_rows, q_addr);
    product_over_d<T>(dp, v_rows, do_addr);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_registers(s);
    wgmma::fence_registers(dp);

    // P^T and dS^T in place: element i is key acc_row(i) of this warpgroup, query acc_col(i).
    const bool masked = kCausal && n0 + wg * 64 + 63 > m0;  // some key of this warpgroup is after some query
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int col = acc_col(i, lane);
      const int key = n0 + wg * 64 + acc_row(i, warp, lane);
      const bool visible = !(masked && key > m0 + col);
      const float e = visible ? fast_exp2(fmaf(s[i], scale_log2, -cL[col])) : 0.0f;
      s[i] = e;
      dp[i] = e * (dp[i] - cD[col]) * p.scale;
    }
    std::uint32_t pa[kBM / 16][4], dsa[kBM / 16][4];
    wgmma::pack_a_fragments<T, kBM>(s, pa);
    wgmma::pack_a_fragments<T, kBM>(dp, dsa);

    // dS^T to shared memory ([keys][queries], 32-bit stores of column pairs) for the dQ product.
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      const int key = wg * 64 + acc_row(i, warp, lane), col = acc_col(i, lane);
      *reinterpret_cast<std::uint32_t*>(sdS + sw128_offset<kBN>(key, col / 8) + col % 8) = Pack<T>::pack(dp[i], dp[i + 1]);
    }

    wgmma::fence_registers(dv);
    wgmma::fence_registers(dk);
    wgmma::fence();
    product_over_queries<T>(dv, pa, do_addr);
    product_over_queries<T>(dk, dsa, q_addr);
    wgmma::commit();

    wgmma::fence_proxy_async();
    __syncthreads();  // dS^T of all 128 keys is staged
    float dq[32];
    wgmma::fence();
    product_over_keys<T>(dq, ds_addr, k_addr, wg);
    wgmma::commit();
    wgmma::wait<0>();  // also retires the dV / dK group
    wgmma::fence_registers(dq);
    wgmma::fence_registers(dv);
    wgmma::fence_registers(dk);
    // The dV / dK products read pa / dsa from registers until the wait above: keep them alive
    // (and their registers untouched, e.g. not reused for dq) until here.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      wgmma::fence_registers(pa[kk]);
      wgmma::fence_registers(dsa[kk]);
    }

    const int h = hk * group + g;
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      const int row = m0 + acc_row(i, warp, lane);
      if (row >= len_q) continue;
      float* dst = p.dq_accum + (q_start + row) * q_stride + static_cast<std::int64_t>(h) * kD + wg * 64 + acc_col(i, lane);
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(dq[i], dq[i + 1]));
    }
    buf ^= 1;
    g = g2;
    t = t2;
  }
  cp_async_wait<0>();

  // This warpgroup's 64 keys of dK (times the softmax scale, folded into dS above) and dV.
#pragma unroll
  for (int i = 0; i < 64; i += 2) {
    const int row = n0 + wg * 64 + acc_row(i, warp, lane);
    if (row >= len_k) continue;
    const std::int64_t idx = (k_start + row) * kv_stride + static_cast<std::int64_t>(hk) * kD + acc_col(i, lane);
    store_grad_pair(p.dk, p.grad_dtype_k, p.accumulate, idx, dk[i], dk[i + 1]);
    store_grad_pair(p.dv, p.grad_dtype_v, p.accumulate, idx, dv[i], dv[i + 1]);
  }
#endif
}

// The three product forms of the kernel on one tile, for the GPU tests: k [kBN][kD], q [kBM][kD]
// and ds_t [kBN][kBM] (row-major) through the kernel's loads, descriptors and fragment layouts;
// back come st = k q^T [kBN][kBM], dv = T(st) q [kBN][kD] (A from registers) and dq = ds_t^T k
// [kBM][kD] (both operands transposed), in fp32.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) wgmma_bwd_tile_products_kernel(const T* k, const T* q, const T* ds_t, float* st_out,
                                                                              float* dv_out, float* dq_out) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(wgmma::smem_aligned_1024(smem_raw));
  T* sQ = sK + kBN * kD;
  T* sdS = sQ + kBM * kD;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  load_sw128<kBN>(sK, k, kD, kBN, tid);
  load_sw128<kBM>(sQ, q, kD, kBM, tid);
#pragma unroll
  for (int i = 0; i < kBN * (kBM / 8) / kThreads; ++i) {
    const int idx = i * kThreads + tid, r = idx / (kBM / 8), c = idx % (kBM / 8);
    cp_async16(smem_addr(sdS + sw128_offset<kBN>(r, c)), ds_t + r * kBM + c * 8, true);
  }
  cp_async_commit();
  cp_async_wait<0>();
  wgmma::fence_proxy_async();
  __syncthreads();
  const std::uint32_t k_addr = smem_addr(sK), q_addr = smem_addr(sQ), ds_addr = smem_addr(sdS);

  float st[32];
  wgmma::fence();
  product_over_d<T>(st, k_addr + wg * 64 * 128, q_addr);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_registers(st);
#pragma unroll
  for (int i = 0; i < 32; ++i) st_out[(wg * 64 + acc_row(i, warp, lane)) * kBM + acc_col(i, lane)] = st[i];

  std::uint32_t pa[kBM / 16][4];
  wgmma::pack_a_fragments<T, kBM>(st, pa);
  float dv[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) dv[i] = 0.0f;
  wgmma::fence_registers(dv);
  wgmma::fence();
  product_over_queries<T>(dv, pa, q_addr);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_registers(dv);
#pragma unroll
  for (int i = 0; i < 64; ++i) dv_out[(wg * 64 + acc_row(i, warp, lane)) * kD + acc_col(i, lane)] = dv[i];

  float dq[32];
  wgmma::fence();
  product_over_keys<T>(dq, ds_addr, k_addr, wg);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_registers(dq);
#pragma unroll
  for (int i = 0; i < 32; ++i) dq_out[acc_row(i, warp, lane) * kD + wg * 64 + acc_col(i, lane)] = dq[i];
#endif
}

template <class T>
void launch(const FlashParams& p, cudaStream_t stream) {
  dim3 grid((p.max_len_k + kBN - 1) / kBN, p.hkv, p.batch);
  if (grid.x == 0) return;
  auto kernel = p.causal ? flash_bwd_wgmma_kernel<T, true> : flash_bwd_wgmma_kernel<T, false>;
  launch_with_smem(kernel, grid, kThreads, kSmemBytes, stream, p);
}

}  // namespace

bool flash_backward_wgmma_supports(const FlashParams& p) {
  return p.d == kD && !p.pos_q && !p.pos_k && !p.deterministic && p.dq_accum != nullptr &&
         (p.dtype == DType::bf16 || p.dtype == DType::f16);
}

void wgmma_bwd_tile_products(const void* k, const void* q, const void* ds_t, float* st, float* dv, float* dq, DType dtype,
                             cudaStream_t stream) {
  constexpr int smem = (kBN + kBM) * kD * 2 + kBN * kBM * 2 + 1024;
  auto run = [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    launch_with_smem(wgmma_bwd_tile_products_kernel<T>, dim3(1), kThreads, smem, stream, static_cast<const T*>(k),
                     static_cast<const T*>(q), static_cast<const T*>(ds_t), st, dv, dq);
  };
  if (dtype == DType::bf16) run(static_cast<__nv_bfloat16*>(nullptr));
  else if (dtype == DType::f16) run(static_cast<__half*>(nullptr));
  else throw_unsupported("wgmma_bwd_tile_products: bf16 or fp16 only");
}

void flash_backward_wgmma(const FlashParams& p, cudaStream_t stream) {
  if (!flash_backward_wgmma_supports(p))
    throw_unsupported("cuda wgmma backward: only head dim 128, bf16/fp16, without explicit positions, atomic dQ");
  if (p.dtype == DType::bf16) {
    launch<__nv_bfloat16>(p, stream);
  } else {
    launch<__half>(p, stream);
  }
}

}  // namespace longattn::kernels::cuda
