// longattn-bench balance: the variable-length planner on a batch of sequence lengths, modelled, not
// measured. It plans the batch hierarchically (partition/varlen_planner.hpp: short sequences whole
// on one GPU, medium ones over GPUs of a node, the longest over nodes) and with each baseline
// (per-sequence zigzag over all ranks as TransformerEngine's THD, whole sequences packed greedily,
// a MagiAttention-like flat min-heap of chunks), prices every plan with the cost model of a built-in
// machine, and prints step time, imbalance, bytes per tier, padding and planner time side by side.
// Runs in well under a second on any machine: it needs no device.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "measure_lengths.hpp"
#include "longattn/error.hpp"
#include "partition/cost_model.hpp"
#include "partition/machine_file.hpp"
#include "partition/varlen_planner.hpp"

namespace longattn::bench {
namespace {

constexpr const char* kUsage =
    "longattn-bench balance --lengths-file F [--ranks 64] [--gpus-per-node 8] [--machine h200|h100] [--machine-file F]\n"
    "  [--cap-tokens 0] [--heads 32] [--kv-heads 8] [--head-dim 128] [--dtype-bytes 2] [--chunk-tokens 4096]\n"
    "  [--full]\n"
    "Plans a batch of sequences over P GPUs with the hierarchical variable-length planner and with three\n"
    "baselines, and prints each plan's modelled (not measured) step time of one attention layer's forward\n"
    "and backward plus its linear layers, imbalance (slowest / mean GPU), bytes sent inside and across\n"
    "nodes, padding tokens and planner time, then a RESULT {json} line.\n"
    "  --lengths-file   one sequence length per line ('#' comments and blank lines skipped);\n"
    "                   bench/data/ ships three synthetic distributions\n"
    "  --ranks          GPUs P; --gpus-per-node G of them to a node (P a multiple of G)\n"
    "  --machine        built-in machine model (kernel rates by block size, links, linear layers)\n"
    "  --machine-file   what it gives (kernel rates, links, linear layers) replaces the built-in machine's;\n"
    "                   `longattn-bench calibrate --out F` writes the rates of the device it runs on\n"
    "  --cap-tokens     most tokens one GPU may hold (0: no cap)\n"
    "  --chunk-tokens   the flat min-heap baseline's chunk size\n"
    "  --full           no causal mask (default causal)\n";

struct Row {
  std::string name;
  std::optional<partition::VarlenPlan> plan;
  std::string why_not;  // a baseline that cannot place the batch (the cap), instead of a plan
};

std::string number_or_null(std::optional<double> value) { return value ? fmt::format("{:.4f}", *value) : "null"; }

int run_balance(int argc, char** argv) {
  const examples::Flags f(argc, argv, kUsage,
                          {"lengths-file", "ranks", "gpus-per-node", "machine", "machine-file", "cap-tokens", "heads", "kv-heads", "head-dim",
                           "dtype-bytes", "chunk-tokens"},
                          {"full"});
  if (!f.has("lengths-file"))
    throw Error(ErrorCode::invalid_argument, "--lengths-file is required: one sequence length per line (see bench/data/)");
  constexpr long long kMaxInt = std::numeric_limits<int>::max();
  const std::string lengths_file = f.str("lengths-file", "");
  partition::VarlenProblem problem;
  problem.lengths = read_lengths(lengths_file);
  problem.ranks = static_cast<int>(f.integer("ranks", 64, 1, 1 << 20));
  problem.gpus_per_node = static_cast<int>(f.integer("gpus-per-node", 8, 1, kMaxInt));
  problem.cap_tokens = f.integer("cap-tokens", 0, 0, std::numeric_limits<std::int32_t>::max());
  problem.shape.query_heads = static_cast<int>(f.integer("heads", 32, 1, kMaxInt));
  problem.shape.kv_heads = static_cast<int>(f.integer("kv-heads", 8, 1, kMaxInt));
  problem.shape.head_dim = static_cast<int>(f.integer("head-dim", 128, 1, kMaxInt));
  problem.shape.element_bytes = static_cast<int>(f.integer("dtype-bytes", 2, 1, 8));
  problem.shape.causal = !f.flag("full");
  const std::int64_t chunk_tokens = f.integer("chunk-tokens", 4096, 1, std::numeric_limits<std::int32_t>::max());
  auto machine = partition::default_machine(f.str("machine", "h200"));
  if (f.has("machine-file")) machine = partition::apply_machine_file(machine, partition::load_machine_file(f.str("machine-file", "")));
  partition::check_problem(problem);  // one clear error for the batch before any planner runs

  std::vector<Row> rows;
  rows.push_back({"hierarchical", partition::plan_hierarchical(problem, machine), ""});
  auto baseline = [&](const char* name, auto&& plan) {
    try {
      rows.push_back({name, plan(), ""});
    } catch (const Error& e) {
      rows.push_back({name, std::nullopt, e.what()});
    }
  };
  baseline("per-sequence-zigzag", [&] { return partition::plan_per_sequence_zigzag(problem, machine); });
  baseline("whole-sequences", [&] { return partition::plan_whole_sequences(problem, machine); });
  baseline("flat-minheap", [&] { return partition::plan_flat_minheap(problem, machine, chunk_tokens); });

  std::int64_t total = 0;
  for (const auto l : problem.lengths) total += l;
  const auto& ours = *rows.front().plan;
  std::printf("balance (modelled, %s machine): %s, %zu sequences, %lld tokens on %d GPUs (%d per node), %lld tokens per GPU\n",
              machine.name.c_str(), lengths_file.c_str(), problem.lengths.size(), static_cast<long long>(total),
              problem.ranks, problem.gpus_per_node, static_cast<long long>(total / problem.ranks));
  std::printf("%-20s %11s %9s %11s %10s %10s %11s %11s %8s\n", "plan", "step ms", "max/mean", "max tokens", "intra GB",
              "inter GB", "padding", "planner ms", "ours x");
  std::string baselines_json;
  double best_baseline = std::numeric_limits<double>::infinity();
  std::optional<double> speedup[3];
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& row = rows[i];
    if (!row.plan) {
      std::printf("%-20s does not fit: %s\n", row.name.c_str(), row.why_not.c_str());
    } else {
      const auto& p = *row.plan;
      const double ratio = p.step_seconds() / ours.step_seconds();
      std::printf("%-20s %11.3f %9.4f %11lld %10.2f %10.2f %11lld %11.1f %8.2f\n", row.name.c_str(), p.step_seconds() * 1e3,
                  p.imbalance(), static_cast<long long>(p.max_rank_tokens()), p.bytes_intra_node / 1e9, p.bytes_inter_node / 1e9,
                  static_cast<long long>(p.padding_tokens), p.planner_ms, ratio);
      if (i > 0) {
        speedup[i - 1] = ratio;
        best_baseline = std::min(best_baseline, p.step_seconds());
      }
    }
    if (i == 0) continue;
    baselines_json += fmt::format("{}\"{}\":", baselines_json.empty() ? "" : ",", row.name);
    if (!row.plan) {
      baselines_json += "null";
      continue;
    }
    const auto& p = *row.plan;
    baselines_json += fmt::format(
        "{{\"step_ms\":{:.4f},\"imbalance\":{:.4f},\"max_tokens\":{},\"bytes_intra_node\":{:.0f},\"bytes_inter_node\":{:.0f},"
        "\"padding_tokens\":{},\"planner_ms\":{:.2f}}}",
        p.step_seconds() * 1e3, p.imbalance(), p.max_rank_tokens(), p.bytes_intra_node, p.bytes_inter_node, p.padding_tokens,
        p.planner_ms);
  }
  // Where the hierarchical plan put the sequences.
  std::int64_t sequences_by_tier[3] = {0, 0, 0}, tokens_by_tier[3] = {0, 0, 0};
  int largest_group = 1;
  for (std::size_t s = 0; s < problem.lengths.size(); ++s) {
    const auto& group = ours.groups[static_cast<std::size_t>(ours.group_of[s])];
    ++sequences_by_tier[static_cast<int>(group.tier)];
    tokens_by_tier[static_cast<int>(group.tier)] += problem.lengths[s];
    largest_group = std::max(largest_group, group.size);
  }
  std::printf("hierarchical tiers: one GPU %lld sequences (%lld tokens), one node %lld (%lld), across nodes %lld (%lld); "
              "largest group %d GPUs\n",
              static_cast<long long>(sequences_by_tier[0]), static_cast<long long>(tokens_by_tier[0]),
              static_cast<long long>(sequences_by_tier[1]), static_cast<long long>(tokens_by_tier[1]),
              static_cast<long long>(sequences_by_tier[2]), static_cast<long long>(tokens_by_tier[2]), largest_group);
  std::printf(
      "RESULT {\"bench\":\"balance\",\"modelled\":true,\"machine\":\"%s\",\"lengths_file\":\"%s\",\"sequences\":%zu,"
      "\"tokens\":%lld,\"ranks\":%d,\"gpus_per_node\":%d,\"cap_tokens\":%lld,\"q_heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
      "\"causal\":%s,\"step_ms\":%.4f,\"imbalance\":%.4f,\"max_tokens\":%lld,\"bytes_intra_node\":%.0f,\"bytes_inter_node\":%.0f,"
      "\"padding_tokens\":%lld,\"planner_ms\":%.2f,\"speedup_vs_per_sequence_zigzag\":%s,\"speedup_vs_whole_sequences\":%s,"
      "\"speedup_vs_flat_minheap\":%s,\"speedup_vs_best_baseline\":%s,\"sequences_by_tier\":{\"one_gpu\":%lld,\"one_node\":%lld,"
      "\"nodes\":%lld},\"baselines\":{%s}}\n",
      machine.name.c_str(), lengths_file.c_str(), problem.lengths.size(), static_cast<long long>(total), problem.ranks,
      problem.gpus_per_node, static_cast<long long>(problem.cap_tokens), problem.shape.query_heads, problem.shape.kv_heads,
      problem.shape.head_dim, problem.shape.causal ? "true" : "false", ours.step_seconds() * 1e3, ours.imbalance(),
      static_cast<long long>(ours.max_rank_tokens()), ours.bytes_intra_node, ours.bytes_inter_node,
      static_cast<long long>(ours.padding_tokens), ours.planner_ms, number_or_null(speedup[0]).c_str(),
      number_or_null(speedup[1]).c_str(), number_or_null(speedup[2]).c_str(),
      number_or_null(std::isfinite(best_baseline) ? std::optional<double>(best_baseline / ours.step_seconds()) : std::nullopt)
          .c_str(),
      static_cast<long long>(sequences_by_tier[0]), static_cast<long long>(sequences_by_tier[1]),
      static_cast<long long>(sequences_by_tier[2]), baselines_json.c_str());
  return 0;
}

const Register kRegister("balance", "variable-length batches: the hierarchical planner against three baselines, modelled (no device needed)",
                         run_balance);

}  // namespace
}  // namespace longattn::bench
