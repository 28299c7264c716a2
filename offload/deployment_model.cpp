// The offload deployment model's arithmetic (see deployment_model.hpp).
#include "offload/deployment_model.hpp"

#include <algorithm>
#include <cmath>

#include "common/check.hpp"

namespace longattn::offload {
namespace {

double micro_batch_size(const Deployment& d) { return static_cast<double>(d.batch) / d.micro_batches; }

// GPU time of `tokens` tokens through one layer: as measured per token, or from the GEMM rate,
// where a decode-sized GEMM is bounded by reading the layer's weights from HBM (each micro-batch
// reads them again).
double compute_seconds(const Deployment& d, double tokens) {
  const ComputeSide& g = d.gpus;
  if (g.seconds_per_token_layer > 0) return tokens * g.seconds_per_token_layer / g.gpus + g.fixed_seconds_per_layer;
  const double flops_s = tokens * 2.0 * d.shape.layer_params() / (g.gpus * g.gemm_flops);
  const double weights_s = d.shape.layer_params() * d.shape.dtype_bytes / (g.gpus * g.hbm_bytes_per_s);
  return std::max(flops_s, weights_s) + g.fixed_seconds_per_layer;
}

// Bytes one micro-batch moves over the links per layer: q and the new k, v out; o and lse back.
double link_bytes(const Deployment& d, double tokens) {
  const ModelShape& s = d.shape;
  const double q_row = static_cast<double>(s.heads) * s.head_dim * 4;
  return tokens * (2 * q_row + s.kv_bytes_per_token_layer() + static_cast<double>(s.heads) * 4);
}

double per_million(double price_per_hour, double tokens_per_s) {
  return tokens_per_s > 0 ? price_per_hour / 3600.0 / tokens_per_s * 1e6 : INFINITY;
}

}  // namespace

double ModelShape::layer_params() const {
  const double h = hidden, qd = static_cast<double>(heads) * head_dim, kvd = static_cast<double>(kv_heads) * head_dim;
  return h * qd + 2 * h * kvd + qd * h + 3 * h * static_cast<double>(ffn_hidden);
}

void validate(const Deployment& d) {
  const ModelShape& s = d.shape;
  LONGATTN_INVALID(s.layers >= 1 && s.hidden >= 1 && s.heads >= 1 && s.kv_heads >= 1 && s.head_dim >= 1 && s.ffn_hidden >= 0,
                   "model shape: layers, hidden, heads, kv heads and head dim must be positive (ffn >= 0)");
  LONGATTN_INVALID(s.heads % s.kv_heads == 0, "model shape: heads {} is not a multiple of kv heads {}", s.heads, s.kv_heads);
  LONGATTN_INVALID(s.dtype_bytes == 1 || s.dtype_bytes == 2 || s.dtype_bytes == 4, "model shape: dtype bytes must be 1, 2 or 4, got {}",
                   s.dtype_bytes);
  LONGATTN_INVALID(d.batch >= 1 && d.context >= 0, "batch must be >= 1 and context >= 0");
  LONGATTN_INVALID(d.micro_batches >= 1 && d.micro_batches <= d.batch, "micro-batches {} outside [1, batch {}]", d.micro_batches, d.batch);
  LONGATTN_INVALID(d.gpus.gpus >= 1, "compute GPUs must be >= 1");
  LONGATTN_INVALID(d.gpus.seconds_per_token_layer > 0 || d.gpus.gemm_flops > 0,
                   "compute side: give the GPUs' time per token and layer or their GEMM rate (flop/s)");
  LONGATTN_INVALID(d.gpus.fixed_seconds_per_layer >= 0 && d.gpus.memory_bytes > 0 && d.gpus.hbm_bytes_per_s > 0 && d.gpus.price_per_hour >= 0,
                   "compute side: memory and HBM rate must be positive, fixed time and price >= 0");
  const AttentionSide& a = d.attention;
  LONGATTN_INVALID(a.servers >= 1 && a.kv_bytes_per_s > 0, "attention side: servers must be >= 1 with a measured KV rate (bytes/s) > 0");
  LONGATTN_INVALID(a.memory_bytes >= 0 && a.link_bytes_per_s >= 0 && a.link_latency_s >= 0 && a.price_per_hour >= 0,
                   "attention side: memory, link rate, latency and price must be >= 0");
}

Prediction predict_offloaded(const Deployment& d) {
  validate(d);
  const ModelShape& s = d.shape;
  const AttentionSide& at = d.attention;
  const double m = micro_batch_size(d), n = d.micro_batches, servers = at.servers;
  Prediction p;
  p.compute_s = compute_seconds(d, m);
  // Sequences (or their token ranges) spread evenly over the servers, which read in parallel.
  p.kernel_s = m * static_cast<double>(d.context) * s.kv_bytes_per_token_layer() / (servers * at.kv_bytes_per_s);
  p.link_s = (at.link_bytes_per_s > 0 ? link_bytes(d, m) / (servers * at.link_bytes_per_s) : 0) + at.link_latency_s;
  p.attention_s = p.kernel_s + p.link_s;
  const double layer_s = std::max({p.compute_s + p.attention_s, n * p.compute_s, n * p.attention_s});
  p.step_s = s.layers * layer_s;
  p.tokens_per_s = d.batch / p.step_s;
  p.bound_tokens_per_s = d.batch / (s.layers * n * std::max(p.compute_s, p.attention_s));
  p.kv_bytes = static_cast<double>(d.batch) * static_cast<double>(d.context) * s.layers * s.kv_bytes_per_token_layer();
  p.kv_fits = at.memory_bytes == 0 || p.kv_bytes <= servers * at.memory_bytes;
  p.cost_per_million_tokens = per_million(d.gpus.gpus * d.gpus.price_per_hour + servers * at.price_per_hour, p.tokens_per_s);
  return p;
}

int largest_gpu_batch(const Deployment& d, double reserve_fraction) {
  validate(d);
  LONGATTN_INVALID(reserve_fraction >= 0 && reserve_fraction < 1, "reserve fraction {} outside [0, 1)", reserve_fraction);
  const ModelShape& s = d.shape;
  const double room = d.gpus.gpus * d.gpus.memory_bytes * (1 - reserve_fraction) - s.weight_bytes();
  const double per_sequence = static_cast<double>(std::max<std::int64_t>(d.context, 1)) * s.layers * s.kv_bytes_per_token_layer();
  if (room < per_sequence) return 0;
  return static_cast<int>(std::min(std::floor(room / per_sequence), 1e9));
}

GpuOnly predict_all_on_gpu(const Deployment& d, int batch) {
  validate(d);
  LONGATTN_INVALID(batch >= 1, "all-on-GPU batch must be >= 1");
  const ModelShape& s = d.shape;
  GpuOnly g;
  g.batch = batch;
  g.fits = batch <= largest_gpu_batch(d);
  const double kv_read = static_cast<double>(batch) * static_cast<double>(d.context) * s.kv_bytes_per_token_layer();
  g.step_s = s.layers * (compute_seconds(d, batch) + kv_read / (d.gpus.gpus * d.gpus.hbm_bytes_per_s));
  g.tokens_per_s = batch / g.step_s;
  g.cost_per_million_tokens = per_million(d.gpus.gpus * d.gpus.price_per_hour, g.tokens_per_s);
  return g;
}

int balanced_servers(const Deployment& d) {
  validate(d);
  const ModelShape& s = d.shape;
  const AttentionSide& at = d.attention;
  const double m = micro_batch_size(d);
  const double c = compute_seconds(d, m);
  // a(S) = (kernel work + link bytes) / S + latency <= c.
  const double work = m * static_cast<double>(d.context) * s.kv_bytes_per_token_layer() / at.kv_bytes_per_s +
                      (at.link_bytes_per_s > 0 ? link_bytes(d, m) / at.link_bytes_per_s : 0);
  if (c <= at.link_latency_s) return -1;
  double need = std::ceil(work / (c - at.link_latency_s) - 1e-9);
  if (at.memory_bytes > 0) {
    const double kv = static_cast<double>(d.batch) * static_cast<double>(d.context) * s.layers * s.kv_bytes_per_token_layer();
    need = std::max(need, std::ceil(kv / at.memory_bytes - 1e-9));
  }
  return static_cast<int>(std::clamp(need, 1.0, 1e9));
}

}  // namespace longattn::offload
