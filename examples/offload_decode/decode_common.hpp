// What offload_decode's CPU and GPU loops share: the run's configuration, the servers' KV bytes
// and the --check reference (local attention over f32 copies of the KV with the "cpu" backend).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "longattn/offload_client.hpp"

namespace offload_decode {

struct Config {
  int layers = 4, batch = 4, steps = 16, heads = 8, kv_heads = 2, head_dim = 64;
  std::int64_t context = 4096;
  longattn::DType dtype = longattn::DType::bf16;
  bool check = false;
  std::uint64_t seed = 1;
  int micro_batches = 1;
  bool find_max_batch = false;  // --device cuda: report the largest batch that fits and exit  // sequences split into this many groups, each with one layer's attention in flight
  bool local_attention = false;  // --device cuda only: KV in GPU memory, attention by the cuda backend
  longattn::offload::ClientOptions client;  // servers empty with local_attention
  int hidden() const { return heads * head_dim; }
  std::size_t kv_row() const { return static_cast<std::size_t>(kv_heads) * head_dim; }  // elements per token and k or v
};

// One unlabelled metric of every server, by server index (-1 where a server does not report it).
// A server the client took out of service (with --replicas: it failed, the decode went on without
// it) is not asked: it is likely dead, and its copy of the KV is not counted anyway.
inline std::vector<double> servers_metric(longattn::offload::Client& c, std::size_t servers, const std::string& name) {
  std::vector<double> values(servers, -1);
  const std::string prefix = name + " ";
  for (std::size_t i = 0; i < servers; ++i) {
    if (!c.serving(static_cast<int>(i))) continue;
    std::string text;
    try {
      text = c.server_stats(static_cast<int>(i)).get();
    } catch (const longattn::Error&) {
      continue;  // a failed server (with --replicas the decode went on without it)
    }
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);)
      if (line.rfind(prefix, 0) == 0) values[i] = std::strtod(line.c_str() + prefix.size(), nullptr);
  }
  return values;
}

// KV bytes the serving servers hold (their longattn_offload_kv_bytes gauges, summed): what
// offloading keeps out of GPU memory. -1 when a serving server's metrics cannot be read.
inline double servers_kv_bytes(longattn::offload::Client& c, std::size_t servers) {
  double sum = 0;
  const auto values = servers_metric(c, servers, "longattn_offload_kv_bytes");
  for (std::size_t i = 0; i < servers; ++i) {
    if (!c.serving(static_cast<int>(i))) continue;
    if (values[i] < 0) return -1;
    sum += values[i];
  }
  return sum;
}

// The local answer for one layer: kcache/vcache[b] hold f32 copies of sequence b's KV; q [B, H, D]
// f32; returns max |difference| of o [B, H, D] and lse (lse_bh: [B][H] when true, else [H][B]).
inline double check_against_local(longattn::AttentionBackend& local, const Config& c, std::vector<std::vector<float>>& kcache,
                                  std::vector<std::vector<float>>& vcache, const float* q, const float* o, const float* lse,
                                  bool lse_bh) {
  using namespace longattn;
  const int B = c.batch, H = c.heads, K = c.kv_heads, D = c.head_dim;
  const std::size_t row = c.kv_row();
  std::vector<float> kd, vd, ro(static_cast<std::size_t>(B) * H * D), rl(static_cast<std::size_t>(B) * H);
  std::vector<std::int32_t> cu_q{0}, cu_k{0};
  for (int b = 0; b < B; ++b) {
    kd.insert(kd.end(), kcache[b].begin(), kcache[b].end());
    vd.insert(vd.end(), vcache[b].begin(), vcache[b].end());
    cu_q.push_back(b + 1);
    cu_k.push_back(static_cast<std::int32_t>(kd.size() / row));
  }
  AttentionArgs a;
  const std::int64_t tk = static_cast<std::int64_t>(kd.size() / row);
  a.q = TensorView(const_cast<float*>(q), DType::f32, {B, H, D});
  a.k = TensorView(kd.data(), DType::f32, {tk, K, D});
  a.v = TensorView(vd.data(), DType::f32, {tk, K, D});
  a.cu_seqlens_q = cu_q.data();
  a.cu_seqlens_k = cu_k.data();
  a.batch = B;
  local.forward(a, {TensorView(ro.data(), DType::f32, {B, H, D}), TensorView(rl.data(), DType::f32, {H, B})});
  double err = 0;
  for (std::size_t i = 0; i < ro.size(); ++i) err = std::max(err, static_cast<double>(std::abs(o[i] - ro[i])));
  for (int h = 0; h < H; ++h)
    for (int b = 0; b < B; ++b) {
      const float got = lse_bh ? lse[static_cast<std::size_t>(b) * H + h] : lse[static_cast<std::size_t>(h) * B + b];
      err = std::max(err, static_cast<double>(std::abs(got - rl[static_cast<std::size_t>(h) * B + b])));
    }
  return err;
}

// The decode loop on the GPU (gpu_decode.cpp); only where built with CUDA.
int run_gpu(const Config& c);

}  // namespace offload_decode
