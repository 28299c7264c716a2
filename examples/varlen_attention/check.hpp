// varlen_attention --check: each rank compares the rows of its linear slice (o, and dq, dk, dv with
// --backward) with the double-precision reference run on the sequences that slice touches, whole
// (sequences attend only to themselves, so no rank needs the rest of the batch).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../common/device_tensor.hpp"
#include "longattn/backend.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/host_buffer.hpp"
#include "longattn/varlen_attention.hpp"
#include "options.hpp"

namespace longattn::varlen_job {

// The job's input tensors: 0 q, 1 k, 2 v, 3 dO (examples::random_value's numbering).
inline float input_value(const Options& o, int tensor, std::int64_t global_row, std::int64_t column, std::int64_t width) {
  return examples::random_value(o.seed, tensor, global_row * width + column);
}

struct CheckResult {
  double o_error = 0, grad_error = 0;  // max |got - reference| / max(1, max |reference|)
  bool passed = true;
};

// `got` maps a result name ("o", "dq", "dk", "dv") to this rank's linear rows, f32 [rows, heads, D].
template <class Got>
CheckResult check_linear_slice(const Options& o, const BalancedBatch& batch, int rank, const Got& got) {
  const auto& cu = batch.cu_seqlens();
  const std::int64_t begin = batch.linear_begin(rank), end = batch.linear_begin(rank + 1);
  const std::int64_t D = o.head_dim;
  CheckResult result;
  std::vector<double> worst_o, worst_g;
  auto ref = make_backend("reference");
  for (std::size_t s = 0; s + 1 < cu.size(); ++s) {
    const std::int64_t a = cu[s], b = cu[s + 1];
    if (b <= begin || a >= end || a == b) continue;
    const std::int64_t L = b - a;
    // The sequence's inputs, rounded through the job's dtype as the run saw them.
    auto make = [&](int tensor, int heads) {
      const std::int64_t w = heads * D;
      std::vector<float> f(static_cast<std::size_t>(L * w));
      for (std::int64_t r = 0; r < L; ++r)
        for (std::int64_t c = 0; c < w; ++c) f[static_cast<std::size_t>(r * w + c)] = input_value(o, tensor, a + r, c, w);
      HostBuffer buf(std::max<std::size_t>(f.size() * dtype_size(o.dtype), 1));
      convert_from_f32(f.data(), buf.data(), o.dtype, f.size());
      return buf;
    };
    auto q = make(0, o.heads), k = make(1, o.kv_heads), v = make(2, o.kv_heads), d_o = make(3, o.heads);
    HostBuffer ro(static_cast<std::size_t>(L * o.heads * D) * 4), rl(static_cast<std::size_t>(L * o.heads) * 4);
    HostBuffer rdq(static_cast<std::size_t>(L * o.heads * D) * 4), rdk(static_cast<std::size_t>(L * o.kv_heads * D) * 4),
        rdv(static_cast<std::size_t>(L * o.kv_heads * D) * 4);
    AttentionArgs args;
    args.q = TensorView(q.data(), o.dtype, {L, o.heads, D});
    args.k = TensorView(k.data(), o.dtype, {L, o.kv_heads, D});
    args.v = TensorView(v.data(), o.dtype, {L, o.kv_heads, D});
    args.causal = o.causal;
    const TensorView o_view(ro.data(), DType::f32, {L, o.heads, D}), lse_view(rl.data(), DType::f32, {o.heads, L});
    ref->forward(args, {o_view, lse_view});
    if (o.backward)
      ref->backward(args, {o_view, lse_view, TensorView(d_o.data(), o.dtype, {L, o.heads, D}), {},
                           TensorView(rdq.data(), DType::f32, {L, o.heads, D}), TensorView(rdk.data(), DType::f32, {L, o.kv_heads, D}),
                           TensorView(rdv.data(), DType::f32, {L, o.kv_heads, D}), false});
    // Compare the rows of this sequence inside the slice.
    const std::int64_t lo = std::max(a, begin), hi = std::min(b, end);
    auto compare = [&](const std::vector<float>& mine, const HostBuffer& want, int heads, double& worst) {
      const std::int64_t w = heads * D;
      double max_abs = 0, max_ref = 1;
      const auto* ref_rows = reinterpret_cast<const float*>(want.data());
      for (std::int64_t g = lo; g < hi; ++g)
        for (std::int64_t c = 0; c < w; ++c) {
          const double r = ref_rows[(g - a) * w + c], x = mine[static_cast<std::size_t>((g - begin) * w + c)];
          max_abs = std::max(max_abs, std::isnan(x) ? INFINITY : std::fabs(x - r));
          max_ref = std::max(max_ref, std::fabs(r));
        }
      worst = std::max(worst, max_abs / max_ref);
    };
    compare(got("o"), ro, o.heads, result.o_error);
    if (o.backward) {
      compare(got("dq"), rdq, o.heads, result.grad_error);
      compare(got("dk"), rdk, o.kv_heads, result.grad_error);
      compare(got("dv"), rdv, o.kv_heads, result.grad_error);
    }
  }
  const bool low = o.dtype != DType::f32;
  result.passed = result.o_error <= (low ? 2e-2 : 1e-4) && result.grad_error <= (low ? 8e-2 : 5e-4);
  return result;
}

}  // namespace longattn::varlen_job
