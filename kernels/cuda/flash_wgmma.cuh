// Hopper warpgroup matrix multiply (wgmma.mma_async) for the kernels of flash_fwd_wgmma.cu and
// flash_bwd_wgmma.cu: 128-byte-swizzled shared-memory tiles (layout, cp.async loads, descriptors),
// the fences and group waits, the accumulator layout, and the products with fp32 accumulators:
// m64n128k16 (64 registers per thread) with A from shared memory (SS) or from registers (RS), and
// m64n64k16 (32 registers) from shared memory, plain or with both operands transposed. sm_90a only
// (wgmma is an architecture-specific feature); the operand lists are long because every
// accumulator register is an operand.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/flash_common.cuh"

namespace longattn::kernels::cuda::wgmma {

// Tiles of 16-bit elements, kD = 128 columns, stored the way wgmma reads them with the 128-byte
// swizzle: the 128 columns as two blocks of 64 (128 bytes a row), 16-byte chunk c of row r at
// chunk c ^ (r % 8), blocks 1024-byte aligned. A tile of 64-column rows (e.g. [keys][64 queries])
// is one such block.
constexpr int kD = 128;

// Element offset of (row, 16-byte chunk) in a swizzled tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ int sw128_offset(int row, int chunk) {
  const int block = chunk / 8, c = chunk % 8;
  return block * ROWS * 64 + row * 64 + ((c ^ (row & 7)) * 8);
}

// Rows [0, ROWS) of one head of a THD tensor into a swizzled tile, by THREADS threads; rows at or
// past rows_valid are zero-filled (so the products see zeros, never stale data or NaN).
template <int ROWS, int THREADS, class T>
__device__ __forceinline__ void load_sw128(T* smem, const T* base, std::int64_t row_stride, int rows_valid, int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % THREADS == 0, "whole passes of the block");
#pragma unroll
  for (int i = 0; i < kTotal / THREADS; ++i) {
    const int idx = i * THREADS + tid;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < rows_valid;
    const T* src = base + (valid ? static_cast<std::int64_t>(r) * row_stride : 0) + c * 8;
    cp_async16(smem_addr(smem + sw128_offset<ROWS>(r, c)), src, valid);
  }
}

// Start of the dynamic shared memory rounded up to 1024 bytes (the swizzle works in 1024-byte blocks).
__device__ __forceinline__ unsigned char* smem_aligned_1024(unsigned char* raw) {
  return raw + ((1024u - smem_addr(raw) % 1024u) % 1024u);
}

// Accumulator element i of a thread (m64nN layout, fp32): row inside its warpgroup's 64 rows and
// column; the same numbers say where each score sits for the mask and each output for the store.
__device__ __forceinline__ int acc_row(int i, int warp, int lane) { return warp * 16 + lane / 4 + 8 * ((i / 2) % 2); }
__device__ __forceinline__ int acc_col(int i, int lane) { return 8 * (i / 4) + 2 * (lane % 4) + (i % 2); }

// An accumulator of N columns (N / 2 floats) as the A fragments of a product whose K runs over
// those columns: columns 16 kk .. 16 kk + 15 are the 8-column groups 2 kk and 2 kk + 1.
template <class T, int N>
__device__ __forceinline__ void pack_a_fragments(const float (&acc)[N / 2], std::uint32_t (&a)[N / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = Pack<T>::pack(acc[8 * kk], acc[8 * kk + 1]);
    a[kk][1] = Pack<T>::pack(acc[8 * kk + 2], acc[8 * kk + 3]);
    a[kk][2] = Pack<T>::pack(acc[8 * kk + 4], acc[8 * kk + 5]);
    a[kk][3] = Pack<T>::pack(acc[8 * kk + 6], acc[8 * kk + 7]);
  }
}

// Descriptor of a tile in shared memory with the 128-byte swizzle: start address, leading and
// stride byte offsets (see the PTX ISA, "matrix descriptor"); all three in units of 16 bytes.
__device__ __forceinline__ std::uint64_t desc_sw128(std::uint32_t smem_address, std::uint32_t leading_bytes, std::uint32_t stride_bytes) {
  std::uint64_t d = (smem_address & 0x3FFFFu) >> 4;
  d |= static_cast<std::uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16;
  d |= static_cast<std::uint64_t>((stride_bytes >> 4) & 0x3FFFu) << 32;
  d |= std::uint64_t{1} << 62;  // layout type 1: 128-byte swizzle
  return d;
}

// Orders the generic-proxy writes to shared memory (cp.async, st.shared) before async-proxy reads
// by wgmma; each thread runs it after its own writes, before the barrier that publishes them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory barriers (mbarrier) for pipelines in which the two warpgroups need not run in
// lockstep: a stage is "full" once every thread's copies into it have landed (each thread's
// cp.async arrive, count = block size) and "empty" once every thread is done reading it.
__device__ __forceinline__ void mbarrier_init(std::uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Arrives on `bar` once all of this thread's earlier cp.async copies have landed (no extra pending
// count: the barrier's expected count includes this arrival).
__device__ __forceinline__ void cp_async_arrive(std::uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(std::uint32_t bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Waits until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbarrier_wait(std::uint32_t bar, std::uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @done bra DONE;\n bra WAIT;\n"
      " DONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulator registers across the
// asynchronous product (it sees the registers as written only where the asm statement stands).
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_registers(std::uint32_t (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

template <class T>
struct Mma64x128;

// One specialization per input type; the PTX type name is the only difference, pasted into the
// instruction by the macro (asm templates must be string literals).
#define LONGATTN_WGMMA_M64N128K16(T, PTX_TYPE)                                                                     \
  template <>                                                                                                     \
  struct Mma64x128<T> {                                                                                           \
    /* d (+)= A * B^T, A (64 x 16) and B (128 x 16) both K-major in shared memory. */                             \
    static __device__ __forceinline__ void ss(float (&d)[64], std::uint64_t desc_a, std::uint64_t desc_b, int accumulate) { \
      asm volatile(                                                                                               \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                          \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " "                                  \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                      \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                                                                          \
          : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                                           \
    }                                                                                                             \
    /* d += A * B, A (64 x 16) in registers (the m16n8k16 A-fragment layout per warp), B (16 x 128) */            \
    /* MN-major in shared memory (transposed by the instruction). */                                              \
    static __device__ __forceinline__ void rs(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t desc_b) { \
      asm volatile(                                                                                               \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                          \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " "                                  \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                       \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                                                                          \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));                                     \
    }                                                                                                             \
  };

LONGATTN_WGMMA_M64N128K16(__nv_bfloat16, "bf16")
LONGATTN_WGMMA_M64N128K16(__half, "f16")
#undef LONGATTN_WGMMA_M64N128K16

template <class T>
struct Mma64x64;

// d (+)= A * B^T with A (64 x 16) and B (64 x 16) in shared memory: TRANS 0 both K-major, TRANS 1
// both MN-major (A stored [K][M], B stored [K][N]; transposed by the instruction).
#define LONGATTN_WGMMA_M64N64K16(T, PTX_TYPE)                                                                      \
  template <>                                                                                                     \
  struct Mma64x64<T> {                                                                                            \
    template <int TRANS>                                                                                          \
    static __device__ __forceinline__ void ss(float (&d)[32], std::uint64_t desc_a, std::uint64_t desc_b, int accumulate) { \
      asm volatile(                                                                                               \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                            \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " "                                   \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %35;\n}\n" \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
          : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS));                                               \
    }                                                                                                             \
  };

LONGATTN_WGMMA_M64N64K16(__nv_bfloat16, "bf16")
LONGATTN_WGMMA_M64N64K16(__half, "f16")
#undef LONGATTN_WGMMA_M64N64K16

}  // namespace longattn::kernels::cuda::wgmma
