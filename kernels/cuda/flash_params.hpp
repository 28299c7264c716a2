// Parameters of the own fused attention kernels (forward, backward, decode) and their launchers.
// One struct per kernel family, filled on the host from AttentionArgs; the .cu files dispatch
// dtype x head dim to template instantiations (only bf16/fp16 x 64/128 are built).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "longattn/tensor.hpp"

namespace longattn::kernels::cuda {

// Warpgroup schedules of the wgmma forward, one mainloop each (flash_fwd_wgmma.cu says what each
// does; chosen by LONGATTN_CUDA_WGMMA_FWD_SCHEDULE).
enum class WgmmaSchedule : int { pipeline, overlap };

struct FlashParams {
  const void *q = nullptr, *k = nullptr, *v = nullptr;  // [T, H, D], dtype of the call
  const std::int32_t *cu_q = nullptr, *cu_k = nullptr;  // device, batch + 1; null => one sequence
  const std::int32_t *pos_q = nullptr, *pos_k = nullptr;  // device, absolute positions; null => index
  std::int64_t tq = 0, tk = 0;                          // packed token counts
  int batch = 1, hq = 0, hkv = 0, d = 0;
  int max_len_q = 0, max_len_k = 0;                     // grid sizing; exact upper bounds
  bool causal = false;
  float scale = 0.0f;                                   // softmax scale
  DType dtype = DType::bf16;

  // forward
  void* o = nullptr;  // [Tq, Hq, D]
  DType o_dtype = DType::bf16;
  float* lse = nullptr;  // [Hq, Tq]
  WgmmaSchedule wgmma_schedule = WgmmaSchedule::overlap;  // wgmma forward only

  // backward
  const void* d_o = nullptr;    // [Tq, Hq, D], dtype of the call
  const float* delta = nullptr; // [Hq, Tq], rowsum(dO * O)
  const float* lse_in = nullptr;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  DType grad_dtype_q = DType::f32, grad_dtype_k = DType::f32, grad_dtype_v = DType::f32;
  bool accumulate = false;
  // false: dQ is summed by fp32 atomics into dq_accum (zeroed or holding the values to add to) from
  // the dK/dV kernel, 5 tile products per step; true: a separate dQ kernel, no atomics, 7 products.
  bool deterministic = false;
  float* dq_accum = nullptr;  // [Tq, Hq, D] fp32, only when !deterministic
};

void flash_forward(const FlashParams& p, cudaStream_t stream);
// The Hopper wgmma forward (flash_fwd_wgmma.cu): head dim 128, bf16/fp16, no explicit positions.
bool flash_forward_wgmma_supports(const FlashParams& p);
void flash_forward_wgmma(const FlashParams& p, cudaStream_t stream);
// Diagnostic for the GPU tests (flash_fwd_wgmma_diagnostic.cu): one 128-query x 128-key tile
// through the wgmma forward's two products (q [128][128], k, v [128][128] row-major device arrays;
// s = q k^T [128][128] and o = s v [128][128] fp32, with s rounded to the input type before the
// second product).
void wgmma_tile_products(const void* q, const void* k, const void* v, float* s, float* o, DType dtype, cudaStream_t stream);
// dK/dV: one kernel owns each key block (summing the GQA group in order, no atomics). dQ: see
// FlashParams::deterministic.
void flash_backward(const FlashParams& p, cudaStream_t stream);
// The Hopper wgmma backward (flash_bwd_wgmma.cu): head dim 128, bf16/fp16, no explicit positions,
// atomic dQ (needs dq_accum; not the deterministic mode). Others: flash_backward.
bool flash_backward_wgmma_supports(const FlashParams& p);
void flash_backward_wgmma(const FlashParams& p, cudaStream_t stream);
// Diagnostic for the GPU tests: the wgmma backward's three product forms on one tile (k [128][128],
// q [64][128], ds_t [128][64] row-major): st = k q^T [128][64], dv = dtype(st) q [128][128],
// dq = ds_t^T k [64][128], fp32 out.
void wgmma_bwd_tile_products(const void* k, const void* q, const void* ds_t, float* st, float* dv, float* dq, DType dtype,
                             cudaStream_t stream);

// Element-wise helpers (elementwise.cu).
void launch_merge_into(float* o_acc, float* lse_acc, const void* o_part, DType part_dtype, const float* lse_part,
                       std::int64_t tokens, int heads, int d, cudaStream_t stream);
void launch_compute_delta(const void* o, DType o_dtype, const void* d_o, DType do_dtype, float* delta,
                          std::int64_t tokens, int heads, int d, cudaStream_t stream);
void launch_fill(void* dst, DType t, std::int64_t n, float value, cudaStream_t stream);
void launch_add_into(float* dst, const void* src, DType src_dtype, std::int64_t n, cudaStream_t stream);
void launch_convert(void* dst, DType dst_dtype, const void* src, DType src_dtype, std::int64_t n, cudaStream_t stream);

}  // namespace longattn::kernels::cuda
