// Shared argument validation for all attention backends.
#include "kernels/validate.hpp"

#include <cmath>

#include "common/check.hpp"

namespace longattn::kernels {
namespace {

void require_3d(const TensorView& t, const char* name) {
  LONGATTN_INVALID(!t.empty(), "{} is missing", name);
  LONGATTN_INVALID(t.ndim == 3, "{} must be [tokens, heads, head_dim], got {}", name, t.describe());
  LONGATTN_INVALID(t.is_contiguous(), "{} must be contiguous, got a strided view {}", name, t.describe());
}

void require_like(const TensorView& t, const char* name, std::int64_t d0, std::int64_t d1, std::int64_t d2) {
  require_3d(t, name);
  LONGATTN_INVALID(t.dim(0) == d0 && t.dim(1) == d1 && t.dim(2) == d2, "{} must be [{}, {}, {}], got {}", name, d0, d1,
                   d2, t.describe());
}

void require_lse(const TensorView& t, const char* name, const ProblemShape& s) {
  LONGATTN_INVALID(!t.empty(), "{} is missing", name);
  LONGATTN_INVALID(t.dtype == DType::f32 && t.ndim == 2 && t.dim(0) == s.hq && t.dim(1) == s.tq && t.is_contiguous(),
                   "{} must be contiguous fp32[{}, {}] (heads, tokens), got {}", name, s.hq, s.tq, t.describe());
}

}  // namespace

ProblemShape validate_inputs(const AttentionArgs& a) {
  require_3d(a.q, "q");
  require_3d(a.k, "k");
  require_3d(a.v, "v");
  ProblemShape s;
  s.tq = a.q.dim(0);
  s.hq = static_cast<int>(a.q.dim(1));
  s.d = static_cast<int>(a.q.dim(2));
  s.tk = a.k.dim(0);
  s.hkv = static_cast<int>(a.k.dim(1));
  s.batch = a.batch;
  LONGATTN_INVALID(a.k.dtype == a.q.dtype && a.v.dtype == a.q.dtype, "q, k and v must share one dtype, got {}, {}, {}",
                   to_string(a.q.dtype), to_string(a.k.dtype), to_string(a.v.dtype));
  LONGATTN_INVALID(a.k.dim(2) == s.d, "k head_dim {} differs from q head_dim {}", a.k.dim(2), s.d);
  require_like(a.v, "v", s.tk, s.hkv, s.d);
  LONGATTN_INVALID(s.hq > 0 && s.hkv > 0 && s.d > 0, "heads and head_dim must be positive (q {}, k {})", a.q.describe(),
                   a.k.describe());
  LONGATTN_INVALID(s.hq % s.hkv == 0, "query heads ({}) must be a multiple of kv heads ({}) for GQA/MQA", s.hq, s.hkv);
  LONGATTN_INVALID(a.batch >= 1, "batch must be at least 1, got {}", a.batch);
  LONGATTN_INVALID(a.batch == 1 || (a.cu_seqlens_q && a.cu_seqlens_k),
                   "a batch of {} sequences needs both cu_seqlens_q and cu_seqlens_k", a.batch);
  LONGATTN_INVALID((a.cu_seqlens_q == nullptr) == (a.cu_seqlens_k == nullptr),
                   "give both cu_seqlens_q and cu_seqlens_k, or neither");
  LONGATTN_INVALID(a.scale >= 0.0f, "scale must be positive (or 0 for 1/sqrt(head_dim)), got {}", a.scale);
  return s;
}

void validate_forward(const AttentionArgs& a, const ForwardOutputs& out, const ProblemShape& s) {
  require_like(out.o, "o", s.tq, s.hq, s.d);
  LONGATTN_INVALID(out.o.dtype == DType::f32 || out.o.dtype == a.q.dtype, "o must be fp32 or {} like q, got {}",
                   to_string(a.q.dtype), to_string(out.o.dtype));
  require_lse(out.lse, "lse", s);
}

void validate_backward(const AttentionArgs& a, const BackwardArgs& g, const ProblemShape& s) {
  require_like(g.o, "o", s.tq, s.hq, s.d);
  require_like(g.d_o, "d_o", s.tq, s.hq, s.d);
  require_lse(g.lse, "lse", s);
  if (!g.delta.empty()) require_lse(g.delta, "delta", s);
  require_like(g.dq, "dq", s.tq, s.hq, s.d);
  require_like(g.dk, "dk", s.tk, s.hkv, s.d);
  require_like(g.dv, "dv", s.tk, s.hkv, s.d);
  for (const auto* t : {&g.dq, &g.dk, &g.dv}) {
    LONGATTN_INVALID(t->dtype == DType::f32 || (t->dtype == a.q.dtype && !g.accumulate),
                     "gradients must be fp32 (or {} without accumulate), got {}", to_string(a.q.dtype), t->describe());
  }
}

std::vector<std::int32_t> host_cu_seqlens(const std::int32_t* cu, int batch, std::int64_t tokens, const char* which) {
  if (!cu) return {0, static_cast<std::int32_t>(tokens)};
  std::vector<std::int32_t> out(cu, cu + batch + 1);
  LONGATTN_INVALID(out.front() == 0, "{}[0] must be 0, got {}", which, out.front());
  for (int b = 0; b < batch; ++b)
    LONGATTN_INVALID(out[b + 1] >= out[b], "{} must be non-decreasing, but [{}]={} > [{}]={}", which, b, out[b], b + 1,
                     out[b + 1]);
  LONGATTN_INVALID(out.back() == tokens, "{} ends at {} but the tensor has {} tokens", which, out.back(), tokens);
  return out;
}

ProblemShape validate_call(const AttentionArgs& args, const ForwardOutputs& out) {
  const ProblemShape s = validate_inputs(args);
  validate_forward(args, out, s);
  return s;
}

ProblemShape validate_call(const AttentionArgs& args, const BackwardArgs& g) {
  const ProblemShape s = validate_inputs(args);
  validate_backward(args, g, s);
  return s;
}

}  // namespace longattn::kernels

namespace longattn {
float AttentionArgs::effective_scale() const noexcept {
  return scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(q.ndim == 3 ? q.dim(2) : 1));
}
}  // namespace longattn
