// longattn-bench balance-measure: the variable-length plans of `balance`, measured on one device.
// For each batch and rank count it makes the hierarchical plan and the baselines, then runs every
// rank's local attention launches (the executor's own list, runtime/varlen_rank_calls.hpp: its
// query rows against each key block it meets over its ring steps, with the masks and the varlen
// grouping the executor uses) on the real backend, one rank after another, and times them. Next to
// each rank's measured compute it prints what the cost model predicts for the same launches, and
// the plan's modelled step time recomputed with the measured compute in place of the modelled one.
// No communication runs: transfers and linear layers stay modelled.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "measure_lengths.hpp"
#include "measure_rank_runner.hpp"
#include "partition/cost_model.hpp"
#include "partition/machine_file.hpp"
#include "partition/varlen_cost.hpp"
#include "partition/varlen_planner.hpp"
#include "runtime/varlen_rank_calls.hpp"

namespace longattn::bench {
namespace {

constexpr const char* kUsage =
    "longattn-bench balance-measure --lengths-file F[,F...] [--ranks 8,16] [--gpus-per-node 8] [--device cuda|cpu]\n"
    "  [--backend auto] [--total-tokens N] [--backward] [--machine h100|h200|cpu] [--machine-file F] [--cap-tokens 0]\n"
    "  [--heads 32] [--kv-heads 8] [--head-dim 128] [--dtype bf16|f16|f32] [--chunk-tokens 4096] [--full]\n"
    "  [--warmups 1] [--reps 3] [--budget-s 0]\n"
    "Plans each batch over P GPUs as `longattn-bench balance` does (hierarchical, and the baselines\n"
    "per-sequence-zigzag and whole-sequences; flat-minheap is modelled only, no executor runs it), then on\n"
    "this one device runs every rank's local attention launches of each plan, rank after rank, and times\n"
    "them (CUDA events on GPUs, the wall clock on CPUs; median of --reps after --warmups). Prints per plan\n"
    "the measured compute per rank (max, mean, max/mean), the cost model's prediction for the same\n"
    "launches, and the modelled step time with the measured compute in place of the modelled compute,\n"
    "then a RESULT {json} line.\n"
    "  --lengths-file   one sequence length per line; several files comma-separated (bench/data/ ships three)\n"
    "  --ranks          rank counts P to plan for (comma-separated); --gpus-per-node G of them to a node\n"
    "  --total-tokens   cut each batch to at most N tokens so that it runs in minutes on one device: its\n"
    "                   longest sequence (at most N/2), then the others in file order while they fit\n"
    "                   (default 262144 on cuda, 4096 on cpu; 0: the whole file)\n"
    "  --backward       time forward and backward (default: forward only; the step time then takes the\n"
    "                   backward as the model's backward/forward ratio of the same launches times the forward)\n"
    "  --machine        the built-in cost model the plans are made with (default h100 on cuda, cpu on cpu);\n"
    "  --machine-file   its kernel rates, links or linear layers replaced by a machine file (`longattn-bench\n"
    "                   calibrate` writes one for this device)\n"
    "  --dtype          q, k, v element type (default bf16 on cuda, f32 on cpu)\n"
    "  --budget-s       start no further batch x rank count once this many seconds have passed (0: no limit);\n"
    "                   those are reported as skipped\n";

struct Options {
  std::vector<std::string> files;
  std::vector<int> ranks;
  int gpus_per_node = 8;
  DeviceKind device = DeviceKind::cpu;
  std::string backend = "auto";
  std::int64_t total_tokens = 0, cap_tokens = 0, chunk_tokens = 4096;
  bool backward = false;
  partition::MachineModel machine;
  partition::VarlenShape shape;
  DType dtype = DType::f32;
  int warmups = 1, reps = 3;
  double budget_seconds = 0;  // 0: none
};

std::vector<std::string> comma_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

bool cuda_available() {
  const auto names = available_backends();
  return std::find(names.begin(), names.end(), "cuda") != names.end() || std::find(names.begin(), names.end(), "cudnn") != names.end();
}

Options parse(int argc, char** argv) {
  const examples::Flags f(argc, argv, kUsage,
                          {"lengths-file", "ranks", "gpus-per-node", "device", "backend", "total-tokens", "machine", "machine-file",
                           "cap-tokens", "heads", "kv-heads", "head-dim", "dtype", "chunk-tokens", "warmups", "reps", "budget-s"},
                          {"backward", "full"});
  constexpr long long kMaxInt = std::numeric_limits<int>::max();
  constexpr long long kMaxTokens = std::numeric_limits<std::int32_t>::max();
  Options o;
  if (!f.has("lengths-file"))
    throw Error(ErrorCode::invalid_argument,
                "--lengths-file is required: one sequence length per line, several files comma-separated (see bench/data/)");
  o.files = comma_list(f.str("lengths-file", ""));
  if (o.files.empty()) throw Error(ErrorCode::invalid_argument, "--lengths-file names no file: give at least one path");
  for (const auto p : f.integers("ranks", {8, 16}, 1, 1 << 20)) o.ranks.push_back(static_cast<int>(p));
  o.gpus_per_node = static_cast<int>(f.integer("gpus-per-node", 8, 1, kMaxInt));
  const std::string device = f.str("device", cuda_available() ? "cuda" : "cpu");
  if (device != "cpu" && device != "cuda")
    throw Error(ErrorCode::invalid_argument, fmt::format("--device takes cpu or cuda, got `{}`", device));
  if (device == "cuda" && !cuda_available())
    throw Error(ErrorCode::unsupported, "--device cuda: this build or machine has no GPU backend; run with --device cpu");
  o.device = device == "cuda" ? DeviceKind::cuda : DeviceKind::cpu;
  const bool gpu = o.device == DeviceKind::cuda;
  o.backend = f.str("backend", "auto");
  o.total_tokens = f.integer("total-tokens", gpu ? 262144 : 4096, 0, kMaxTokens);
  o.cap_tokens = f.integer("cap-tokens", 0, 0, kMaxTokens);
  o.chunk_tokens = f.integer("chunk-tokens", 4096, 1, kMaxTokens);
  o.backward = f.flag("backward");
  o.machine = partition::default_machine(f.str("machine", gpu ? "h100" : "cpu"));
  if (f.has("machine-file")) o.machine = partition::apply_machine_file(o.machine, partition::load_machine_file(f.str("machine-file", "")));
  o.shape.query_heads = static_cast<int>(f.integer("heads", 32, 1, kMaxInt));
  o.shape.kv_heads = static_cast<int>(f.integer("kv-heads", 8, 1, kMaxInt));
  o.shape.head_dim = static_cast<int>(f.integer("head-dim", 128, 1, kMaxInt));
  o.shape.causal = !f.flag("full");
  const std::string dtype = f.str("dtype", gpu ? "bf16" : "f32");
  if (dtype == "bf16") o.dtype = DType::bf16;
  else if (dtype == "f16") o.dtype = DType::f16;
  else if (dtype == "f32") o.dtype = DType::f32;
  else throw Error(ErrorCode::invalid_argument, fmt::format("--dtype takes bf16, f16 or f32, got `{}`", dtype));
  o.shape.element_bytes = static_cast<int>(dtype_size(o.dtype));
  o.warmups = static_cast<int>(f.integer("warmups", 1, 0, 100));
  o.reps = static_cast<int>(f.integer("reps", 3, 1, 1000));
  o.budget_seconds = static_cast<double>(f.integer("budget-s", 0, 0, kMaxInt));
  return o;
}

// ---- plans, measured ---------------------------------------------------------------------------

struct PlanRow {
  std::string name;
  std::optional<partition::VarlenPlan> plan;
  std::string why_not;  // a plan that could not be made (the cap), instead of a plan
  bool executable = false;
  std::string failed;  // why the device refused or failed a launch, instead of measurements
  std::vector<RankMeasurement> ranks;
  std::vector<double> measured_step_rank_s;  // per rank: measured compute (fwd+bwd) + modelled linear and exposed comm
};

struct Spread {
  double max = 0, mean = 0;
  double imbalance() const { return mean > 0 ? max / mean : 1; }
};
template <class F>
Spread spread(std::size_t n, F&& value) {
  Spread s;
  for (std::size_t i = 0; i < n; ++i) {
    s.max = std::max(s.max, value(i));
    s.mean += value(i);
  }
  if (n) s.mean /= static_cast<double>(n);
  return s;
}

std::string json_number(std::optional<double> v, int digits = 4) {
  return v && std::isfinite(*v) ? fmt::format("{:.{}f}", *v, digits) : "null";
}

std::string json_escaped(const std::string& text) {
  std::string out;
  for (const char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

std::string json_list(const std::vector<double>& values) {
  std::string s = "[";
  for (std::size_t i = 0; i < values.size(); ++i) s += fmt::format("{}{:.4f}", i ? "," : "", values[i]);
  return s + "]";
}

// The measured compute of a rank, forward and backward: measured both, or (forward only) the
// measured forward with the backward the model's backward/forward ratio of the same launches.
double measured_forward_backward_ms(const RankMeasurement& m, bool backward) {
  if (backward) return m.forward_ms + m.backward_ms;
  if (m.model_forward_ms <= 0) return m.forward_ms;
  return m.forward_ms * (m.model_forward_ms + m.model_backward_ms) / m.model_forward_ms;
}

int run_balance_measure(int argc, char** argv) {
  const Options o = parse(argc, argv);
  auto backend = make_backend(o.backend, o.device);
  RankRunner runner(*backend, {o.machine, o.shape, o.dtype, o.backward, o.warmups, o.reps});
  const char* mode = o.backward ? "forward+backward" : "forward";
  std::printf("balance-measure: %s on %s (backend %s, %s, timing by %s, median of %d after %d warm-up), model %s\n", mode,
              to_string(o.device), backend->name().c_str(), to_string(o.dtype), runner.timing(), o.reps, o.warmups,
              o.machine.name.c_str());
  std::printf("shape: %d query / %d kv heads, head dim %d, %s; compute = the rank's local attention launches only "
              "(no merges, copies or transfers); step = measured compute + the model's linear layers and exposed "
              "communication%s\n",
              o.shape.query_heads, o.shape.kv_heads, o.shape.head_dim, o.shape.causal ? "causal" : "full",
              o.backward ? "" : " (forward measured; backward taken as the model's backward/forward ratio of each rank's launches)");
  const auto started = std::chrono::steady_clock::now();
  std::string runs_json;
  std::optional<double> worst_hierarchical;  // none until a hierarchical plan is measured
  std::uint64_t seed = 20261205;
  for (const auto& file : o.files) {
    const auto file_lengths = read_lengths(file);
    const auto lengths = cut_to_total_tokens(file_lengths, o.total_tokens);
    const std::int64_t file_total = std::accumulate(file_lengths.begin(), file_lengths.end(), std::int64_t{0});
    const std::int64_t total = std::accumulate(lengths.begin(), lengths.end(), std::int64_t{0});
    const std::int64_t longest = lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
    std::printf("\n%s: %zu sequences, %lld tokens; measured batch: %zu sequences, %lld tokens, longest %lld%s\n", file.c_str(),
                file_lengths.size(), static_cast<long long>(file_total), lengths.size(), static_cast<long long>(total),
                static_cast<long long>(longest),
                lengths.size() == file_lengths.size() ? "" : fmt::format(" (cut to --total-tokens {})", o.total_tokens).c_str());
    for (const int P : o.ranks) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      if (o.budget_seconds > 0 && elapsed > o.budget_seconds) {
        std::printf("P = %d: skipped, %.0f s spent of --budget-s %.0f\n", P, elapsed, o.budget_seconds);
        runs_json += fmt::format("{}{{\"lengths_file\":\"{}\",\"ranks\":{},\"skipped\":true}}", runs_json.empty() ? "" : ",", file, P);
        continue;
      }
      partition::VarlenProblem problem;
      problem.lengths = lengths;
      problem.ranks = P;
      problem.gpus_per_node = o.gpus_per_node;
      problem.cap_tokens = o.cap_tokens;
      problem.shape = o.shape;
      partition::check_problem(problem);
      std::vector<PlanRow> rows;
      auto add = [&](const char* name, bool executable, auto&& make) {
        PlanRow row;
        row.name = name;
        row.executable = executable;
        try {
          row.plan = make();
        } catch (const Error& e) {
          row.why_not = e.what();
        }
        rows.push_back(std::move(row));
      };
      add("hierarchical", true, [&] { return partition::plan_hierarchical(problem, o.machine); });
      add("per-sequence-zigzag", true, [&] { return partition::plan_per_sequence_zigzag(problem, o.machine); });
      add("whole-sequences", true, [&] { return partition::plan_whole_sequences(problem, o.machine); });
      add("flat-minheap", false, [&] { return partition::plan_flat_minheap(problem, o.machine, o.chunk_tokens); });

      std::printf("P = %d (%d per node): measured %s compute per rank in ms; model = the cost model on the same launches\n", P,
                  o.gpus_per_node, mode);
      // Compute columns first (the local launches alone), then the step: what the planner balances
      // (attention, linear layers and exposed communication together), modelled and with the
      // measured compute in it.
      std::printf("%-20s %10s %10s %9s %10s %9s %9s %9s %13s %9s %14s %9s %9s\n", "plan", "max ms", "mean ms", "max/mean", "model max",
                  "model m/m", "fwd m/m", "launches", "modelled step", "step m/m", "measured step", "step m/m", "ours x");
      std::string plans_json;
      for (auto& row : rows) {
        if (!row.plan) continue;
        const auto& plan = *row.plan;
        if (!row.executable) continue;
        // One plan the device cannot run (a launch it refuses, memory) must not cost the others.
        try {
          for (int r = 0; r < P; ++r) {
            const auto calls = runtime::varlen_rank_calls(plan, r, o.shape.query_heads, o.shape.kv_heads, o.shape.causal);
            row.ranks.push_back(runner.measure(calls, seed++));
            const auto& cost = plan.rank_costs[static_cast<std::size_t>(r)];
            row.measured_step_rank_s.push_back(measured_forward_backward_ms(row.ranks.back(), o.backward) / 1e3 +
                                               cost.linear_seconds + cost.exposed_comm_seconds);
          }
        } catch (const std::exception& e) {
          row.failed = e.what();
        }
      }
      auto measured_step = [](const PlanRow& row) {
        if (!row.failed.empty() || row.measured_step_rank_s.empty()) return std::numeric_limits<double>::quiet_NaN();
        return *std::max_element(row.measured_step_rank_s.begin(), row.measured_step_rank_s.end());
      };
      const auto& ours = rows.front();
      const double ours_measured_step = measured_step(ours);
      for (auto& row : rows) {
        std::string entry;
        if (!row.plan) {
          std::printf("%-20s does not fit: %s\n", row.name.c_str(), row.why_not.c_str());
          entry = "null";
        } else if (!row.failed.empty()) {
          std::printf("%-20s failed on the device: %s\n", row.name.c_str(), row.failed.c_str());
          entry = fmt::format("{{\"executable\":true,\"error\":\"{}\",\"modelled_step_ms\":{:.4f}}}", json_escaped(row.failed),
                              row.plan->step_seconds() * 1e3);
        } else if (!row.executable) {
          std::printf("%-20s %10s %10s %9s %10s %9s %9s %9s %13.3f %9.4f %14s %9s %9s  (modelled only: no executor runs its chunks)\n",
                      row.name.c_str(), "-", "-", "-", "-", "-", "-", "-", row.plan->step_seconds() * 1e3, row.plan->imbalance(), "-",
                      "-", "-");
          entry = fmt::format("{{\"executable\":false,\"modelled_step_ms\":{:.4f},\"modelled_imbalance\":{:.4f}}}",
                              row.plan->step_seconds() * 1e3, row.plan->imbalance());
        } else {
          const auto& m = row.ranks;
          const auto measured = spread(m.size(), [&](std::size_t r) { return o.backward ? m[r].forward_ms + m[r].backward_ms : m[r].forward_ms; });
          const auto model = spread(m.size(), [&](std::size_t r) {
            return o.backward ? m[r].model_forward_ms + m[r].model_backward_ms : m[r].model_forward_ms;
          });
          const auto planner = spread(m.size(), [&](std::size_t r) { return row.plan->rank_costs[r].attention_seconds * 1e3; });
          const auto forward = spread(m.size(), [&](std::size_t r) { return m[r].forward_ms; });
          const auto model_forward = spread(m.size(), [&](std::size_t r) { return m[r].model_forward_ms; });
          int launches = 0;
          for (const auto& rank : m) launches = std::max(launches, rank.launches);
          const double step = measured_step(row);
          const double ratio = step / ours_measured_step;
          const auto steps = spread(row.measured_step_rank_s.size(), [&](std::size_t r) { return row.measured_step_rank_s[r]; });
          std::printf("%-20s %10.3f %10.3f %9.4f %10.3f %9.4f %9.4f %9d %13.3f %9.4f %14.3f %9.4f %9.3f\n", row.name.c_str(),
                      measured.max, measured.mean, measured.imbalance(), model.max, model.imbalance(), forward.imbalance(), launches,
                      row.plan->step_seconds() * 1e3, row.plan->imbalance(), step * 1e3, steps.imbalance(), ratio);
          if (&row == &ours) worst_hierarchical = std::max(worst_hierarchical.value_or(0), measured.imbalance());
          std::vector<double> measured_ms, model_ms, planner_ms;
          for (std::size_t r = 0; r < m.size(); ++r) {
            measured_ms.push_back(o.backward ? m[r].forward_ms + m[r].backward_ms : m[r].forward_ms);
            model_ms.push_back(o.backward ? m[r].model_forward_ms + m[r].model_backward_ms : m[r].model_forward_ms);
            planner_ms.push_back(row.plan->rank_costs[r].attention_seconds * 1e3);
          }
          entry = fmt::format(
              "{{\"executable\":true,\"measured_max_ms\":{:.4f},\"measured_mean_ms\":{:.4f},\"measured_imbalance\":{:.4f},"
              "\"model_max_ms\":{:.4f},\"model_mean_ms\":{:.4f},\"model_imbalance\":{:.4f},"
              "\"planner_attention_max_ms\":{:.4f},\"planner_attention_imbalance\":{:.4f},\"max_launches_per_rank\":{},"
              "\"modelled_step_ms\":{:.4f},\"modelled_imbalance\":{:.4f},\"measured_step_ms\":{:.4f},\"measured_step_imbalance\":{:.4f},"
              "\"forward_max_ms\":{:.4f},\"forward_imbalance\":{:.4f},\"model_forward_imbalance\":{:.4f},"
              "\"measured_ms\":{},\"model_ms\":{},\"planner_attention_ms\":{}}}",
              measured.max, measured.mean, measured.imbalance(), model.max, model.mean, model.imbalance(), planner.max,
              planner.imbalance(), launches, row.plan->step_seconds() * 1e3, row.plan->imbalance(), step * 1e3, steps.imbalance(), forward.max,
              forward.imbalance(), model_forward.imbalance(), json_list(measured_ms), json_list(model_ms), json_list(planner_ms));
        }
        plans_json += fmt::format("{}\"{}\":{}", plans_json.empty() ? "" : ",", row.name, entry);
      }
      std::printf("(%.1f s so far)\n",
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
      std::fflush(stdout);  // a run cut short by a time limit still shows the rank counts it finished
      auto speedup = [&](const char* name) -> std::optional<double> {
        for (const auto& row : rows)
          if (row.name == name && row.plan && row.executable && row.failed.empty() && ours.failed.empty())
            return measured_step(row) / ours_measured_step;
        return std::nullopt;
      };
      std::optional<double> ours_imbalance;
      if (ours.failed.empty())
        ours_imbalance = spread(ours.ranks.size(), [&](std::size_t r) {
                           return o.backward ? ours.ranks[r].forward_ms + ours.ranks[r].backward_ms : ours.ranks[r].forward_ms;
                         }).imbalance();
      runs_json += fmt::format(
          "{}{{\"lengths_file\":\"{}\",\"ranks\":{},\"sequences\":{},\"tokens\":{},\"measured_imbalance\":{},"
          "\"measured_speedup_vs_per_sequence_zigzag\":{},\"measured_speedup_vs_whole_sequences\":{},\"plans\":{{{}}}}}",
          runs_json.empty() ? "" : ",", file, P, lengths.size(), total, json_number(ours_imbalance),
          json_number(speedup("per-sequence-zigzag")), json_number(speedup("whole-sequences")), plans_json);
    }
  }
  constexpr double kTarget = 1.10;
  std::printf("\nhierarchical: worst measured compute max/mean %s (target <= %.2f)\n", json_number(worst_hierarchical).c_str(), kTarget);
  std::printf(
      "RESULT {\"bench\":\"balance-measure\",\"measured\":true,\"mode\":\"%s\",\"device\":\"%s\",\"backend\":\"%s\","
      "\"dtype\":\"%s\",\"timing\":\"%s\",\"machine\":\"%s\",\"total_tokens\":%lld,\"gpus_per_node\":%d,\"q_heads\":%d,"
      "\"kv_heads\":%d,\"head_dim\":%d,\"causal\":%s,\"worst_hierarchical_imbalance\":%s,\"target_imbalance\":%.2f,"
      "\"runs\":[%s]}\n",
      mode, to_string(o.device), backend->name().c_str(), to_string(o.dtype), runner.timing(), o.machine.name.c_str(),
      static_cast<long long>(o.total_tokens), o.gpus_per_node, o.shape.query_heads, o.shape.kv_heads, o.shape.head_dim,
      o.shape.causal ? "true" : "false", json_number(worst_hierarchical).c_str(), kTarget, runs_json.c_str());
  return 0;
}

const Register kRegister("balance-measure",
                         "variable-length plans measured on one device: each rank's local launches, rank after rank, "
                         "next to the model",
                         run_balance_measure);

}  // namespace
}  // namespace longattn::bench
