// Reference attention in double precision. O(T^2) per sequence and single-threaded per head on
// purpose: its only job is to be obviously right.
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu_kernels.hpp"
#include "kernels/validate.hpp"
#include "longattn/dtype_convert.hpp"

namespace longattn::kernels {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

std::vector<double> to_double(const TensorView& t) {
  std::vector<double> out(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = load_as_f32(t.data, t.dtype, i);
  return out;
}

// Scaled scores of one query row against the keys of its sequence; masked keys get -inf.
struct Row {
  std::vector<double> s;
  double max = kNegInf;
};

struct Context {
  ProblemShape sh;
  std::vector<std::int32_t> cq, ck;
  std::vector<double> q, k, v;
  double scale;
};

Context make_context(const AttentionArgs& a, const ProblemShape& sh) {
  Context c{sh, host_cu_seqlens(a.cu_seqlens_q, a.batch, sh.tq, "cu_seqlens_q"),
            host_cu_seqlens(a.cu_seqlens_k, a.batch, sh.tk, "cu_seqlens_k"), to_double(a.q), to_double(a.k),
            to_double(a.v), a.effective_scale()};
  return c;
}

void scores(const AttentionArgs& a, const Context& c, int b, std::int64_t i, int h, Row& row) {
  const int hk = h / c.sh.group();
  const std::int64_t k0 = c.ck[b], k1 = c.ck[b + 1];
  const int qpos = token_position(a.q_positions, i, i - c.cq[b]);
  row.s.assign(static_cast<std::size_t>(k1 - k0), kNegInf);
  row.max = kNegInf;
  const double* qi = &c.q[(static_cast<std::size_t>(i) * c.sh.hq + h) * c.sh.d];
  for (std::int64_t j = k0; j < k1; ++j) {
    if (a.causal && token_position(a.k_positions, j, j - k0) > qpos) continue;
    const double* kj = &c.k[(static_cast<std::size_t>(j) * c.sh.hkv + hk) * c.sh.d];
    double dot = 0;
    for (int x = 0; x < c.sh.d; ++x) dot += qi[x] * kj[x];
    row.s[static_cast<std::size_t>(j - k0)] = dot * c.scale;
    row.max = std::max(row.max, dot * c.scale);
  }
}

}  // namespace

void reference_forward(const AttentionArgs& a, const ForwardOutputs& out) {
  const auto sh = validate_call(a, out);
  const auto c = make_context(a, sh);
  Row row;
  std::vector<double> acc(static_cast<std::size_t>(sh.d));
  for (int b = 0; b < a.batch; ++b) {
    for (std::int64_t i = c.cq[b]; i < c.cq[b + 1]; ++i) {
      for (int h = 0; h < sh.hq; ++h) {
        scores(a, c, b, i, h, row);
        std::fill(acc.begin(), acc.end(), 0.0);
        double sum = 0;
        if (row.max != kNegInf) {
          for (std::size_t j = 0; j < row.s.size(); ++j) {
            if (row.s[j] == kNegInf) continue;
            const double p = std::exp(row.s[j] - row.max);
            sum += p;
            const double* vj = &c.v[((static_cast<std::size_t>(c.ck[b]) + j) * sh.hkv + h / sh.group()) * sh.d];
            for (int x = 0; x < sh.d; ++x) acc[x] += p * vj[x];
          }
        }
        const double lse = sum > 0 ? row.max + std::log(sum) : kNegInf;
        const std::size_t base = (static_cast<std::size_t>(i) * sh.hq + h) * sh.d;
        for (int x = 0; x < sh.d; ++x) store_from_f32(out.o.data, out.o.dtype, base + x, sum > 0 ? float(acc[x] / sum) : 0.0f);
        out.lse.as<float>()[static_cast<std::size_t>(h) * sh.tq + i] = static_cast<float>(lse);
      }
    }
  }
}

void reference_backward(const AttentionArgs& a, const BackwardArgs& g) {
  const auto sh = validate_call(a, g);
  const auto c = make_context(a, sh);
  const auto o = to_double(g.o), d_o = to_double(g.d_o);
  std::vector<double> dq(c.q.size(), 0.0), dk(c.k.size(), 0.0), dv(c.v.size(), 0.0);
  Row row;
  for (int b = 0; b < a.batch; ++b) {
    for (std::int64_t i = c.cq[b]; i < c.cq[b + 1]; ++i) {
      for (int h = 0; h < sh.hq; ++h) {
        const double lse = g.lse.as<const float>()[static_cast<std::size_t>(h) * sh.tq + i];
        if (lse == kNegInf) continue;  // the row saw nothing: no gradient flows
        const std::size_t qi = (static_cast<std::size_t>(i) * sh.hq + h) * sh.d;
        double delta = 0;
        if (!g.delta.empty()) {
          delta = g.delta.as<const float>()[static_cast<std::size_t>(h) * sh.tq + i];
        } else {
          for (int x = 0; x < sh.d; ++x) delta += o[qi + x] * d_o[qi + x];
        }
        scores(a, c, b, i, h, row);
        for (std::size_t j = 0; j < row.s.size(); ++j) {
          if (row.s[j] == kNegInf) continue;
          const std::size_t kj = ((static_cast<std::size_t>(c.ck[b]) + j) * sh.hkv + h / sh.group()) * sh.d;
          const double p = std::exp(row.s[j] - lse);
          double dp = 0;
          for (int x = 0; x < sh.d; ++x) dp += d_o[qi + x] * c.v[kj + x];
          const double ds = p * (dp - delta) * c.scale;
          for (int x = 0; x < sh.d; ++x) {
            dq[qi + x] += ds * c.k[kj + x];
            dk[kj + x] += ds * c.q[qi + x];
            dv[kj + x] += p * d_o[qi + x];
          }
        }
      }
    }
  }
  auto write = [&](const TensorView& t, const std::vector<double>& src) {
    for (std::size_t i = 0; i < src.size(); ++i) {
      const float prev = g.accumulate ? t.as<float>()[i] : 0.0f;
      store_from_f32(t.data, t.dtype, i, static_cast<float>(prev + src[i]));
    }
  };
  write(g.dq, dq);
  write(g.dk, dk);
  write(g.dv, dv);
}

}  // namespace longattn::kernels
