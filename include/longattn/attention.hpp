// The arguments of one local attention call: packed varlen ("THD") tensors, masks by absolute
// positions, outputs. Every backend (CPU reference, fast CPU, CUDA, cuDNN) takes exactly these.
#pragma once

#include <cstdint>

#include "longattn/tensor.hpp"

namespace longattn {

// q [Tq, Hq, D], k and v [Tk, Hkv, D], Hq % Hkv == 0 (query head h reads kv head h / (Hq / Hkv)).
// cu_seqlens_q/k (int32, batch + 1 prefix sums) cut the packed tokens into sequences; query tokens
// of sequence b attend only to key tokens of sequence b. Null means one sequence of all tokens.
// Pointers live where the tensors live (host memory for CPU backends, device memory for CUDA).
//
// Causal masking uses absolute positions inside each sequence: query token i sees key token j iff
// k_positions[j] <= q_positions[i]. Null positions mean "index inside the sequence". Explicit
// positions are what let a ring step (a query shard against a key shard that lives elsewhere in the
// sequence, possibly zigzagged or striped) reuse the same kernel.
struct AttentionArgs {
  TensorView q, k, v;
  const std::int32_t* cu_seqlens_q = nullptr;
  const std::int32_t* cu_seqlens_k = nullptr;
  int batch = 1;
  // Upper bounds of the per-sequence lengths (0 = derive); GPU backends size grids from these.
  int max_seqlen_q = 0;
  int max_seqlen_k = 0;
  const std::int32_t* q_positions = nullptr;
  const std::int32_t* k_positions = nullptr;
  bool causal = false;
  float scale = 0.0f;  // 0 => 1 / sqrt(head_dim)
  void* stream = nullptr;  // cudaStream_t for CUDA backends; ignored on CPU

  float effective_scale() const noexcept;
};

// Forward results. o [Tq, Hq, D] in f32 or the input dtype; lse [Hq, Tq] f32, natural log of the
// sum of exp(scaled scores). A row that sees no key gets lse = -inf and o = 0.
struct ForwardOutputs {
  TensorView o;
  TensorView lse;
};

// Backward: o and lse are the saved forward results over ALL keys of the query (so a ring step
// computes its exact share of the gradient). delta = rowsum(dO * O) [Hq, Tq] f32 may be given
// (computed once by compute_delta) or left empty for the kernel to derive from o and d_o.
// dq [Tq,Hq,D], dk/dv [Tk,Hkv,D]: f32 or the input dtype. With accumulate, results are added to
// what the (f32) gradient tensors hold; otherwise they are overwritten.
struct BackwardArgs {
  TensorView o, lse, d_o, delta;
  TensorView dq, dk, dv;
  bool accumulate = false;
};

}  // namespace longattn
