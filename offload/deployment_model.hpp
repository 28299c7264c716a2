// The deployment model of attention offloading: given a model's shape, a batch and context, G
// compute GPUs and S attention servers with their measured rates and hourly prices, it predicts
// decode tokens/s and cost per million tokens, the all-on-GPU alternative (the largest batch whose
// KV fits beside the weights, attention on the GPUs), and the S that balances the pipeline.
// Pure arithmetic (no I/O), so every formula can be checked by hand; docs/offload.md explains how
// an operator feeds it measured numbers.
//
// The pipeline: the batch is cut into N micro-batches. Per layer a micro-batch needs c seconds on
// the GPUs (its linear layers) and then a seconds on the attention side (the servers read its KV,
// plus one round trip on the link). Each side serves one micro-batch at a time, and a micro-batch
// cannot start layer l+1 before its attention of layer l is back, so one layer of all N takes
// max(c + a, N c, N a): with N = 1 the two sides take turns, with N >= 2 the slower side sets the
// pace once c + a <= N max(c, a).
#pragma once

#include <cstdint>
#include <string>

namespace longattn::offload {

struct ModelShape {
  int layers = 80, hidden = 8192, heads = 64, kv_heads = 8, head_dim = 128;
  std::int64_t ffn_hidden = 28672;  // gated MLP width (0: no MLP, as in offload_decode's model)
  int dtype_bytes = 2;              // of weights and KV
  // Weights of one layer: q, k, v, o projections and a gated MLP (three matrices).
  double layer_params() const;
  double weight_bytes() const { return layer_params() * layers * dtype_bytes; }
  // KV bytes of one token in one layer (k and v).
  double kv_bytes_per_token_layer() const { return 2.0 * kv_heads * head_dim * dtype_bytes; }
};

struct ComputeSide {
  int gpus = 1;
  // Either the measured time of one token through one layer (seconds, > 0 wins) or the rate of
  // the GEMMs (flop/s per GPU): 2 flops per weight per token, and no faster than reading the
  // layer's weights at hbm_bytes_per_s.
  double seconds_per_token_layer = 0;
  double gemm_flops = 0;
  double fixed_seconds_per_layer = 0;  // per micro-batch and layer whatever its size (launches, sync)
  double memory_bytes = 80e9;          // per GPU
  double hbm_bytes_per_s = 3.0e12;     // per GPU: its attention rate when KV stays on it
  double price_per_hour = 0;           // per GPU
};

struct AttentionSide {
  int servers = 1;
  double kv_bytes_per_s = 0;     // per server: its decode kernel's measured KV read rate
  double memory_bytes = 0;       // per server, for KV (0: unlimited)
  double link_bytes_per_s = 0;   // per server link (0: free)
  double link_latency_s = 0;     // one round trip
  double price_per_hour = 0;     // per server
};

struct Deployment {
  ModelShape shape;
  int batch = 1;
  std::int64_t context = 0;
  int micro_batches = 1;
  ComputeSide gpus;
  AttentionSide attention;
};

struct Prediction {
  double compute_s = 0;     // c: GPU time per micro-batch and layer
  double attention_s = 0;   // a: attention-side time per micro-batch and layer (kernel + link)
  double kernel_s = 0;      // the servers' part of a
  double link_s = 0;        // the link's part of a (bytes and latency)
  double step_s = 0;        // one token for every sequence of the batch
  double tokens_per_s = 0;
  double bound_tokens_per_s = 0;  // batch / (layers N max(c, a)): perfect overlap
  double kv_bytes = 0;            // the batch's KV, all layers
  bool kv_fits = true;            // on the servers' memory
  double cost_per_million_tokens = 0;  // (G GPU + S server prices) per hour over tokens per hour
};

// The offloaded deployment as described.
Prediction predict_offloaded(const Deployment& d);

// Everything on the GPUs: weights and KV in their memory, attention read at HBM speed after the
// linear layers (no overlap). batch is the deployment's, or largest_gpu_batch() when asked.
struct GpuOnly {
  int batch = 0;
  double step_s = 0, tokens_per_s = 0, cost_per_million_tokens = 0;
  bool fits = false;
};
GpuOnly predict_all_on_gpu(const Deployment& d, int batch);

// The largest batch whose KV (context tokens each) fits in the G GPUs' memory beside the weights,
// keeping `reserve_fraction` of the memory for activations and workspaces; 0 when none does.
int largest_gpu_batch(const Deployment& d, double reserve_fraction = 0.1);

// The fewest servers whose attention time per micro-batch is no more than the compute time (and
// whose memory holds the KV); -1 when no number of servers can (the link alone is slower).
int balanced_servers(const Deployment& d);

// Throws Error(invalid_argument) naming the first input that cannot describe a deployment.
void validate(const Deployment& d);

}  // namespace longattn::offload
