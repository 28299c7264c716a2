// varlen_attention's output: a table of the plan's groups and of every rank's share (tokens in both
// layouts, attention FLOPs, modelled and measured time), then the RESULT line.
#pragma once

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "longattn/varlen_attention.hpp"
#include "options.hpp"

namespace longattn::varlen_job {

// What every rank measured, gathered on all ranks.
struct RankFigures {
  double forward_ms = 0, backward_ms = 0, remap_ms = 0;
  double bytes_intra = 0, bytes_inter = 0, remap_bytes = 0;
};

inline double max_of(const std::vector<double>& v) { return v.empty() ? 0 : *std::max_element(v.begin(), v.end()); }
inline double mean_of(const std::vector<double>& v) {
  return v.empty() ? 0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

inline void print_report(const Options& o, const BalancedBatch& batch, const std::vector<RankFigures>& ranks,
                         const std::string& check) {
  const int P = batch.ranks();
  const auto& model = batch.model();
  const auto groups = batch.groups();
  std::printf("varlen_attention: %zu sequences, %lld tokens on %d ranks (%d per node), balance %s, machine %s\n",
              o.lengths.size(), static_cast<long long>(batch.total_tokens()), P, batch.request().gpus_per_node,
              to_string(o.balance), o.machine_file.empty() ? o.machine.c_str() : o.machine_file.c_str());
  int one_rank = 0, one_node = 0, nodes = 0, hybrid = 0;
  for (const auto& g : groups) {
    one_rank += g.tier == "one-rank";
    one_node += g.tier == "one-node";
    nodes += g.tier == "nodes";
    hybrid += g.sharding == "hybrid";
  }
  std::printf("groups: %d on one rank, %d inside a node, %d across nodes (%d of them hybrid)\n", one_rank, one_node, nodes, hybrid);
  std::printf("%5s %10s %10s %12s %12s %10s %10s\n", "rank", "linear", "attention", "attn GFLOP", "model ms", "fwd ms",
              o.backward ? "bwd ms" : "-");
  std::vector<double> flops, tokens;
  for (int r = 0; r < P; ++r) {
    flops.push_back(batch.attention_flops(r));
    tokens.push_back(static_cast<double>(batch.attention_tokens(r)));
    const auto& f = ranks[static_cast<std::size_t>(r)];
    std::printf("%5d %10lld %10lld %12.3f %12.3f %10.2f %10s\n", r, static_cast<long long>(batch.linear_tokens(r)),
                static_cast<long long>(batch.attention_tokens(r)), flops.back() / 1e9,
                1e3 * model.rank_seconds[static_cast<std::size_t>(r)], f.forward_ms,
                o.backward ? fmt::format("{:.2f}", f.backward_ms).c_str() : "-");
  }
  double intra = 0, inter = 0, remap = 0;
  std::vector<double> fwd, bwd;
  for (const auto& f : ranks) {
    intra += f.bytes_intra;
    inter += f.bytes_inter;
    remap += f.remap_bytes;
    fwd.push_back(f.forward_ms);
    bwd.push_back(f.backward_ms);
  }
  std::printf("model: step %.3f ms (slowest rank, forward + backward + linear layers), imbalance %.3f, planner %.2f ms\n",
              1e3 * model.step_seconds, model.imbalance, model.planner_ms);
  std::printf("measured: attention bytes sent %.0f inside nodes, %.0f across nodes; remap %.0f bytes; check %s\n", intra, inter,
              remap, check.c_str());
  std::printf(
      "RESULT {\"program\":\"varlen_attention\",\"ranks\":%d,\"gpus_per_node\":%d,\"sequences\":%zu,\"tokens\":%lld,"
      "\"balance\":\"%s\",\"causal\":%s,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"dtype\":\"%s\",\"device\":\"%s\","
      "\"groups_one_rank\":%d,\"groups_one_node\":%d,\"groups_nodes\":%d,\"groups_hybrid\":%d,"
      "\"attention_flops_max\":%.6g,\"attention_flops_mean\":%.6g,\"tokens_max\":%.0f,\"tokens_mean\":%.6g,"
      "\"bytes_intra_node\":%.0f,\"bytes_inter_node\":%.0f,\"remap_bytes\":%.0f,\"forward_ms_max\":%.4g,\"backward_ms_max\":%s,"
      "\"modelled_step_ms\":%.6g,\"modelled_imbalance\":%.6g,\"planner_ms\":%.4g,\"check\":\"%s\"}\n",
      P, batch.request().gpus_per_node, o.lengths.size(), static_cast<long long>(batch.total_tokens()), to_string(o.balance),
      o.causal ? "true" : "false", o.heads, o.kv_heads, o.head_dim, to_string(o.dtype), to_string(o.device), one_rank,
      one_node, nodes, hybrid, max_of(flops), mean_of(flops), max_of(tokens), mean_of(tokens), intra, inter, remap,
      max_of(fwd), o.backward ? fmt::format("{:.4g}", max_of(bwd)).c_str() : "null", 1e3 * model.step_seconds,
      model.imbalance, model.planner_ms, check.c_str());
  std::fflush(stdout);
}

}  // namespace longattn::varlen_job
