// Helpers of the offload tests: dense random KV for a batch of sequences, the reference answer for
// decode queries over it, and in-process servers on loopback with ephemeral ports.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu_kernels.hpp"
#include "longattn/dtype_convert.hpp"
#include "offload/server.hpp"

namespace longattn::offload::test {

inline const std::string kToken = "test-token-0123456789abcdef";

// Dense KV [len, kv_heads, head_dim] per sequence, values exact in `dtype`, both as raw bytes of
// that dtype (what is sent) and as f32 (what the reference reads).
struct DenseKv {
  DType dtype;
  int kv_heads, head_dim;
  std::vector<std::vector<std::byte>> k, v;  // per sequence
  std::vector<std::vector<float>> kf, vf;

  DenseKv(std::mt19937_64& rng, DType t, int kvh, int d, const std::vector<std::int64_t>& lens) : dtype(t), kv_heads(kvh), head_dim(d) {
    std::uniform_real_distribution<float> val(-1.0f, 1.0f);
    const std::size_t es = dtype_size(t);
    for (auto len : lens) {
      const std::size_t n = static_cast<std::size_t>(len) * kvh * d;
      for (int which = 0; which < 2; ++which) {
        std::vector<std::byte> raw(n * es);
        std::vector<float> f(n);
        for (std::size_t i = 0; i < n; ++i) {
          store_from_f32(raw.data(), t, i, val(rng));
          f[i] = load_as_f32(raw.data(), t, i);
        }
        (which ? v : k).push_back(std::move(raw));
        (which ? vf : kf).push_back(std::move(f));
      }
    }
  }
  std::size_t row_bytes() const { return static_cast<std::size_t>(kv_heads) * head_dim * dtype_size(dtype); }
  const std::byte* k_at(std::size_t s, std::int64_t t) const { return k[s].data() + static_cast<std::size_t>(t) * row_bytes(); }
  const std::byte* v_at(std::size_t s, std::int64_t t) const { return v[s].data() + static_cast<std::size_t>(t) * row_bytes(); }
};

// Reference decode: q_counts[s] query rows per sequence at the last positions of lens[s] tokens.
inline void reference_decode(const DenseKv& kv, const std::vector<std::int64_t>& lens, const std::vector<int>& q_counts, int q_heads,
                             const std::vector<float>& q, std::vector<float>& o, std::vector<float>& lse) {
  std::vector<float> k, v;
  std::vector<std::int32_t> cu_q{0}, cu_k{0}, pos_q, pos_k;
  for (std::size_t s = 0; s < lens.size(); ++s) {
    const std::size_t n = static_cast<std::size_t>(lens[s]) * kv.kv_heads * kv.head_dim;
    k.insert(k.end(), kv.kf[s].begin(), kv.kf[s].begin() + static_cast<std::ptrdiff_t>(n));
    v.insert(v.end(), kv.vf[s].begin(), kv.vf[s].begin() + static_cast<std::ptrdiff_t>(n));
    cu_q.push_back(cu_q.back() + q_counts[s]);
    cu_k.push_back(static_cast<std::int32_t>(cu_k.back() + lens[s]));
    for (int j = 0; j < q_counts[s]; ++j) pos_q.push_back(static_cast<std::int32_t>(lens[s] - q_counts[s] + j));
    for (std::int64_t t = 0; t < lens[s]; ++t) pos_k.push_back(static_cast<std::int32_t>(t));
  }
  const std::int64_t tq = cu_q.back(), tk = cu_k.back();
  k.resize(std::max<std::size_t>(k.size(), 1));
  v.resize(std::max<std::size_t>(v.size(), 1));
  o.assign(static_cast<std::size_t>(tq) * q_heads * kv.head_dim, 0.0f);
  lse.assign(static_cast<std::size_t>(tq) * q_heads, 0.0f);
  AttentionArgs a;
  a.q = TensorView(const_cast<float*>(q.data()), DType::f32, {tq, q_heads, kv.head_dim});
  a.k = TensorView(k.data(), DType::f32, {tk, kv.kv_heads, kv.head_dim});
  a.v = TensorView(v.data(), DType::f32, {tk, kv.kv_heads, kv.head_dim});
  a.cu_seqlens_q = cu_q.data();
  a.cu_seqlens_k = cu_k.data();
  a.batch = static_cast<int>(lens.size());
  a.causal = true;
  a.q_positions = pos_q.data();
  a.k_positions = pos_k.data();
  kernels::reference_forward(a, {TensorView(o.data(), DType::f32, {tq, q_heads, kv.head_dim}),
                                 TensorView(lse.data(), DType::f32, {q_heads, tq})});
}

inline std::unique_ptr<Server> start_server(std::size_t memory_limit = std::size_t{256} << 20, std::size_t per_client = 0,
                                            const std::string& metrics = "", const std::string& transport = "tcp") {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = kToken;
  o.io_threads = 2;
  o.compute_threads = 2;
  o.memory_limit = memory_limit;
  o.per_client_limit = per_client;
  o.metrics_listen = metrics;
  o.transport = transport;
  auto s = std::make_unique<Server>(o);
  s->start();
  return s;
}

inline std::string addr(const Server& s) { return "127.0.0.1:" + std::to_string(s.port()); }

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) || std::isinf(b[i])) {
      if (a[i] != b[i]) return 1e30;
      continue;
    }
    m = std::max(m, static_cast<double>(std::abs(a[i] - b[i])));
  }
  return a.size() == b.size() ? m : 1e30;
}

}  // namespace longattn::offload::test
