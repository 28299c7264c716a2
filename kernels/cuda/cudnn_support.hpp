// Small GPU kernels the "cudnn" backend needs around cuDNN's SDPA graphs: the varlen descriptors
// cuDNN wants (per-sequence lengths, element offsets of ragged tensors), and moving the softmax
// statistics between cuDNN's padded [B, H, S] layout and longattn's packed [H, T] lse.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "longattn/tensor.hpp"

namespace longattn::kernels::cuda {

// From cu_seqlens_q/k (batch + 1 prefix sums): seq_q[b], seq_k[b] (lengths) and the element
// offsets off_q[b] = cu_q[b] * q_row, off_k[b] = cu_k[b] * k_row (batch + 1 entries each), where a
// row is heads * head_dim elements. int32, as cuDNN's ragged offsets are: the backend refuses
// packed tensors of 2^31 elements or more.
void launch_varlen_descriptors(const std::int32_t* cu_q, const std::int32_t* cu_k, int batch, std::int64_t q_row,
                               std::int64_t k_row, std::int32_t* seq_q, std::int32_t* seq_k, std::int32_t* off_q,
                               std::int32_t* off_k, cudaStream_t stream);

// cu[0..3] = {0, tq, 0, tk}: the boundaries of one whole sequence of queries and of keys.
void launch_whole_sequence_bounds(std::int32_t* cu, std::int64_t tq, std::int64_t tk, cudaStream_t stream);

// lse[h, t] = padded[b, h, t - cu_q[b]] for the query tokens t of sequence b, or -inf where the
// sequence has no keys (cuDNN leaves such rows undefined).
void launch_scatter_stats(const float* padded, int max_s, const std::int32_t* cu_q, const std::int32_t* cu_k, int batch,
                          int heads, std::int64_t tq, float* lse, cudaStream_t stream);
// The inverse, for backward: padded[b, h, s] = lse[h, cu_q[b] + s] (padding rows left as they are).
void launch_gather_stats(const float* lse, const std::int32_t* cu_q, int batch, int heads, std::int64_t tq, int max_s,
                         float* padded, cudaStream_t stream);

// Zeroes the rows [t, :] (row = `row` elements of dtype t) of the tokens whose sequence has no
// partner tokens (cu_other[b + 1] == cu_other[b]): output rows of queries without keys, dK/dV rows
// of keys without queries. cuDNN does not write them.
void launch_zero_rows_without_partner(void* x, DType dtype, std::int64_t tokens, std::int64_t row,
                                      const std::int32_t* cu_self, const std::int32_t* cu_other, int batch,
                                      cudaStream_t stream);

}  // namespace longattn::kernels::cuda
