// longattn-bench strategies: the cost model's table of strategies, modelled, not measured. For each
// sequence length and rank count it prices every Ulysses x ring split U x R the shape allows
// (partition::rank_strategies: the all-to-alls inside groups of U consecutive ranks, the ring over
// the R groups behind its steps, zigzag for causal shapes) on a built-in machine (h100, h200, with
// the sources in bench/results/cost_model_defaults_2026-12-05.md) or on given kernel rates and
// links, and marks the fastest forward+backward. Attention alone unless --linear adds the linear
// layers of one transformer layer. Runs in milliseconds on any machine: it needs no device.
#include <algorithm>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/tensor.hpp"
#include "partition/cost_model.hpp"
#include "partition/machine_file.hpp"

namespace longattn::bench {
namespace {

struct Options {
  std::vector<long long> ranks = {8, 16, 32, 64, 128, 256, 512, 1024};
  std::vector<long long> seq_lens = {131072, 524288};
  int gpus_per_node = 8, q_heads = 32, kv_heads = 32, head_dim = 128;
  DType dtype = DType::bf16;
  bool causal = true, linear = false;
  std::string machine = "h200", rates_file, machine_file;
};

Options parse(int argc, char** argv) {
  static const char* const kUsage =
      "longattn-bench strategies [--machine h200|h100|cpu] [--rates-file F] [--machine-file F]\n"
      "  [--ranks 8,16,32,64,128,256,512,1024] [--gpus-per-node 8] [--seq-lens 131072,524288]\n"
      "  [--heads 32] [--kv-heads 32] [--head-dim 128] [--dtype bf16|fp16|fp32] [--full] [--linear]\n"
      "The cost model's modelled (not measured) forward and forward+backward time and per-GPU TFLOP/s\n"
      "of every Ulysses x ring split U x R the shape allows, the fastest marked '*'.\n"
      "  --machine       built-in machine model (kernel rates, links, linear layers)\n"
      "  --rates-file    a kernel-rate table (cost model text form) in place of the machine's rates\n"
      "  --machine-file  a machine file (rates, `link` lines, linear layers) applied over --machine\n"
      "  --ranks         GPU counts P to model; nodes hold --gpus-per-node of them\n"
      "  --full          no causal mask (default causal, zigzag over the ring dimension)\n"
      "  --linear        add the linear layers of one transformer layer to every time\n";
  const examples::Flags f(argc, argv, kUsage,
                          {"machine", "rates-file", "machine-file", "ranks", "gpus-per-node", "seq-lens", "heads", "kv-heads",
                           "head-dim", "dtype"},
                          {"full", "linear"});
  constexpr int kMax = std::numeric_limits<int>::max();
  Options o;
  o.machine = f.str("machine", o.machine);
  o.rates_file = f.str("rates-file", "");
  o.machine_file = f.str("machine-file", "");
  o.ranks = f.integers("ranks", o.ranks, 1, 1 << 20);
  o.seq_lens = f.integers("seq-lens", o.seq_lens, 1, std::numeric_limits<std::int32_t>::max());
  o.gpus_per_node = static_cast<int>(f.integer("gpus-per-node", o.gpus_per_node, 1, kMax));
  o.q_heads = static_cast<int>(f.integer("heads", o.q_heads, 1, kMax));
  o.kv_heads = static_cast<int>(f.integer("kv-heads", o.q_heads, 1, kMax));
  o.head_dim = static_cast<int>(f.integer("head-dim", o.head_dim, 1, kMax));
  if (f.has("dtype")) o.dtype = parse_dtype(f.str("dtype", ""));
  o.causal = !f.flag("full");
  o.linear = f.flag("linear");
  if (o.q_heads % o.kv_heads != 0)
    throw std::invalid_argument(fmt::format("--heads {} must be a multiple of --kv-heads {}", o.q_heads, o.kv_heads));
  return o;
}

partition::MachineModel machine_for(const Options& o) {
  auto m = partition::default_machine(o.machine);
  if (!o.rates_file.empty()) {
    m.rates = partition::load_rate_table(o.rates_file);
    m.name += " + " + o.rates_file;
  }
  if (!o.machine_file.empty()) m = partition::apply_machine_file(m, partition::load_machine_file(o.machine_file));
  if (!o.linear) m.linear_seconds_per_token = 0;
  return m;
}

// The attention FLOPs of the whole sequence (forward; the backward counted as 2.5x), what per-GPU
// TFLOP/s divide by the ranks, as bench/results/ counts them.
double attention_flops(std::int64_t seq_len, const Options& o) {
  return partition::forward_flops(seq_len, seq_len, o.causal, o.head_dim, o.q_heads);
}

int run_strategies(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const auto m = machine_for(o);
  std::printf("# modelled, not measured: machine %s, %d GPUs per node, %d/%d heads, d%d, %s, %s, %s\n", m.name.c_str(),
              o.gpus_per_node, o.q_heads, o.kv_heads, o.head_dim, to_string(o.dtype), o.causal ? "causal" : "full",
              o.linear ? "attention + linear layers" : "attention alone");
  std::printf("%8s %6s %5s %-16s %4s %5s %10s %10s %11s %10s %-6s %-6s %s\n", "seq", "P", "nodes", "strategy", "U", "R",
              "fwd ms", "fwd TF/GPU", "f+b ms", "f+b TF/GPU", "a2a", "ring", "best");
  std::string rows;
  for (const long long seq_len : o.seq_lens)
    for (const long long ranks : o.ranks) {
      const partition::AttentionShape shape{.seq_len = seq_len,
                                            .query_heads = o.q_heads,
                                            .kv_heads = o.kv_heads,
                                            .head_dim = o.head_dim,
                                            .causal = o.causal,
                                            .element_bytes = static_cast<int>(dtype_size(o.dtype))};
      const partition::NodeLayout layout{.ranks = static_cast<int>(ranks), .gpus_per_node = o.gpus_per_node};
      const auto ranked = partition::rank_strategies(m, shape, layout);
      const int best_u = ranked.front().ulysses;
      // In order of U, so the table reads as the degree grows; rank_strategies put the best first.
      auto by_degree = ranked;
      std::sort(by_degree.begin(), by_degree.end(), [](const auto& a, const auto& b) { return a.ulysses < b.ulysses; });
      const double flops = attention_flops(seq_len, o);
      const int nodes = static_cast<int>((ranks + o.gpus_per_node - 1) / o.gpus_per_node);
      for (const auto& e : by_degree) {
        const double fwd_tf = flops / static_cast<double>(ranks) / e.forward_seconds * 1e-12;
        const double total_tf = (1 + partition::kBackwardFlopFactor) * flops / static_cast<double>(ranks) / e.total_seconds() * 1e-12;
        const bool best = e.ulysses == best_u;
        std::printf("%8lld %6lld %5d %-16s %4d %5d %10.3f %10.1f %11.3f %10.1f %-6s %-6s %s\n", seq_len, ranks, nodes,
                    e.name().c_str(), e.ulysses, e.ring, e.forward_seconds * 1e3, fwd_tf, e.total_seconds() * 1e3, total_tf,
                    e.ulysses > 1 ? (e.all_to_all_tier == partition::Tier::intra_node ? "nvlink" : "net") : "-",
                    e.ring > 1 ? (e.ring_tier == partition::Tier::intra_node ? "nvlink" : "net") : "-", best ? "*" : "");
        rows += fmt::format(
            "{}{{\"seq\":{},\"ranks\":{},\"ulysses\":{},\"ring\":{},\"fwd_ms\":{:.4f},\"fwd_tflops_per_gpu\":{:.2f},"
            "\"fwd_bwd_ms\":{:.4f},\"fwd_bwd_tflops_per_gpu\":{:.2f},\"best\":{}}}",
            rows.empty() ? "" : ",", seq_len, ranks, e.ulysses, e.ring, e.forward_seconds * 1e3, fwd_tf, e.total_seconds() * 1e3,
            total_tf, best ? "true" : "false");
      }
    }
  std::printf(
      "RESULT {\"bench\":\"strategies\",\"modelled\":true,\"machine\":\"%s\",\"gpus_per_node\":%d,\"q_heads\":%d,\"kv_heads\":%d,"
      "\"head_dim\":%d,\"dtype\":\"%s\",\"causal\":%s,\"linear\":%s,\"rows\":[%s]}\n",
      m.name.c_str(), o.gpus_per_node, o.q_heads, o.kv_heads, o.head_dim, to_string(o.dtype), o.causal ? "true" : "false",
      o.linear ? "true" : "false", rows.c_str());
  return 0;
}

const Register kRegister("strategies", "the cost model's modelled time of every U x R strategy split by GPU count (no device needed)",
                         run_strategies);

}  // namespace
}  // namespace longattn::bench
