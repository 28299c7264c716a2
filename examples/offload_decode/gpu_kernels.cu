// Kernels of offload_decode's synthetic model (see gpu_kernels.hpp). Simple on purpose: they stand
// for the GPU-side work of a decode step (weight reads dominate), not for a tuned model.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "gpu_kernels.hpp"

namespace offload_decode::gpu {
namespace {

__device__ __forceinline__ float hash_uniform(std::uint64_t key, std::uint64_t index) {
  std::uint64_t z = key * 0x9e3779b97f4a7c15ULL + index * 0x94d049bb133111ebULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) / static_cast<double>(1ULL << 23) - 1.0);
}

__device__ __forceinline__ void store(void* p, int t, std::int64_t i, float v) {
  if (t == kBf16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
  } else if (t == kF16) {
    static_cast<__half*>(p)[i] = __float2half(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

__global__ void fill_random_kernel(void* dst, int t, std::int64_t rows, std::int64_t row_elems, std::int64_t stride, std::uint64_t key,
                                   float scale) {
  const std::int64_t n = rows * row_elems;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / row_elems, e = i - r * row_elems;
    store(dst, t, r * stride + e, scale * hash_uniform(key, static_cast<std::uint64_t>(i)));
  }
}

// Split over columns (2 per thread), rows of W (kChunk per block, partial sums added atomically)
// and rows of x (kRows per block): enough blocks to read W at memory speed for a small batch.
constexpr int kThreads = 256, kChunk = 128, kRows = 8;

__global__ void __launch_bounds__(kThreads) matmul_kernel(const float* x, const __nv_bfloat16* w, float* y, int n, int in, int out) {
  __shared__ float xs[kRows][kChunk];
  const int r0 = blockIdx.z * kRows, k0 = blockIdx.y * kChunk;
  for (int t = threadIdx.x; t < kRows * kChunk; t += kThreads) {
    const int r = t / kChunk, k = t % kChunk;
    xs[r][k] = (r0 + r < n && k0 + k < in) ? x[static_cast<std::int64_t>(r0 + r) * in + k0 + k] : 0.0f;
  }
  __syncthreads();
  const int c = (blockIdx.x * kThreads + threadIdx.x) * 2;
  if (c >= out) return;
  const bool two = c + 1 < out;
  float acc[kRows][2] = {};
  const int kend = min(kChunk, in - k0);
  for (int k = 0; k < kend; ++k) {
    const __nv_bfloat16* wr = w + static_cast<std::int64_t>(k0 + k) * out + c;
    const float w0 = __bfloat162float(wr[0]), w1 = two ? __bfloat162float(wr[1]) : 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] += xs[r][k] * w0;
      acc[r][1] += xs[r][k] * w1;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r0 + r >= n) break;
    float* yr = y + static_cast<std::int64_t>(r0 + r) * out + c;
    atomicAdd(yr, acc[r][0]);
    if (two) atomicAdd(yr + 1, acc[r][1]);
  }
}

__global__ void residual_rmsnorm_kernel(float* x, const float* y, int hidden) {
  __shared__ float part[32];
  float* xr = x + static_cast<std::int64_t>(blockIdx.x) * hidden;
  const float* yr = y + static_cast<std::int64_t>(blockIdx.x) * hidden;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = xr[i] + yr[i];
    xr[i] = v;
    ss += v * v;
  }
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) part[0] = rsqrtf(s / static_cast<float>(hidden) + 1e-6f);
  }
  __syncthreads();
  const float inv = part[0];
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) xr[i] *= inv;
}

__global__ void store_rows_kernel(void* dst, int t, std::int64_t stride, const float* src, int n, int row) {
  const std::int64_t total = static_cast<std::int64_t>(n) * row;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total; i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / row, e = i - r * row;
    store(dst, t, r * stride + e, src[i]);
  }
}

int grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + 255) / 256;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

}  // namespace

void check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(e));
}

void fill_random(void* dst, Elem t, std::int64_t rows, std::int64_t row_elems, std::int64_t dst_row_stride, std::uint64_t key,
                 float scale, void* stream) {
  if (rows <= 0 || row_elems <= 0) return;
  fill_random_kernel<<<grid_for(rows * row_elems), 256, 0, static_cast<cudaStream_t>(stream)>>>(dst, t, rows, row_elems, dst_row_stride,
                                                                                              key, scale);
  check("fill_random");
}

void matmul(const float* x, const void* w, float* y, int n, int in, int out, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (cudaMemsetAsync(y, 0, static_cast<std::size_t>(n) * out * sizeof(float), st) != cudaSuccess) check("matmul: cudaMemsetAsync");
  const dim3 grid((out + 2 * kThreads - 1) / (2 * kThreads), (in + kChunk - 1) / kChunk, (n + kRows - 1) / kRows);
  matmul_kernel<<<grid, kThreads, 0, st>>>(x, static_cast<const __nv_bfloat16*>(w), y, n, in, out);
  check("matmul");
}

void residual_rmsnorm(float* x, const float* y, int n, int hidden, void* stream) {
  residual_rmsnorm_kernel<<<n, 256, 0, static_cast<cudaStream_t>(stream)>>>(x, y, hidden);
  check("residual_rmsnorm");
}

void store_rows(void* dst, Elem t, std::int64_t dst_row_stride, const float* src, int n, int row, void* stream) {
  store_rows_kernel<<<grid_for(static_cast<std::int64_t>(n) * row), 256, 0, static_cast<cudaStream_t>(stream)>>>(dst, t, dst_row_stride,
                                                                                                              src, n, row);
  check("store_rows");
}

}  // namespace offload_decode::gpu
