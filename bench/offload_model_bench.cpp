// longattn-bench offload-model: the deployment model of attention offloading (offload/
// deployment_model.hpp) for a model shape, batch and context: predicted decode tokens/s and cost per
// million tokens for each number of micro-batches and attention servers asked for, the all-on-GPU
// alternative (its largest batch that fits), and the number of servers that balances the pipeline.
// Modelled, not measured: feed it measured rates (docs/offload.md says which and how).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/error.hpp"
#include "offload/deployment_model.hpp"

namespace longattn::bench {
namespace {

constexpr const char* kUsage =
    "longattn-bench offload-model [shape] [deployment] [rates] [prices]\n"
    "Predicts offloaded decode (G compute GPUs, S attention servers, N micro-batches in flight) and the\n"
    "all-on-GPU alternative from the model's shape and measured rates; prints a row per N x S, then a\n"
    "RESULT {json} line. Every price and rate is an input: defaults are placeholders, not measurements.\n"
    "  shape:  --layers 80 --hidden 8192 --heads 64 --kv-heads 8 --head-dim 128 --ffn 28672\n"
    "          --dtype-bytes 2 (weights and KV)\n"
    "  run:    --batch 64 --context 32768 --micro-batches 1,2,3 (a list)\n"
    "  GPUs:   --gpus 8 and either --gpu-token-ms T (measured time of one token through one layer on one\n"
    "          GPU) or --gpu-tflops R (its GEMM rate; default 400), --gpu-fixed-ms F (per micro-batch and\n"
    "          layer, default 0), --gpu-memory-gib 80, --gpu-hbm-gbps 3350 (all-on-GPU attention rate),\n"
    "          --gpu-price P ($ per GPU-hour, default 0: not priced)\n"
    "  servers: --servers 1,2,4,8 (a list), --server-gbps B (measured decode-kernel KV rate per server,\n"
    "          GB/s; default 80), --server-memory-gib M (0: unlimited), --link-gbps L (GB/s per server\n"
    "          link, 0: free; default 12.5), --link-latency-us U (round trip, default 50),\n"
    "          --server-price P ($ per server-hour, default 0: not priced)\n";

// A non-negative decimal flag, refused in one line when it is not a number.
double number(const examples::Flags& f, const std::string& name, double fallback) {
  if (!f.has(name)) return fallback;
  const std::string text = f.str(name, "");
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v) || v < 0)
    throw Error(ErrorCode::invalid_argument, fmt::format("--{} needs a non-negative number, got '{}'", name, text));
  return v;
}

std::string money(double dollars, bool priced) { return priced && std::isfinite(dollars) ? fmt::format("{:.3f}", dollars) : "-"; }
std::string money_json(double dollars, bool priced) { return priced && std::isfinite(dollars) ? fmt::format("{:.6g}", dollars) : "null"; }

int run_offload_model(int argc, char** argv) {
  const examples::Flags f(argc, argv, kUsage,
                          {"layers", "hidden", "heads", "kv-heads", "head-dim", "ffn", "dtype-bytes", "batch", "context", "micro-batches",
                           "gpus", "gpu-token-ms", "gpu-tflops", "gpu-fixed-ms", "gpu-memory-gib", "gpu-hbm-gbps", "gpu-price", "servers",
                           "server-gbps", "server-memory-gib", "link-gbps", "link-latency-us", "server-price"},
                          {});
  constexpr long long kMaxInt = std::numeric_limits<int>::max();
  offload::Deployment d;
  d.shape.layers = static_cast<int>(f.integer("layers", 80, 1, 100000));
  d.shape.hidden = static_cast<int>(f.integer("hidden", 8192, 1, kMaxInt));
  d.shape.heads = static_cast<int>(f.integer("heads", 64, 1, 100000));
  d.shape.kv_heads = static_cast<int>(f.integer("kv-heads", 8, 1, 100000));
  d.shape.head_dim = static_cast<int>(f.integer("head-dim", 128, 1, 100000));
  d.shape.ffn_hidden = f.integer("ffn", 28672, 0, kMaxInt);
  d.shape.dtype_bytes = static_cast<int>(f.integer("dtype-bytes", 2, 1, 4));
  d.batch = static_cast<int>(f.integer("batch", 64, 1, kMaxInt));
  d.context = f.integer("context", 32768, 0, std::int64_t{1} << 40);
  const auto micro = f.integers("micro-batches", {1, 2, 3}, 1, kMaxInt);
  d.gpus.gpus = static_cast<int>(f.integer("gpus", 8, 1, 1 << 20));
  if (f.has("gpu-token-ms") && f.has("gpu-tflops"))
    throw Error(ErrorCode::invalid_argument, "give --gpu-token-ms (measured) or --gpu-tflops (a GEMM rate), not both");
  d.gpus.seconds_per_token_layer = number(f, "gpu-token-ms", 0) * 1e-3;
  d.gpus.gemm_flops = d.gpus.seconds_per_token_layer > 0 ? 0 : number(f, "gpu-tflops", 400) * 1e12;
  d.gpus.fixed_seconds_per_layer = number(f, "gpu-fixed-ms", 0) * 1e-3;
  d.gpus.memory_bytes = number(f, "gpu-memory-gib", 80) * double(1 << 30);
  d.gpus.hbm_bytes_per_s = number(f, "gpu-hbm-gbps", 3350) * 1e9;
  d.gpus.price_per_hour = number(f, "gpu-price", 0);
  const auto servers = f.integers("servers", {1, 2, 4, 8}, 1, 1 << 20);
  d.attention.kv_bytes_per_s = number(f, "server-gbps", 80) * 1e9;
  d.attention.memory_bytes = number(f, "server-memory-gib", 0) * double(1 << 30);
  d.attention.link_bytes_per_s = number(f, "link-gbps", 12.5) * 1e9;
  d.attention.link_latency_s = number(f, "link-latency-us", 50) * 1e-6;
  d.attention.price_per_hour = number(f, "server-price", 0);
  const bool priced = d.gpus.price_per_hour > 0 || d.attention.price_per_hour > 0;
  for (long long n : micro) {  // refused before anything is printed
    d.micro_batches = static_cast<int>(n);
    offload::validate(d);
  }

  std::printf("offload-model (modelled): %d layers, hidden %d, %d/%d heads x %d, ffn %lld, %d-byte values; batch %d, context %lld\n",
              d.shape.layers, d.shape.hidden, d.shape.heads, d.shape.kv_heads, d.shape.head_dim, static_cast<long long>(d.shape.ffn_hidden),
              d.shape.dtype_bytes, d.batch, static_cast<long long>(d.context));
  std::printf("  %d GPU(s): %s, %.0f GiB, %.0f GB/s HBM, $%.3f/h each; servers: %.1f GB/s KV each, link %.2f GB/s + %.0f us, $%.3f/h each%s\n",
              d.gpus.gpus,
              d.gpus.seconds_per_token_layer > 0 ? fmt::format("{:.4f} ms per token and layer", d.gpus.seconds_per_token_layer * 1e3).c_str()
                                                 : fmt::format("{:.0f} TFLOP/s", d.gpus.gemm_flops / 1e12).c_str(),
              d.gpus.memory_bytes / double(1 << 30), d.gpus.hbm_bytes_per_s / 1e9, d.gpus.price_per_hour, d.attention.kv_bytes_per_s / 1e9,
              d.attention.link_bytes_per_s / 1e9, d.attention.link_latency_s * 1e6, d.attention.price_per_hour,
              priced ? "" : " (no prices given: costs not shown)");
  std::printf("  KV of the batch: %.1f GiB; weights: %.1f GiB\n\n",
              static_cast<double>(d.batch) * static_cast<double>(d.context) * d.shape.layers * d.shape.kv_bytes_per_token_layer() / double(1 << 30),
              d.shape.weight_bytes() / double(1 << 30));
  std::printf("%4s %7s %10s %10s %10s %12s %12s %10s %9s\n", "N", "servers", "gpu ms", "attn ms", "step ms", "tokens/s", "bound tok/s",
              "$/M tok", "KV fits");
  std::string rows;
  for (long long n : micro) {
    d.micro_batches = static_cast<int>(n);
    for (long long s : servers) {
      d.attention.servers = static_cast<int>(s);
      const auto p = offload::predict_offloaded(d);
      std::printf("%4lld %7lld %10.3f %10.3f %10.2f %12.1f %12.1f %10s %9s\n", n, s, p.compute_s * 1e3, p.attention_s * 1e3, p.step_s * 1e3,
                  p.tokens_per_s, p.bound_tokens_per_s, money(p.cost_per_million_tokens, priced).c_str(), p.kv_fits ? "yes" : "no");
      rows += fmt::format("{}{{\"micro_batches\":{},\"servers\":{},\"gpu_ms\":{:.6g},\"attention_ms\":{:.6g},\"step_ms\":{:.6g},"
                          "\"tokens_per_s\":{:.6g},\"bound_tokens_per_s\":{:.6g},\"cost_per_million_tokens\":{},\"kv_fits\":{}}}",
                          rows.empty() ? "" : ",", n, s, p.compute_s * 1e3, p.attention_s * 1e3, p.step_s * 1e3, p.tokens_per_s,
                          p.bound_tokens_per_s, money_json(p.cost_per_million_tokens, priced), p.kv_fits ? "true" : "false");
    }
  }
  std::string balanced;
  std::printf("\n");
  for (long long n : micro) {
    d.micro_batches = static_cast<int>(n);
    const int s = offload::balanced_servers(d);
    if (s < 0) {
      std::printf("  N = %lld: no number of servers balances the pipeline (one round trip outlasts the GPUs' micro-batch)\n", n);
    } else {
      d.attention.servers = s;
      const auto p = offload::predict_offloaded(d);
      std::printf("  N = %lld: %d server(s) balance the pipeline: %.1f tokens/s, $%s per M tokens\n", n, s, p.tokens_per_s,
                  money(p.cost_per_million_tokens, priced).c_str());
    }
    balanced += fmt::format("{}{{\"micro_batches\":{},\"servers\":{}}}", balanced.empty() ? "" : ",", n, s < 0 ? "null" : std::to_string(s));
  }
  const int gpu_batch = offload::largest_gpu_batch(d);
  std::string gpu_json = "null";
  if (gpu_batch == 0) {
    std::printf("  all on the GPUs: not even one sequence of %lld tokens fits beside the weights\n", static_cast<long long>(d.context));
  } else {
    const auto g = offload::predict_all_on_gpu(d, gpu_batch);
    std::printf("  all on the GPUs: at most %d sequences fit (batch %d %s): %.1f tokens/s, $%s per M tokens\n", gpu_batch, d.batch,
                d.batch <= gpu_batch ? "fits" : "does not fit", g.tokens_per_s, money(g.cost_per_million_tokens, priced).c_str());
    gpu_json = fmt::format("{{\"largest_batch\":{},\"tokens_per_s\":{:.6g},\"cost_per_million_tokens\":{}}}", gpu_batch, g.tokens_per_s,
                           money_json(g.cost_per_million_tokens, priced));
  }
  std::printf("RESULT {\"bench\":\"offload-model\",\"modelled\":true,\"layers\":%d,\"hidden\":%d,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
              "\"batch\":%d,\"context\":%lld,\"gpus\":%d,\"gpu_price\":%.6g,\"server_price\":%.6g,\"rows\":[%s],\"balanced\":[%s],"
              "\"all_on_gpu\":%s,\"batch_fits_on_gpus\":%s}\n",
              d.shape.layers, d.shape.hidden, d.shape.heads, d.shape.kv_heads, d.shape.head_dim, d.batch, static_cast<long long>(d.context),
              d.gpus.gpus, d.gpus.price_per_hour, d.attention.price_per_hour, rows.c_str(), balanced.c_str(), gpu_json.c_str(),
              d.batch <= gpu_batch ? "true" : "false");
  return 0;
}

const Register kRegister("offload-model",
                         "attention offloading's deployment model: tokens/s and cost per million tokens by micro-batches and servers, "
                         "against all on the GPUs (modelled)",
                         run_offload_model);

}  // namespace
}  // namespace longattn::bench
