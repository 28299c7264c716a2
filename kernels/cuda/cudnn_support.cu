// Kernels around cuDNN's SDPA graphs (see cudnn_support.hpp). All are tiny next to attention.
#include <cmath>

#include "common/check.hpp"
#include "kernels/cuda/cudnn_support.hpp"

namespace longattn::kernels::cuda {
namespace {

// The sequence a packed token belongs to: the last b with cu[b] <= t (cu is monotone).
__device__ int sequence_of(const std::int32_t* cu, int batch, std::int64_t t) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

int grid_for(std::int64_t n, int threads) {
  const std::int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

__global__ void varlen_descriptors_kernel(const std::int32_t* cu_q, const std::int32_t* cu_k, int batch,
                                          std::int64_t q_row, std::int64_t k_row, std::int32_t* seq_q,
                                          std::int32_t* seq_k, std::int32_t* off_q, std::int32_t* off_k) {
  for (int b = threadIdx.x; b <= batch; b += blockDim.x) {
    off_q[b] = static_cast<std::int32_t>(cu_q[b] * q_row);
    off_k[b] = static_cast<std::int32_t>(cu_k[b] * k_row);
    if (b < batch) {
      seq_q[b] = cu_q[b + 1] - cu_q[b];
      seq_k[b] = cu_k[b + 1] - cu_k[b];
    }
  }
}

// Moves stats between the packed [H, T] lse and cuDNN's padded [B, H, S]: to_packed writes lse
// (-inf for queries of sequences without keys), otherwise padded.
template <bool to_packed>
__global__ void move_stats_kernel(float* padded, int max_s, const std::int32_t* cu_q, const std::int32_t* cu_k,
                                  int batch, int heads, std::int64_t tq, float* lse) {
  const std::int64_t n = tq * heads;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = i % tq;
    const int h = static_cast<int>(i / tq);
    const int b = sequence_of(cu_q, batch, t);
    float& slot = padded[(static_cast<std::int64_t>(b) * heads + h) * max_s + (t - cu_q[b])];
    if constexpr (to_packed) {
      lse[i] = cu_k[b + 1] > cu_k[b] ? slot : -INFINITY;
    } else {
      slot = lse[i];
    }
  }
}

__global__ void zero_rows_kernel(char* x, std::int64_t tokens, std::int64_t row_bytes,
                                 const std::int32_t* cu_self, const std::int32_t* cu_other, int batch) {
  // One block per token; tokens of sequences that have partners return at once.
  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int b = sequence_of(cu_self, batch, t);
    if (cu_other[b + 1] > cu_other[b]) continue;
    char* r = x + t * row_bytes;
    for (std::int64_t j = threadIdx.x; j < row_bytes; j += blockDim.x) r[j] = 0;
  }
}

__global__ void whole_sequence_bounds_kernel(std::int32_t* cu, std::int32_t tq, std::int32_t tk) {
  cu[0] = 0;
  cu[1] = tq;
  cu[2] = 0;
  cu[3] = tk;
}

}  // namespace

void launch_whole_sequence_bounds(std::int32_t* cu, std::int64_t tq, std::int64_t tk, cudaStream_t stream) {
  whole_sequence_bounds_kernel<<<1, 1, 0, stream>>>(cu, static_cast<std::int32_t>(tq), static_cast<std::int32_t>(tk));
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_varlen_descriptors(const std::int32_t* cu_q, const std::int32_t* cu_k, int batch, std::int64_t q_row,
                               std::int64_t k_row, std::int32_t* seq_q, std::int32_t* seq_k, std::int32_t* off_q,
                               std::int32_t* off_k, cudaStream_t stream) {
  varlen_descriptors_kernel<<<1, 256, 0, stream>>>(cu_q, cu_k, batch, q_row, k_row, seq_q, seq_k, off_q, off_k);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_scatter_stats(const float* padded, int max_s, const std::int32_t* cu_q, const std::int32_t* cu_k, int batch,
                          int heads, std::int64_t tq, float* lse, cudaStream_t stream) {
  if (tq == 0) return;
  move_stats_kernel<true><<<grid_for(tq * heads, 256), 256, 0, stream>>>(const_cast<float*>(padded), max_s, cu_q, cu_k,
                                                                          batch, heads, tq, lse);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_gather_stats(const float* lse, const std::int32_t* cu_q, int batch, int heads, std::int64_t tq, int max_s,
                         float* padded, cudaStream_t stream) {
  if (tq == 0) return;
  move_stats_kernel<false><<<grid_for(tq * heads, 256), 256, 0, stream>>>(padded, max_s, cu_q, nullptr, batch, heads, tq,
                                                                           const_cast<float*>(lse));
  LONGATTN_CUDA_CHECK_LAUNCH();
}

void launch_zero_rows_without_partner(void* x, DType dtype, std::int64_t tokens, std::int64_t row,
                                      const std::int32_t* cu_self, const std::int32_t* cu_other, int batch,
                                      cudaStream_t stream) {
  if (tokens == 0) return;
  const int elem = static_cast<int>(dtype_size(dtype));
  const int blocks = static_cast<int>(tokens < 65535 * 4 ? tokens : 65535 * 4);
  zero_rows_kernel<<<blocks, 128, 0, stream>>>(static_cast<char*>(x), tokens, row * elem, cu_self, cu_other, batch);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace longattn::kernels::cuda
