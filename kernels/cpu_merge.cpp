// CPU merge of partial attention results and the backward's row-sum delta.
#include "common/check.hpp"
#include "kernels/attention_state.hpp"
#include "kernels/cpu_kernels.hpp"
#include "longattn/dtype_convert.hpp"

namespace longattn::kernels {

void cpu_merge_into(TensorView o_acc, TensorView lse_acc, TensorView o_part, TensorView lse_part) {
  LONGATTN_INVALID(o_acc.dtype == DType::f32 && o_acc.ndim == 3 && o_acc.is_contiguous(),
                   "merge: o_acc must be contiguous fp32 [tokens, heads, dim], got {}", o_acc.describe());
  LONGATTN_INVALID(o_part.ndim == 3 && o_part.numel() == o_acc.numel() && o_part.is_contiguous(),
                   "merge: o_part {} does not match o_acc {}", o_part.describe(), o_acc.describe());
  const std::int64_t t = o_acc.dim(0), h = o_acc.dim(1), d = o_acc.dim(2);
  LONGATTN_INVALID(lse_acc.numel() == h * t && lse_part.numel() == h * t && lse_acc.dtype == DType::f32 &&
                       lse_part.dtype == DType::f32,
                   "merge: lse tensors must be fp32 [{}, {}]", h, t);
  float* oa = o_acc.as<float>();
  float* la = lse_acc.as<float>();
  const float* lp = lse_part.as<const float>();
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < t; ++i) {
    for (std::int64_t hh = 0; hh < h; ++hh) {
      float& lse = la[hh * t + i];
      const ResultMerge m = merge_results(lse, lp[hh * t + i]);
      const std::size_t base = static_cast<std::size_t>((i * h + hh) * d);
      for (std::int64_t x = 0; x < d; ++x)
        oa[base + x] = mix(m.weights, oa[base + x], load_as_f32(o_part.data, o_part.dtype, base + x));
      lse = m.lse;
    }
  }
}

void cpu_compute_delta(TensorView o, TensorView d_o, TensorView delta) {
  LONGATTN_INVALID(o.ndim == 3 && d_o.ndim == 3 && o.numel() == d_o.numel(), "delta: o {} and d_o {} must match",
                   o.describe(), d_o.describe());
  const std::int64_t t = o.dim(0), h = o.dim(1), d = o.dim(2);
  LONGATTN_INVALID(delta.dtype == DType::f32 && delta.numel() == h * t, "delta must be fp32 [{}, {}], got {}", h, t,
                   delta.describe());
  float* out = delta.as<float>();
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < t; ++i) {
    for (std::int64_t hh = 0; hh < h; ++hh) {
      const std::size_t base = static_cast<std::size_t>((i * h + hh) * d);
      float s = 0;
      for (std::int64_t x = 0; x < d; ++x) s += load_as_f32(o.data, o.dtype, base + x) * load_as_f32(d_o.data, d_o.dtype, base + x);
      out[hh * t + i] = s;
    }
  }
}

}  // namespace longattn::kernels
