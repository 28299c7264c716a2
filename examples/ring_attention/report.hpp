// ring_attention's closing output on rank 0: one table of the passes' timings with a legend that
// says what each column is, then the RESULT line (valid JSON: a non-finite number becomes null).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

#include <fmt/format.h>

#include "check.hpp"
#include "options.hpp"

namespace longattn::ring_job {

inline std::string plural(std::int64_t count, const char* noun) { return fmt::format("{} {}{}", count, noun, count == 1 ? "" : "s"); }

// One pass's times: each the median over the iterations on each rank, then the largest over the
// ranks (the slowest rank sets the pace); skipped steps the most over ranks.
struct PassSummary {
  double wall_ms = 0, compute_ms = 0, wait_ms = 0;
  int skipped_steps = 0;
  double exchange_ms = 0;  // the head all-to-alls of Ulysses and hybrid
};

// What ran: never "auto" (auto's pick), U ranks per Ulysses group, a ring of R groups.
struct StrategySummary {
  Strategy strategy = Strategy::ring;
  int ulysses_size = 1, ring_size = 1;
};

struct RunSummary {
  PassSummary forward, backward;
  double peak_gpu_bytes = 0;
  StrategySummary strategy;
};

inline std::string json_number(double x, const char* format) {
  return std::isfinite(x) ? fmt::format(fmt::runtime(format), x) : std::string("null");
}

// used_backend: the backend(s) that ran (for "auto" on a GPU: "cudnn", "cuda" or "cudnn+cuda").
inline void print_report(const Options& opt, int nranks, const RunSummary& run, double fwd_flops, const std::string& used_backend,
                         const CheckOutcome& check) {
  const double fwd_ms = run.forward.wall_ms, bwd_ms = run.backward.wall_ms;
  const double tflops = fwd_ms > 0 ? fwd_flops / (fwd_ms * 1e-3) / 1e12 : 0.0;
  const double bwd_tflops = bwd_ms > 0 ? 2.5 * fwd_flops / (bwd_ms * 1e-3) / 1e12 : 0.0;
  // Host-timed compute is real only on CPUs (GPU kernels run asynchronously).
  const bool compute_measured = opt.device == DeviceKind::cpu;
  // Only Ulysses and the hybrid exchange heads: the column appears where it can be non-zero.
  const bool exchanges = run.strategy.ulysses_size > 1;
  auto row = [&](const char* pass, const PassSummary& p, double rate) {
    const std::string compute = compute_measured ? fmt::format("{:.1f}", p.compute_ms) : "-";
    std::printf("%-10s %10.1f %10.4f %12s %12.1f %14d", pass, p.wall_ms, rate, compute.c_str(), p.wait_ms, p.skipped_steps);
    if (exchanges) std::printf(" %12.1f", p.exchange_ms);
    std::printf("\n");
  };
  std::printf("%-10s %10s %10s %12s %12s %14s%s\n", "pass", "wall ms", "TFLOP/s", "compute ms", "wait ms", "skipped steps",
              exchanges ? fmt::format(" {:>12}", "exchange ms").c_str() : "");
  row("forward", run.forward, tflops);
  if (opt.backward) row("backward", run.backward, bwd_tflops);
  std::printf("strategy %s: U = %d, R = %d (U ranks per Ulysses group, a ring of R groups)\n", to_string(run.strategy.strategy),
              run.strategy.ulysses_size, run.strategy.ring_size);
  std::printf("wall, compute and wait: median over %s, slowest rank; compute is local attention and merges%s;\n"
              "skipped steps: of the %s per pass, those where the causal mask hides every key of the\n"
              "arriving shard from the rank's queries (nothing to compute), most over ranks%s\n",
              plural(opt.iters, "iteration").c_str(), compute_measured ? "" : " (not timed on GPUs)", plural(run.strategy.ring_size, "ring step").c_str(),
              exchanges ? ";\nexchange: the head all-to-alls inside the Ulysses groups (host time, slowest rank)" : "");
  const auto& c = check.comparison;
  std::printf(
      "RESULT {\"program\":\"ring_attention\",\"ranks\":%d,\"seq_len\":%lld,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
      "\"strategy\":\"%s\",\"requested_strategy\":\"%s\",\"ulysses_size\":%d,\"ring_size\":%d,\"fwd_exchange_ms\":%.3f,"
      "\"layout\":\"%s\",\"causal\":%s,\"dtype\":\"%s\",\"backend\":\"%s\",\"device\":\"%s\",\"iters\":%d,\"peak_gpu_mem_gib\":%.3f,"
      "\"fwd_ms\":%.3f,\"bwd_ms\":%s,\"tflops\":%.5f,\"bwd_tflops\":%s,\"fwd_compute_ms\":%s,\"fwd_wait_ms\":%.3f,"
      "\"fwd_skipped_steps\":%d,\"check\":\"%s\",\"check_oracle\":\"%s\",\"max_abs_err\":%s,\"rel_err\":%s}\n",
      nranks, static_cast<long long>(opt.seq_len), opt.heads, opt.kv_heads, opt.head_dim, to_string(run.strategy.strategy),
      to_string(opt.strategy), run.strategy.ulysses_size, run.strategy.ring_size, run.forward.exchange_ms, to_string(opt.layout),
      opt.causal ? "true" : "false", to_string(opt.dtype), used_backend.c_str(), to_string(opt.device), opt.iters,
      run.peak_gpu_bytes / (1 << 30), fwd_ms, opt.backward ? fmt::format("{:.3f}", bwd_ms).c_str() : "null", tflops,
      opt.backward ? fmt::format("{:.5f}", bwd_tflops).c_str() : "null",
      compute_measured ? fmt::format("{:.3f}", run.forward.compute_ms).c_str() : "null", run.forward.wait_ms,
      run.forward.skipped_steps, check.status.c_str(), check.oracle.c_str(),
      opt.check ? json_number(c.max_abs(), "{:.3e}").c_str() : "null", opt.check ? json_number(c.rel(), "{:.3e}").c_str() : "null");
  std::fflush(stdout);
}

}  // namespace longattn::ring_job
