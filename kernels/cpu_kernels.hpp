// The CPU attention implementations behind the "reference" and "cpu" backends.
#pragma once

#include "longattn/attention.hpp"

namespace longattn::kernels {

// Double-precision oracle: straightforward, slow, the truth every other backend is tested against.
void reference_forward(const AttentionArgs& args, const ForwardOutputs& out);
void reference_backward(const AttentionArgs& args, const BackwardArgs& grads);

// Fast CPU: tiled online softmax (never an N x N matrix), multithreaded, vectorized; fp32 accumulate.
void cpu_fast_forward(const AttentionArgs& args, const ForwardOutputs& out);
void cpu_fast_backward(const AttentionArgs& args, const BackwardArgs& grads);

// CPU element-wise pieces shared by both CPU backends.
void cpu_merge_into(TensorView o_acc, TensorView lse_acc, TensorView o_part, TensorView lse_part);
void cpu_compute_delta(TensorView o, TensorView d_o, TensorView delta);

// Position of token `local` (index inside its sequence) whose packed index is `packed`.
inline int token_position(const std::int32_t* positions, std::int64_t packed, std::int64_t local) noexcept {
  return positions ? positions[packed] : static_cast<int>(local);
}

}  // namespace longattn::kernels
