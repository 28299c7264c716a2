// Fused attention forward on Hopper's warpgroup matrix instructions (wgmma), head dim 128, no
// explicit positions (causal by index inside each sequence, or no mask): the shapes of long
// single-sequence prefill and of causal ring steps cut into plain blocks. Other calls take the
// mma.sync kernel (flash_fwd.cu).
//
// One block of 2 warpgroups (256 threads) per (128-query tile, head, sequence); each warpgroup owns
// 64 query rows. Per 128-key tile: S = Q K^T as 8 wgmma m64n128k16 with both operands in shared
// memory, the online softmax on the 64 fp32 scores each thread holds, then O += P V as 8 wgmma with
// P straight from registers (the accumulator layout of S is the A-fragment layout of the product)
// and V transposed by the instruction (flash_fwd_wgmma_products.cuh). K and V tiles arrive by
// cp.async two tiles ahead into three stages, each guarded by a "full" and an "empty" barrier, so a
// warpgroup waits only for the tile it needs and the two warpgroups drift apart: one's softmax
// runs while the other's products do. Every tile is stored with the 128-byte swizzle wgmma reads
// (flash_wgmma.cuh).
//
// The pieces: SharedStorage (the block's shared memory), KvStages (the K/V stages and their
// barriers), one mainloop function per warpgroup schedule, and the epilogue shared with the
// mma.sync kernel (flash_epilogue.cuh). The cuda backend uses this kernel on Hopper for the shapes
// it takes (LONGATTN_CUDA_FWD_KERNEL=auto); bench/results/ holds its measurements.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common/check.hpp"
#include "kernels/cuda/flash_accumulators.cuh"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_dispatch.hpp"
#include "kernels/cuda/flash_epilogue.cuh"
#include "kernels/cuda/flash_fwd_wgmma_products.cuh"
#include "kernels/cuda/flash_softmax.cuh"
#include "kernels/cuda/launch.cuh"

namespace longattn::kernels::cuda {
namespace {

using namespace wgmma_fwd;

// Three stages: tile n + 2 is copied while tile n + 1 waits and tile n is computed on, so a copy
// has a whole iteration to land, and a warpgroup may be one tile ahead of the other.
constexpr int kStages = 3;

// The block's shared memory. The base is rounded up to 1024 bytes (the swizzle's unit) and every
// tile is a multiple of 1024 bytes, so each tile starts 1024-aligned.
template <class T>
struct SharedStorage {
  T q[kBM * kD];
  T k[kStages][kBN * kD];
  T v[kStages][kBN * kD];
  std::uint64_t full[kStages];   // every thread's copies of the stage's tile have landed
  std::uint64_t empty[kStages];  // every thread is done reading the stage's tile
};
static_assert(offsetof(SharedStorage<__half>, k) % 1024 == 0 && offsetof(SharedStorage<__half>, v) % 1024 == 0 &&
                  sizeof(SharedStorage<__half>::k[0]) % 1024 == 0,
              "wgmma reads 128-byte-swizzled tiles that start at 1024-byte boundaries");
constexpr int kSmemBytes = sizeof(SharedStorage<__half>) + 1024;  // + the slack for rounding the base up
static_assert(kSmemBytes <= 227 * 1024, "more shared memory than a Hopper block may opt in to");

// The K/V stages of one block: tile n lives in stage n % kStages. Every thread copies its part of
// a tile and arrives on the stage's full barrier when its copies land; every thread arrives on the
// stage's empty barrier when done with it; the tile kStages later may be copied into the stage
// once its empty barrier has completed (the other warpgroup may still be reading it).
template <class T>
struct KvStages {
  SharedStorage<T>& smem;
  const T* k;  // the kv head's first key row
  const T* v;
  std::int64_t stride;  // elements between tokens
  int len_k, n_end, tid;

  // Tile n's stage, addressed as stage 0 plus whole tiles rather than as k[n % kStages]: nvcc
  // compiles the two forms differently (with the array index it moves the stage address of the
  // prefetch to uniform registers and allocates the mainloop's registers anew), and this form keeps
  // the instruction stream the overlap schedule was tuned and measured on (the SASS comparison is in
  // bench/results/house_ptxas_2026-12-05.md).
  __device__ __forceinline__ T* k_tile(int n) const { return smem.k[0] + (n % kStages) * kBN * kD; }
  __device__ __forceinline__ T* v_tile(int n) const { return smem.v[0] + (n % kStages) * kBN * kD; }

  __device__ __forceinline__ void load(int n) const {
    const std::int64_t off = static_cast<std::int64_t>(n) * kBN * stride;
    wgmma::load_sw128<kBN, kThreads>(k_tile(n), k + off, stride, len_k - n * kBN, tid);
    wgmma::load_sw128<kBN, kThreads>(v_tile(n), v + off, stride, len_k - n * kBN, tid);
  }
  // Copies tile n (when it exists) into its stage once the stage is free, then arrives on its full
  // barrier when they land.
  __device__ __forceinline__ void prefetch(int n) const {
    if (n >= n_end) return;
    const int st = n % kStages;
    if (n >= kStages) wgmma::mbarrier_wait(smem_addr(&smem.empty[st]), ((n - kStages) / kStages) & 1);
    load(n);
    wgmma::cp_async_arrive(smem_addr(&smem.full[st]));
  }
  // Waits until tile n has landed and is visible to the tensor cores.
  __device__ __forceinline__ void wait_full(int n) const {
    wgmma::mbarrier_wait(smem_addr(&smem.full[n % kStages]), (n / kStages) & 1);
    wgmma::fence_proxy_async();
  }
  __device__ __forceinline__ void release(int n) const { wgmma::mbarrier_arrive(smem_addr(&smem.empty[n % kStages])); }
  __device__ __forceinline__ std::uint32_t k_addr(int n) const { return smem_addr(k_tile(n)); }
  __device__ __forceinline__ std::uint32_t v_addr(int n) const { return smem_addr(v_tile(n)); }
};

// What a warpgroup's mainloop works on: its rows' first Q address, where its thread's rows are,
// the K/V stages, its output accumulator and the softmax state of its rows.
template <class T>
struct WarpgroupTile {
  const KvStages<T>& kv;
  std::uint32_t q_addr;  // this warpgroup's 64 rows of Q, column block 0
  int first_row;         // this thread's first row in the block's query tile (then + 8)
  int m0, lane;
};

// Mask keys past the sequence (tail tile) and, on tiles that reach past this thread's first row,
// keys after the row (causal by index).
template <bool kCausal, class T>
__device__ __forceinline__ void mask_scores(float (&s)[64], int n, const WarpgroupTile<T>& wt) {
  WgmmaRows<kBN> scores{s};
  const int kn0 = n * kBN, len_k = wt.kv.len_k;
  if (kn0 + kBN > len_k || (kCausal && kn0 + kBN - 1 > wt.m0 + wt.first_row)) {
#pragma unroll
    for (int g = 0; g < kBN / 8; ++g)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = kn0 + 8 * g + 2 * (wt.lane % 4) + c;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = wt.m0 + wt.first_row + 8 * half;
          if (key >= len_k || (kCausal && key > row)) scores(half, g, c) = -INFINITY;
        }
      }
  }
}

// The "pipeline" schedule: per tile, S = Q K^T, softmax, O += P V, one after the other. The
// warpgroups overlap each other's softmax with their products, but within a warpgroup the tensor
// cores wait during the softmax. It needs fewer registers than "overlap" (one score accumulator in
// flight instead of two), which keeps it the fallback when a change to the kernel makes "overlap"
// spill.
template <class T, bool kCausal>
__device__ __forceinline__ void pipeline_mainloop(const WarpgroupTile<T>& wt, float (&o)[64], OnlineSoftmax<2>& softmax) {
  const KvStages<T>& kv = wt.kv;
  for (int n = 0; n < kv.n_end; ++n) {
    kv.wait_full(n);  // tile n (and, for tile 0, Q) landed
    float s[64], alpha[2];
    qk_product<T>(s, wt.q_addr, kv.k_addr(n));
    mask_scores<kCausal>(s, n, wt);
    softmax.update(WgmmaRows<kBN>{s}, alpha);
    softmax.rescale(WgmmaRows<kD>{o}, alpha);
    std::uint32_t pa[kBN / 16][4];
    pack_probabilities<T>(s, pa);
    pv_product<T>(o, pa, kv.v_addr(n));
    kv.release(n);
    kv.prefetch(n + 2);
  }
}

// The "overlap" schedule (the default): within each warpgroup, S of tile n + 1 and O += P V of
// tile n are in flight together, and the softmax of tile n + 1 runs while the second product does;
// o is rescaled once that product has landed.
template <class T, bool kCausal>
__device__ __forceinline__ void overlap_mainloop(const WarpgroupTile<T>& wt, float (&o)[64], OnlineSoftmax<2>& softmax) {
  const KvStages<T>& kv = wt.kv;
  float s[64], alpha[2];
  std::uint32_t pa[kBN / 16][4];
  if (kv.n_end > 0) {
    kv.wait_full(0);  // tile 0 (and Q) landed
    qk_product<T>(s, wt.q_addr, kv.k_addr(0));
    mask_scores<kCausal>(s, 0, wt);
    softmax.update(WgmmaRows<kBN>{s}, alpha);  // o is still zero: nothing to rescale
    pack_probabilities<T>(s, pa);
  }
  // Every tile but the last: both products in flight. The last is peeled off so the loop body has
  // no branch around the products: with one, the compiler cannot tell which group each wait
  // retires and serializes them.
  for (int n = 0; n + 1 < kv.n_end; ++n) {
    kv.wait_full(n + 1);
    wgmma::fence();
    qk_issue<T>(s, wt.q_addr, kv.k_addr(n + 1));
    pv_issue<T>(o, pa, kv.v_addr(n));
    kv.prefetch(n + 2);  // while both products run: tile n + 2 has the whole iteration to land
    wgmma::wait<1>();    // S of tile n + 1 (committed first) has landed
    wgmma::fence_registers(s);
    mask_scores<kCausal>(s, n + 1, wt);
    softmax.update(WgmmaRows<kBN>{s}, alpha);
    wgmma::wait<0>();
    wgmma::fence_registers(o);
    // The second product read pa from registers until the wait: keep them untouched until here.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) wgmma::fence_registers(pa[kk]);
    kv.release(n);
    softmax.rescale(WgmmaRows<kD>{o}, alpha);
    pack_probabilities<T>(s, pa);
  }
  if (kv.n_end > 0) {  // the last tile's second product
    pv_product<T>(o, pa, kv.v_addr(kv.n_end - 1));
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) wgmma::fence_registers(pa[kk]);
    kv.release(kv.n_end - 1);
  }
}

template <class T, bool kCausal, WgmmaSchedule kSchedule>
__global__ void __launch_bounds__(kThreads, 1) flash_fwd_wgmma_kernel(const FlashParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<SharedStorage<T>*>(wgmma::smem_aligned_1024(smem_raw));

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const QueryTile qt = query_tile<kBM, kD>(p);  // longest causal rows first
  if (qt.empty()) return;

  // Key tiles to visit: all, or (causal) those starting at or before the block's last row.
  int n_end = (qt.len_k + kBN - 1) / kBN;
  if (kCausal) n_end = min(n_end, (qt.m0 + qt.rows_q - 1) / kBN + 1);
  const KvStages<T> kv{smem, static_cast<const T*>(p.k) + qt.kv_offset, static_cast<const T*>(p.v) + qt.kv_offset,
                       qt.kv_stride, qt.len_k, n_end, tid};

  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) wgmma::mbarrier_init(smem_addr(&smem.full[st]), kThreads);
    for (int st = 0; st < kStages; ++st) wgmma::mbarrier_init(smem_addr(&smem.empty[st]), kThreads);
    wgmma::mbarrier_init_fence();
  }
  __syncthreads();  // barriers initialized before anyone arrives
  // Q's copies count toward tile 0's full barrier (an arrive covers all of the thread's earlier copies).
  wgmma::load_sw128<kBM, kThreads>(smem.q, static_cast<const T*>(p.q) + qt.q_offset, qt.q_stride, qt.rows_q, tid);
  for (int n = 0; n < min(n_end, 2); ++n) {
    kv.load(n);
    wgmma::cp_async_arrive(smem_addr(&smem.full[n]));
  }

  // This thread's rows (accumulator layout of m64nN): 16 warp + lane / 4 inside its warpgroup's 64,
  // and 8 below.
  const WarpgroupTile<T> wt{kv, smem_addr(smem.q) + wg * 64 * 128, wg * 64 + warp * 16 + lane / 4, qt.m0, lane};
  float o[64];
  clear(WgmmaRows<kD>{o});
  OnlineSoftmax<2> softmax(p.scale);

  if constexpr (kSchedule == WgmmaSchedule::overlap) overlap_mainloop<T, kCausal>(wt, o, softmax);
  else pipeline_mainloop<T, kCausal>(wt, o, softmax);
  asm volatile("cp.async.wait_all;\n" ::: "memory");

  store_output<T>(p, qt, wt.first_row, lane, WgmmaRows<kD>{o}, softmax);
#endif
}

template <class T, WgmmaSchedule kSchedule>
void launch(const FlashParams& p, cudaStream_t stream) {
  dim3 grid((p.max_len_q + kBM - 1) / kBM, p.hq, p.batch);
  if (grid.x == 0) return;
  auto kernel = p.causal ? flash_fwd_wgmma_kernel<T, true, kSchedule> : flash_fwd_wgmma_kernel<T, false, kSchedule>;
  launch_with_smem(kernel, grid, kThreads, kSmemBytes, stream, p);
}
template <class T>
void launch(const FlashParams& p, cudaStream_t stream) {
  switch (p.wgmma_schedule) {
    case WgmmaSchedule::pipeline: launch<T, WgmmaSchedule::pipeline>(p, stream); break;
    case WgmmaSchedule::overlap: launch<T, WgmmaSchedule::overlap>(p, stream); break;
  }
}

}  // namespace

bool flash_forward_wgmma_supports(const FlashParams& p) {
  return p.d == kD && !p.pos_q && !p.pos_k && (p.dtype == DType::bf16 || p.dtype == DType::f16);
}

void flash_forward_wgmma(const FlashParams& p, cudaStream_t stream) {
  if (!flash_forward_wgmma_supports(p))
    throw_unsupported("cuda wgmma forward: only head dim 128, bf16/fp16, without explicit positions");
  dispatch_16bit(p.dtype, [&]<class T>() { launch<T>(p, stream); });
}

}  // namespace longattn::kernels::cuda
