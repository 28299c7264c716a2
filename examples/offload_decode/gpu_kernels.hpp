// The GPU side of offload_decode's synthetic model: the few kernels a decode step needs besides
// attention (projections, residual + RMSNorm, rounding rows into the KV dtype, random init). Plain
// C++ types only, so the CUDA file needs no project header (it compiles with nvcc's own standard).
#pragma once

#include <cstdint>

namespace offload_decode::gpu {

// Element types, numbered like longattn::DType (f32, bf16, f16).
enum Elem : int { kF32 = 0, kBf16 = 1, kF16 = 2 };

// dst[r * dst_row_stride + e] = scale * u(key, r * row_elems + e) for r < rows, e < row_elems, with u
// uniform in [-1, 1) from a counter-based hash: the same (key, index) gives the same value wherever
// it is written, so the offloaded and the all-on-GPU runs hold identical models and KV.
void fill_random(void* dst, Elem t, std::int64_t rows, std::int64_t row_elems, std::int64_t dst_row_stride, std::uint64_t key,
                 float scale, void* stream);

// y[n, out] = x[n, in] W[in, out]: x and y f32, W bf16 row-major (the weights of a bf16 model).
void matmul(const float* x, const void* w, float* y, int n, int in, int out, void* stream);

// Per row of x [n, hidden]: x = rmsnorm(x + y) (unit gain, eps 1e-6).
void residual_rmsnorm(float* x, const float* y, int n, int hidden, void* stream);

// dst[r * dst_row_stride + e] = round_to(t, src[r * row + e]) for r < n, e < row.
void store_rows(void* dst, Elem t, std::int64_t dst_row_stride, const float* src, int n, int row, void* stream);

// Throws std::runtime_error naming the call when the last launch or call failed.
void check(const char* what);

}  // namespace offload_decode::gpu
