// --check's single-process oracle: attention over the whole sequence on rank 0, computed in blocks
// of query rows so a long check can say how far it is. Rows are independent in the forward pass;
// in the backward pass each block adds its share to dk and dv.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#include "longattn/backend.hpp"

namespace longattn::ring_job {

struct OracleProblem {
  TensorView q, k, v, d_o;  // whole tensors in the job's dtype; d_o only for the backward pass
  bool causal = false;
};

struct OracleResults {
  std::vector<float> o, lse, dq, dk, dv;  // o [T,H,D], lse [H,T], dq [T,H,D], dk/dv [T,K,D]
};

// progress(phase, rows done, rows): called after each block.
using OracleProgress = std::function<void(const char*, std::int64_t, std::int64_t)>;

inline OracleResults run_oracle(AttentionBackend& be, const OracleProblem& p, bool backward, std::int64_t block_rows,
                                const OracleProgress& progress) {
  const std::int64_t T = p.q.dim(0), H = p.q.dim(1), K = p.k.dim(1), D = p.q.dim(2);
  block_rows = std::clamp<std::int64_t>(block_rows, 1, T);
  const auto esize = dtype_size(p.q.dtype);
  OracleResults r;
  r.o.resize(static_cast<std::size_t>(T * H * D));
  r.lse.resize(static_cast<std::size_t>(H * T));
  std::vector<std::int32_t> positions(static_cast<std::size_t>(T));
  std::iota(positions.begin(), positions.end(), 0);
  std::vector<float> lse_block(static_cast<std::size_t>(H * block_rows));

  // Queries [a, b) and the keys they may see: all of them, or [0, b) under the causal mask.
  auto block_args = [&](std::int64_t a, std::int64_t b) {
    const std::int64_t keys = p.causal ? b : T;
    AttentionArgs args;
    args.q = TensorView(static_cast<char*>(p.q.data) + static_cast<std::size_t>(a * H * D) * esize, p.q.dtype, {b - a, H, D});
    args.k = TensorView(p.k.data, p.k.dtype, {keys, K, D});
    args.v = TensorView(p.v.data, p.v.dtype, {keys, K, D});
    args.causal = p.causal;
    if (p.causal) {
      args.q_positions = positions.data() + a;
      args.k_positions = positions.data();
    }
    return args;
  };
  // lse rows [a, b) of every head, between the whole [H, T] and a block [H, b - a].
  auto lse_rows = [&](std::vector<float>& whole, std::vector<float>& block, std::int64_t a, std::int64_t b, bool to_block) {
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = a; i < b; ++i) {
        float& w = whole[static_cast<std::size_t>(h * T + i)];
        float& x = block[static_cast<std::size_t>(h * (b - a) + i - a)];
        if (to_block) x = w;
        else w = x;
      }
  };

  for (std::int64_t a = 0; a < T; a += block_rows) {
    const std::int64_t b = std::min(T, a + block_rows);
    be.forward(block_args(a, b), {TensorView(r.o.data() + a * H * D, DType::f32, {b - a, H, D}),
                                  TensorView(lse_block.data(), DType::f32, {H, b - a})});
    lse_rows(r.lse, lse_block, a, b, false);
    if (progress) progress("forward", b, T);
  }
  if (!backward) return r;

  // Backward from the oracle's own forward results, as a single process would do it.
  r.dq.resize(static_cast<std::size_t>(T * H * D));
  r.dk.resize(static_cast<std::size_t>(T * K * D));
  r.dv.resize(static_cast<std::size_t>(T * K * D));
  for (std::int64_t a = 0; a < T; a += block_rows) {
    const std::int64_t b = std::min(T, a + block_rows), keys = p.causal ? b : T;
    lse_rows(r.lse, lse_block, a, b, true);
    BackwardArgs g;
    g.o = TensorView(r.o.data() + a * H * D, DType::f32, {b - a, H, D});
    g.lse = TensorView(lse_block.data(), DType::f32, {H, b - a});
    g.d_o = TensorView(static_cast<char*>(p.d_o.data) + static_cast<std::size_t>(a * H * D) * esize, p.d_o.dtype, {b - a, H, D});
    g.dq = TensorView(r.dq.data() + a * H * D, DType::f32, {b - a, H, D});
    g.dk = TensorView(r.dk.data(), DType::f32, {keys, K, D});
    g.dv = TensorView(r.dv.data(), DType::f32, {keys, K, D});
    g.accumulate = true;  // dq starts at zero; dk and dv gather every block's share
    be.backward(block_args(a, b), g);
    if (progress) progress("backward", b, T);
  }
  return r;
}

}  // namespace longattn::ring_job
