// Fused attention forward on Hopper's warpgroup matrix instructions (wgmma), head dim 128, no
// explicit positions (causal by index inside each sequence, or no mask): the shapes of long
// single-sequence prefill and of causal ring steps cut into plain blocks. Other calls take the
// mma.sync kernel (flash_fwd.cu).
//
// One block of 2 warpgroups (256 threads) per (128-query tile, head, sequence); each warpgroup owns
// 64 query rows. Per 128-key tile: S = Q K^T as 8 wgmma m64n128k16 with both operands in shared
// memory, the online softmax on the 64 fp32 scores each thread holds, then O += P V as 8 wgmma with
// P straight from registers (the accumulator layout of S is the A-fragment layout of the product)
// and V transposed by the instruction. K and V tiles arrive by cp.async two tiles ahead, into three
// stages guarded by full/empty barriers, and each warpgroup computes the next tile's scores while
// its P V product runs (the default "overlap" schedule below). Every tile is
// stored with the 128-byte swizzle wgmma reads (flash_wgmma.cuh).
//
// Checked and timed on an H100 (580 TFLOP/s at 32k causal, 1.77x the mma.sync kernel): the cuda
// backend's forward on Hopper for the shapes it takes (LONGATTN_CUDA_FWD_KERNEL=auto).
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_wgmma.cuh"

namespace longattn::kernels::cuda {
namespace {

using wgmma::kD;                // head dim 128
constexpr int kBM = 128;       // query rows per block (2 warpgroups x 64)
constexpr int kBN = 128;       // keys per tile
constexpr int kThreads = 256;
constexpr int kTileBytes = kBN * kD * 2;  // one K or V tile (16-bit elements)

// How the two warpgroups share the K/V buffers (LONGATTN_CUDA_WGMMA_FWD_SCHEDULE):
//   lockstep: two stages, a block-wide barrier per tile: both warpgroups run their softmax at the
//             same time, and the tensor cores wait meanwhile;
//   pipeline: three stages with full/empty mbarriers: a warpgroup waits only for the tile it needs
//             and frees a stage on its own, so the two may drift up to a tile apart and one's
//             softmax overlaps the other's products (546 vs 448 TFLOP/s at 32k causal on an
//             H100);
//   overlap:  pipeline, and within each warpgroup S of tile n + 1 is computed while O += P V of
//             tile n is, so its softmax overlaps its own second product too (the default: 580).
// (A "pingpong" schedule, warpgroups taking turns on Q K^T through named barriers, measured 538
// against pipeline's 547 and was removed.)
constexpr int kLockstep = static_cast<int>(WgmmaSchedule::lockstep), kPipeline = static_cast<int>(WgmmaSchedule::pipeline),
              kOverlap = static_cast<int>(WgmmaSchedule::overlap);
constexpr int stages_of(int schedule) { return schedule == kLockstep ? 2 : 3; }
constexpr int smem_bytes_of(int schedule) {  // Q, stages x (K, V), barriers, alignment slack
  return kBM * kD * 2 + 2 * stages_of(schedule) * kTileBytes + 2 * stages_of(schedule) * 8 + 1024;
}

using wgmma::acc_col;
using wgmma::acc_row;
using wgmma::smem_aligned_1024;
using wgmma::sw128_offset;
template <int ROWS, class T>
__device__ __forceinline__ void load_sw128(T* smem, const T* base, std::int64_t row_stride, int rows_valid, int tid) {
  wgmma::load_sw128<ROWS, kThreads>(smem, base, row_stride, rows_valid, tid);
}

// s = Q K^T for this warpgroup's 64 query rows (q_addr: their first row in column block 0 of the
// Q tile of kBM rows) against the kBN keys at k_addr: 8 steps of 16 along the head dim; step kk
// reads column block kk / 4 at byte offset 32 (kk % 4) inside the 128-byte swizzle rows (the
// hardware applies the XOR).
template <class T>
__device__ __forceinline__ void qk_issue(float (&s)[64], std::uint32_t q_addr, std::uint32_t k_addr) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const std::uint64_t da = wgmma::desc_sw128(q_addr + (kk / 4) * kBM * 128 + (kk % 4) * 32, 16, 1024);
    const std::uint64_t db = wgmma::desc_sw128(k_addr + (kk / 4) * kBN * 128 + (kk % 4) * 32, 16, 1024);
    wgmma::Mma64x128<T>::ss(s, da, db, kk > 0 ? 1 : 0);
  }
  wgmma::commit();
}
template <class T>
__device__ __forceinline__ void qk_product(float (&s)[64], std::uint32_t q_addr, std::uint32_t k_addr) {
  wgmma::fence();
  qk_issue<T>(s, q_addr, k_addr);
  wgmma::wait<0>();
  wgmma::fence_registers(s);
}

// Probabilities (in the accumulator layout) as the A fragments of the second product.
template <class T>
__device__ __forceinline__ void pack_probabilities(const float (&s)[64], std::uint32_t (&pa)[kBN / 16][4]) {
  wgmma::pack_a_fragments<T, kBN>(s, pa);
}

// o += P V with V at v_addr (kBN keys x kD): step kk takes keys 16 kk..16 kk + 15, two 8-row
// groups (stride 1024 bytes); the 128 output columns are V's two column blocks (leading offset
// kBN * 128 bytes), read transposed by the instruction.
template <class T>
__device__ __forceinline__ void pv_issue(float (&o)[64], const std::uint32_t (&pa)[kBN / 16][4], std::uint32_t v_addr) {
  wgmma::fence_registers(o);
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    const std::uint64_t db = wgmma::desc_sw128(v_addr + kk * 16 * 128, kBN * 128, 1024);
    wgmma::Mma64x128<T>::rs(o, pa[kk], db);
  }
  wgmma::commit();
}
template <class T>
__device__ __forceinline__ void pv_product(float (&o)[64], const std::uint32_t (&pa)[kBN / 16][4], std::uint32_t v_addr) {
  pv_issue<T>(o, pa, v_addr);
  wgmma::wait<0>();
  wgmma::fence_registers(o);
}

template <class T, bool kCausal, int kSchedule>
__global__ void __launch_bounds__(kThreads, 1) flash_fwd_wgmma_kernel(const FlashParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kStages = stages_of(kSchedule);
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_aligned_1024(smem_raw));
  T* sK0 = sQ + kBM * kD;
  T* sV0 = sK0 + kStages * kBN * kD;  // stages: sK0 + st * kBN * kD, sV0 + st * kBN * kD
  // Pipelined schedules: full[st] at bars, empty[st] at bars + 8 kStages (bytes).
  const std::uint32_t bars = smem_addr(sV0 + kStages * kBN * kD);

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const QueryTile qt = query_tile<kBM, kD>(p);  // longest causal rows first
  if (qt.empty()) return;
  const std::int64_t q_start = qt.q_start, q_stride = qt.q_stride, kv_stride = qt.kv_stride;
  const int len_q = qt.len_q, len_k = qt.len_k, m0 = qt.m0, rows_q = qt.rows_q, h = qt.h;
  const T* qg = static_cast<const T*>(p.q) + qt.q_offset;
  const T* kg = static_cast<const T*>(p.k) + qt.kv_offset;
  const T* vg = static_cast<const T*>(p.v) + qt.kv_offset;

  // Key tiles to visit: all, or (causal) those starting at or before the block's last row.
  int n_end = (len_k + kBN - 1) / kBN;
  if (kCausal) n_end = min(n_end, (m0 + rows_q - 1) / kBN + 1);

  auto load_kv = [&](int n) {
    const int st = n % kStages;
    const std::int64_t off = static_cast<std::int64_t>(n) * kBN * kv_stride;
    load_sw128<kBN>(sK0 + st * kBN * kD, kg + off, kv_stride, len_k - n * kBN, tid);
    load_sw128<kBN>(sV0 + st * kBN * kD, vg + off, kv_stride, len_k - n * kBN, tid);
  };
  if constexpr (kSchedule == kLockstep) {
    // Groups in flight at the top of iteration n: tile n's and tile n+1's (possibly empty), so
    // waiting until one group is left means tile n has landed.
    load_sw128<kBM>(sQ, qg, q_stride, rows_q, tid);
    if (n_end > 0) load_kv(0);
    cp_async_commit();
    if (n_end > 1) load_kv(1);
    cp_async_commit();
  } else {
    if (tid == 0) {
      for (int st = 0; st < 2 * kStages; ++st) wgmma::mbarrier_init(bars + 8 * st, kThreads);
      wgmma::mbarrier_init_fence();
    }
    __syncthreads();  // barriers initialized before anyone arrives
    // Q's copies count toward tile 0's barrier (an arrive covers all of the thread's earlier copies).
    load_sw128<kBM>(sQ, qg, q_stride, rows_q, tid);
    for (int n = 0; n < min(n_end, 2); ++n) {
      load_kv(n);
      wgmma::cp_async_arrive(bars + 8 * n);
    }
  }

  // This thread's rows (accumulator layout of m64nN): r_loc + 8 * half, r_loc = 16 warp + lane / 4
  // inside its warpgroup's 64; its columns in each 8-column group: 2 * (lane % 4) + {0, 1}.
  const int r_loc = wg * 64 + warp * 16 + lane / 4;
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const float scale_log2 = p.scale * kLog2e;

  const std::uint32_t q_addr = smem_addr(sQ) + wg * 64 * 128;  // this warpgroup's 64 rows, column block 0
  auto k_stage = [&](int n) { return smem_addr(sK0 + (n % kStages) * kBN * kD); };
  auto v_stage = [&](int n) { return smem_addr(sV0 + (n % kStages) * kBN * kD); };

  // Mask keys past the sequence (tail tile) and, on tiles that reach past this thread's first row,
  // keys after the row (causal by index).
  auto mask = [&](float(&s)[64], int n) {
    const int kn0 = n * kBN;
    if (kn0 + kBN > len_k || (kCausal && kn0 + kBN - 1 > m0 + r_loc)) {
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = kn0 + 8 * i + 2 * (lane % 4) + c;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = m0 + r_loc + 8 * half;
            if (key >= len_k || (kCausal && key > row)) s[4 * i + 2 * half + c] = -INFINITY;
          }
        }
    }
  };
  // Online softmax per row (a row's 128 scores sit in the 4 lanes of a quad): scores become
  // probabilities in place; alpha is the factor for what o holds so far. row_max holds the raw
  // maximum; exponents are scale * log2(e) * (s - max), one FFMA per score.
  auto softmax = [&](float(&s)[64], float(&alpha)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = row_max[half];
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * half], s[4 * i + 2 * half + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.0f : mx * scale_log2;
      alpha[half] = fast_exp2(row_max[half] * scale_log2 - m_scaled);
      row_max[half] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) {
        s[4 * i + 2 * half] = fast_exp2(fmaf(s[4 * i + 2 * half], scale_log2, -m_scaled));
        s[4 * i + 2 * half + 1] = fast_exp2(fmaf(s[4 * i + 2 * half + 1], scale_log2, -m_scaled));
        sum += s[4 * i + 2 * half] + s[4 * i + 2 * half + 1];
      }
      row_sum[half] = row_sum[half] * alpha[half] + sum;
    }
  };
  auto rescale = [&](const float(&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      o[4 * i] *= alpha[0];
      o[4 * i + 1] *= alpha[0];
      o[4 * i + 2] *= alpha[1];
      o[4 * i + 3] *= alpha[1];
    }
  };
  // Pipelined schedules: this thread is done with tile n (it arrives on the stage's empty barrier);
  // tile n goes where tile n - 3 was, once both warpgroups are done with that one (the other may
  // be behind), and its copies arrive on the stage's full barrier.
  auto release = [&](int n) { wgmma::mbarrier_arrive(bars + 8 * (kStages + n % kStages)); };
  auto prefetch = [&](int n) {
    if (n >= n_end) return;
    const int st = n % kStages;
    if (n >= kStages) wgmma::mbarrier_wait(bars + 8 * (kStages + st), ((n - kStages) / kStages) & 1);
    load_kv(n);
    wgmma::cp_async_arrive(bars + 8 * st);
  };

  if constexpr (kSchedule == kOverlap) {
    // Within each warpgroup, S of tile n + 1 and O += P V of tile n are in flight together, and
    // the softmax of tile n + 1 runs while the second product does; o is rescaled after it lands.
    float s[64], alpha[2];
    std::uint32_t pa[kBN / 16][4];
    if (n_end > 0) {
      wgmma::mbarrier_wait(bars, 0);  // tile 0 (and Q) landed
      wgmma::fence_proxy_async();
      qk_product<T>(s, q_addr, k_stage(0));
      mask(s, 0);
      softmax(s, alpha);  // o is still zero: nothing to rescale
      pack_probabilities<T>(s, pa);
    }
    // Every tile but the last: both products in flight (the loop body has no branch around them,
    // so the compiler can tell which group each wait retires).
    for (int n = 0; n + 1 < n_end; ++n) {
      wgmma::mbarrier_wait(bars + 8 * ((n + 1) % kStages), ((n + 1) / kStages) & 1);
      wgmma::fence_proxy_async();
      wgmma::fence();
      qk_issue<T>(s, q_addr, k_stage(n + 1));
      pv_issue<T>(o, pa, v_stage(n));
      prefetch(n + 2);  // while both products run: tile n + 2 has the whole iteration to land
      wgmma::wait<1>();  // S of tile n + 1 (committed first) has landed
      wgmma::fence_registers(s);
      mask(s, n + 1);
      softmax(s, alpha);
      wgmma::wait<0>();
      wgmma::fence_registers(o);
      // The second product read pa from registers until the wait: keep them untouched until here.
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) wgmma::fence_registers(pa[kk]);
      release(n);
      rescale(alpha);
      pack_probabilities<T>(s, pa);
    }
    if (n_end > 0) {  // the last tile's second product
      pv_product<T>(o, pa, v_stage(n_end - 1));
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) wgmma::fence_registers(pa[kk]);
      release(n_end - 1);
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
  } else {
    for (int n = 0; n < n_end; ++n) {
      if constexpr (kSchedule == kLockstep) {
        cp_async_wait<1>();
        wgmma::fence_proxy_async();
        __syncthreads();  // tile n (and Q) visible to every warpgroup
      } else {
        wgmma::mbarrier_wait(bars + 8 * (n % kStages), (n / kStages) & 1);  // tile n (and Q) landed
        wgmma::fence_proxy_async();
      }
      float s[64], alpha[2];
      qk_product<T>(s, q_addr, k_stage(n));
      mask(s, n);
      softmax(s, alpha);
      rescale(alpha);
      std::uint32_t pa[kBN / 16][4];
      pack_probabilities<T>(s, pa);
      pv_product<T>(o, pa, v_stage(n));

      if constexpr (kSchedule == kLockstep) {
        __syncthreads();  // both warpgroups are done with tile n's stage
        if (n + 2 < n_end) load_kv(n + 2);
        cp_async_commit();
      } else {
        release(n);
        prefetch(n + 2);
      }
    }
    if constexpr (kSchedule == kLockstep) cp_async_wait<0>();
    else asm volatile("cp.async.wait_all;\n" ::: "memory");
  }

  // Epilogue: finish the row sums across the quad, normalize, write o and lse.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int row = m0 + r_loc + 8 * half;
    if (row >= len_q) continue;
    const std::int64_t tok = q_start + row;
    const std::int64_t obase = tok * q_stride + static_cast<std::int64_t>(h) * kD + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < 16; ++i)
      store_pair<T>(p.o, p.o_dtype, obase + 8 * i, o[4 * i + 2 * half] * inv, o[4 * i + 2 * half + 1] * inv);
    if (lane % 4 == 0)
      p.lse[static_cast<std::int64_t>(h) * p.tq + tok] = sum > 0.0f ? row_max[half] * p.scale + log2f(sum) * kLn2 : -INFINITY;
  }
#endif
}

// The two products of one tile on their own, for the GPU tests: q [kBM][kD], k and v [kBN][kD]
// (row-major) go through the kernel's loads, descriptors and fragment layouts; s = q k^T and
// o = bf16/fp16(s) v come back [kBM][kBN] and [kBM][kD] in fp32. When the attention test fails,
// this tells whether the first product, the second, or the softmax around them is wrong.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) wgmma_tile_products_kernel(const T* q, const T* k, const T* v, float* s_out, float* o_out) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_aligned_1024(smem_raw));
  T* sK = sQ + kBM * kD;
  T* sV = sK + kBN * kD;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  load_sw128<kBM>(sQ, q, kD, kBM, tid);
  load_sw128<kBN>(sK, k, kD, kBN, tid);
  load_sw128<kBN>(sV, v, kD, kBN, tid);
  cp_async_commit();
  cp_async_wait<0>();
  wgmma::fence_proxy_async();
  __syncthreads();
  float s[64];
  qk_product<T>(s, smem_addr(sQ) + wg * 64 * 128, smem_addr(sK));
#pragma unroll
  for (int i = 0; i < 64; ++i) s_out[(wg * 64 + acc_row(i, warp, lane)) * kBN + acc_col(i, lane)] = s[i];
  std::uint32_t pa[kBN / 16][4];
  pack_probabilities<T>(s, pa);
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  pv_product<T>(o, pa, smem_addr(sV));
#pragma unroll
  for (int i = 0; i < 64; ++i) o_out[(wg * 64 + acc_row(i, warp, lane)) * kD + acc_col(i, lane)] = o[i];
#endif
}

template <class T, int kSchedule>
void launch(const FlashParams& p, cudaStream_t stream) {
  dim3 grid((p.max_len_q + kBM - 1) / kBM, p.hq, p.batch);
  if (grid.x == 0) return;
  auto kernel = p.causal ? flash_fwd_wgmma_kernel<T, true, kSchedule> : flash_fwd_wgmma_kernel<T, false, kSchedule>;
  launch_with_smem(kernel, grid, kThreads, smem_bytes_of(kSchedule), stream, p);
}
template <class T>
void launch(const FlashParams& p, cudaStream_t stream) {
  switch (p.wgmma_schedule) {
    case WgmmaSchedule::lockstep: launch<T, kLockstep>(p, stream); break;
    case WgmmaSchedule::pipeline: launch<T, kPipeline>(p, stream); break;
    case WgmmaSchedule::overlap: launch<T, kOverlap>(p, stream); break;
  }
}

}  // namespace

bool flash_forward_wgmma_supports(const FlashParams& p) {
  return p.d == kD && !p.pos_q && !p.pos_k && (p.dtype == DType::bf16 || p.dtype == DType::f16);
}

void wgmma_tile_products(const void* q, const void* k, const void* v, float* s, float* o, DType dtype, cudaStream_t stream) {
  constexpr int smem = (kBM + 2 * kBN) * kD * 2 + 1024;
  if (dtype == DType::bf16) {
    launch_with_smem(wgmma_tile_products_kernel<__nv_bfloat16>, dim3(1), kThreads, smem, stream, static_cast<const __nv_bfloat16*>(q),
                     static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v), s, o);
  } else if (dtype == DType::f16) {
    launch_with_smem(wgmma_tile_products_kernel<__half>, dim3(1), kThreads, smem, stream, static_cast<const __half*>(q),
                     static_cast<const __half*>(k), static_cast<const __half*>(v), s, o);
  } else {
    throw_unsupported("wgmma_tile_products: bf16 or fp16 only");
  }
}

void flash_forward_wgmma(const FlashParams& p, cudaStream_t stream) {
  if (!flash_forward_wgmma_supports(p))
    throw_unsupported("cuda wgmma forward: only head dim 128, bf16/fp16, without explicit positions");
  if (p.dtype == DType::bf16) {
    launch<__nv_bfloat16>(p, stream);
  } else {
    launch<__half>(p, stream);
  }
}

}  // namespace longattn::kernels::cuda
