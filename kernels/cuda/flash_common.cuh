// Device building blocks of the fused attention kernels: tensor-core mma.sync m16n8k16 (bf16 and
// fp16 in, fp32 accumulate), ldmatrix fragment loads from XOR-swizzled shared memory, cp.async
// tile copies, and the per-tile mask classification by absolute positions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/flash_params.hpp"

namespace longattn::kernels::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class T>
struct Pack;
template <>
struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ std::uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<std::uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Pack<__half> {
  static __device__ __forceinline__ std::uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<std::uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

// D = A * B + D, A 16x16 row-major (4 regs), B 16x8 column-major (2 regs), D 16x8 fp32 (4 regs).
template <class T>
__device__ __forceinline__ void mma16816(float* d, const std::uint32_t* a, const std::uint32_t* b);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const std::uint32_t* a, const std::uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, const std::uint32_t* a, const std::uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x on the special-function unit, flushing denormals (their weight is below bf16 resolution of
// any row sum, which always holds a term >= 1); saves the denormal fix-up of exp2f.
// Build knob for a same-session comparison with exp2f (-DLONGATTN_FAST_EXP2=0).
#ifndef LONGATTN_FAST_EXP2
#define LONGATTN_FAST_EXP2 1
#endif
__device__ __forceinline__ float fast_exp2(float x) {
#if LONGATTN_FAST_EXP2
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t* r, std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t* r, std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global->shared copy; src_bytes = 0 zero-fills (rows past a sequence's end).
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A tile of ROWS x D 16-bit elements in shared memory, rows of D/8 16-byte chunks; chunk c of row r
// lives at chunk c ^ (r & 7), so the 8 row addresses of one ldmatrix hit 8 different bank groups.
template <int D>
struct SwizzledTile {
  static constexpr int kChunks = D / 8;
  __device__ __forceinline__ static int offset(int row, int chunk) {  // in elements
    return row * D + ((chunk ^ (row & 7)) * 8);
  }
};

// Copies rows [row0, row0 + ROWS) of one head of a THD tensor into a swizzled tile; rows at or past
// `rows_valid` are zero-filled. All NT threads take part.
template <int ROWS, int D, int NT, class T>
__device__ __forceinline__ void load_tile(T* smem, const T* base, std::int64_t row_stride, int rows_valid, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = ROWS * kChunks;
#pragma unroll
  for (int i = 0; i < (kTotal + NT - 1) / NT; ++i) {
    const int idx = i * NT + tid;
    if (kTotal % NT == 0 || idx < kTotal) {
      const int r = idx / kChunks, c = idx % kChunks;
      const bool valid = r < rows_valid;
      const T* src = base + (valid ? static_cast<std::int64_t>(r) * row_stride : 0) + c * 8;
      cp_async16(smem_addr(smem + SwizzledTile<D>::offset(r, c)), src, valid);
    }
  }
}

// Min and max over n (<= 32 * PER) positions starting at p, computed by one warp (all lanes get the
// result). Used to decide per tile: fully visible, fully masked, or needs the element mask.
template <int PER>
__device__ __forceinline__ void warp_minmax(const std::int32_t* p, int n, int lane, int& mn, int& mx) {
  mn = 0x7fffffff;
  mx = -0x7fffffff - 1;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int idx = i * 32 + lane;
    if (idx < n) {
      const int v = p[idx];
      mn = min(mn, v);
      mx = max(mx, v);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
}

// Visibility of a (query block, key block) pair from position ranges.
enum class TileMask { none, partial, all_masked };
__device__ __forceinline__ TileMask classify(bool causal, int qmin, int qmax, int kmin, int kmax) {
  if (!causal) return TileMask::none;
  if (kmin > qmax) return TileMask::all_masked;
  if (kmax <= qmin) return TileMask::none;
  return TileMask::partial;
}

// Range of tiles [0, end) of the other operand a tile must visit (keys for a query tile, queries
// for a key tile), and how to find the next non-skipped one.
struct TileWalk {
  const std::int32_t* pos;  // positions of the walked tensor; null => positions are indices
  std::int64_t start;       // packed index of the sequence's first token
  int len, bn, end;         // walked sequence length, tile size, one past the last tile to visit
  bool causal;
  bool walk_is_query;       // walking query tiles against a fixed key tile (dK/dV), else the reverse
  int fix_min, fix_max;     // position range of the fixed tile
  __device__ __forceinline__ void range(int t, int lane, int& mn, int& mx) const {
    const int n = min(bn, len - t * bn);
    if (pos) {
      if (bn <= 32) warp_minmax<1>(pos + start + t * bn, n, lane, mn, mx);
      else if (bn <= 64) warp_minmax<2>(pos + start + t * bn, n, lane, mn, mx);
      else warp_minmax<4>(pos + start + t * bn, n, lane, mn, mx);
    } else {
      mn = t * bn;
      mx = t * bn + n - 1;
    }
  }
  __device__ __forceinline__ TileMask mask(int t, int lane) const {
    if (!causal) return TileMask::none;
    int mn, mx;
    range(t, lane, mn, mx);
    return walk_is_query ? classify(true, mn, mx, fix_min, fix_max) : classify(true, fix_min, fix_max, mn, mx);
  }
  // First tile >= t that is not entirely masked, or end. With index positions the caller has
  // already cut [begin, end) to the visible tiles.
  __device__ __forceinline__ int next(int t, int lane) const {
    if (!pos || !causal) return t < end ? t : end;
    for (; t < end; ++t)
      if (mask(t, lane) != TileMask::all_masked) return t;
    return end;
  }
};

__device__ __forceinline__ void seq_bounds(const std::int32_t* cu, int b, std::int64_t total, std::int64_t& start,
                                           int& len) {
  if (cu) {
    start = cu[b];
    len = cu[b + 1] - cu[b];
  } else {
    start = 0;
    len = static_cast<int>(total);
  }
}

// The query tile of one block of a kernel that owns query rows (forward, dQ): block (x, head,
// sequence), x counted from the end so the longest causal rows start first; the sequence bounds,
// the tile's first row and row count, the kv head of the head's GQA group, and the element offsets
// of the tile's Q rows and of the kv head's K/V rows. empty(): the tile starts past the sequence.
struct QueryTile {
  std::int64_t q_start, k_start;
  int len_q, len_k, m0, rows_q, h, hk;
  std::int64_t q_stride, kv_stride;  // elements between tokens
  std::int64_t q_offset, kv_offset;  // first Q row of the tile / first K or V row of the kv head
  __device__ __forceinline__ bool empty() const { return m0 >= len_q; }
};
template <int BM, int D>
__device__ __forceinline__ QueryTile query_tile(const FlashParams& p) {
  QueryTile t;
  t.h = blockIdx.y;
  const int b = blockIdx.z, m_block = gridDim.x - 1 - blockIdx.x;
  seq_bounds(p.cu_q, b, p.tq, t.q_start, t.len_q);
  seq_bounds(p.cu_k, b, p.tk, t.k_start, t.len_k);
  t.m0 = m_block * BM;
  t.rows_q = min(BM, t.len_q - t.m0);
  t.hk = t.h / (p.hq / p.hkv);
  t.q_stride = static_cast<std::int64_t>(p.hq) * D;
  t.kv_stride = static_cast<std::int64_t>(p.hkv) * D;
  t.q_offset = (t.q_start + t.m0) * t.q_stride + static_cast<std::int64_t>(t.h) * D;
  t.kv_offset = t.k_start * t.kv_stride + static_cast<std::int64_t>(t.hk) * D;
  return t;
}

// The key tile of one block of a kernel that owns key rows (the dK/dV kernels): block (x, kv head,
// sequence); the sequence bounds, the tile's first key and key count, the GQA group size, and the
// element offset of the tile's K/V rows. empty(): the tile starts past the sequence.
struct KeyTile {
  std::int64_t q_start, k_start;
  int len_q, len_k, n0, rows_k, hk, group;
  std::int64_t q_stride, kv_stride;  // elements between tokens
  std::int64_t kv_offset;            // first K or V row of the tile
  __device__ __forceinline__ bool empty() const { return n0 >= len_k; }
};
template <int BN, int D>
__device__ __forceinline__ KeyTile key_tile(const FlashParams& p) {
  KeyTile t;
  t.hk = blockIdx.y;
  const int b = blockIdx.z;
  t.group = p.hq / p.hkv;
  seq_bounds(p.cu_q, b, p.tq, t.q_start, t.len_q);
  seq_bounds(p.cu_k, b, p.tk, t.k_start, t.len_k);
  t.n0 = blockIdx.x * BN;
  t.rows_k = min(BN, t.len_k - t.n0);
  t.q_stride = static_cast<std::int64_t>(p.hq) * D;
  t.kv_stride = static_cast<std::int64_t>(p.hkv) * D;
  t.kv_offset = (t.k_start + t.n0) * t.kv_stride + static_cast<std::int64_t>(t.hk) * D;
  return t;
}

// Two adjacent gradient values into a tensor of dtype t: fp32 (added to what is there when
// accumulating) or 16-bit (written).
__device__ __forceinline__ void store_grad_pair(void* base, DType t, bool acc, std::int64_t idx, float a, float b) {
  if (t == DType::f32) {
    float2* p = reinterpret_cast<float2*>(static_cast<float*>(base) + idx);
    if (acc) {
      const float2 old = *p;
      a += old.x;
      b += old.y;
    }
    *p = make_float2(a, b);
  } else if (t == DType::bf16) {
    *reinterpret_cast<std::uint32_t*>(static_cast<__nv_bfloat16*>(base) + idx) = Pack<__nv_bfloat16>::pack(a, b);
  } else {
    *reinterpret_cast<std::uint32_t*>(static_cast<__half*>(base) + idx) = Pack<__half>::pack(a, b);
  }
}

template <class T>
__device__ __forceinline__ void store_pair(void* base, DType t, std::int64_t idx, float a, float b) {
  if (t == DType::f32) {
    *reinterpret_cast<float2*>(static_cast<float*>(base) + idx) = make_float2(a, b);
  } else {
    *reinterpret_cast<std::uint32_t*>(static_cast<T*>(base) + idx) = Pack<T>::pack(a, b);
  }
}

}  // namespace longattn::kernels::cuda
