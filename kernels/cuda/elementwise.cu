// GPU element-wise helpers of the backend interface: LSE merge of partial results, delta =
// rowsum(dO * O), fill, add, dtype conversion. Memory-bound; one warp per (token, head) row where
// a row-wide value (lse, delta) is involved, grid-stride loops elsewhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/check.hpp"
#include "kernels/attention_state.hpp"
#include "kernels/cuda/flash_params.hpp"

namespace longattn::kernels::cuda {
namespace {

__device__ __forceinline__ float load_f(const void* p, DType t, std::int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return __half2float(static_cast<const __half*>(p)[i]);
  }
}
__device__ __forceinline__ void store_f(void* p, DType t, std::int64_t i, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
  }
}

int blocks_for(std::int64_t n, int threads) {
  const std::int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

// One warp per (token, head) row: every lane reads both LSEs before lane 0 overwrites lse_acc.
__global__ void merge_kernel(float* o_acc, float* lse_acc, const void* o_part, DType pt, const float* lse_part,
                             std::int64_t tokens, int heads, int d) {
  const std::int64_t rows = tokens * heads;
  const int lane = threadIdx.x % 32;
  for (std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += static_cast<std::int64_t>(gridDim.x) * blockDim.x / 32) {
    const std::int64_t t = row / heads;
    const int h = static_cast<int>(row % heads);
    const std::int64_t li = static_cast<std::int64_t>(h) * tokens + t;
    const ResultMerge m = merge_results(lse_acc[li], lse_part[li]);
    float* o = o_acc + row * d;
    for (int x = lane; x < d; x += 32) o[x] = mix(m.weights, o[x], load_f(o_part, pt, row * d + x));
    __syncwarp();
    if (lane == 0) lse_acc[li] = m.lse;
  }
}

__global__ void delta_kernel(const void* o, DType ot, const void* d_o, DType dt, float* delta, std::int64_t tokens,
                             int heads, int d) {
  const std::int64_t rows = tokens * heads;
  const int lane = threadIdx.x % 32;
  for (std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += static_cast<std::int64_t>(gridDim.x) * blockDim.x / 32) {
    float acc = 0.0f;
    for (int x = lane; x < d; x += 32) acc += load_f(o, ot, row * d + x) * load_f(d_o, dt, row * d + x);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) delta[static_cast<std::int64_t>(row % heads) * tokens + row / heads] = acc;
  }
}

__global__ void fill_kernel(void* dst, DType t, std::int64_t n, float v) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_f(dst, t, i, v);
}

__global__ void add_kernel(float* dst, const void* src, DType st, std::int64_t n) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    dst[i] += load_f(src, st, i);
}

__global__ void convert_kernel(void* dst, DType dt, const void* src, DType st, std::int64_t n) {
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_f(dst, dt, i, load_f(src, st, i));
}

}  // namespace

void launch_merge_into(float* o_acc, float* lse_acc, const void* o_part, DType pt, const float* lse_part,
                       std::int64_t tokens, int heads, int d, cudaStream_t stream) {
  if (tokens * heads == 0) return;
  merge_kernel<<<blocks_for(tokens * heads * 32, 256), 256, 0, stream>>>(o_acc, lse_acc, o_part, pt, lse_part, tokens, heads, d);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_compute_delta(const void* o, DType ot, const void* d_o, DType dt, float* delta, std::int64_t tokens,
                          int heads, int d, cudaStream_t stream) {
  if (tokens * heads == 0) return;
  delta_kernel<<<blocks_for(tokens * heads * 32, 256), 256, 0, stream>>>(o, ot, d_o, dt, delta, tokens, heads, d);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_fill(void* dst, DType t, std::int64_t n, float value, cudaStream_t stream) {
  if (n == 0) return;
  fill_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(dst, t, n, value);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_add_into(float* dst, const void* src, DType st, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(dst, src, st, n);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_convert(void* dst, DType dt, const void* src, DType st, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  convert_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(dst, dt, src, st, n);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace longattn::kernels::cuda
