// ring_attention's --check on rank 0: the oracle run over the same (dtype-rounded) whole inputs,
// compared with the results the ranks computed, and the verdict logged.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <omp.h>

#include "../common/device_tensor.hpp"
#include "inputs.hpp"
#include "longattn/backend.hpp"
#include "longattn/config.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/host_buffer.hpp"
#include "longattn/log.hpp"
#include "options.hpp"
#include "oracle.hpp"
#include "result_check.hpp"

namespace longattn::ring_job {

// The ranks' results gathered on rank 0 in global token order: o [T,H,D], lse [H,T], and with
// --backward dq [T,H,D], dk and dv [T,K,D].
struct Gathered {
  std::vector<float> o, lse, dq, dk, dv;
};

struct CheckOutcome {
  std::string status = "skipped", oracle;
  ResultComparison comparison;
};

// A whole input tensor [tokens, width]: the loaded file read again (its values were checked when
// the ranks read their rows), or the generator's values.
inline std::vector<float> full_rows(const Input* loaded, std::uint64_t seed, int tensor, std::int64_t tokens, std::int64_t width) {
  if (loaded) return load_npy(loaded->path).data;
  std::vector<float> out(static_cast<std::size_t>(tokens * width));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = examples::random_value(seed, tensor, static_cast<std::int64_t>(i));
  return out;
}

// --check on rank 0: the oracle over the whole sequence, compared with the gathered results.
inline CheckOutcome check_results(const Options& opt, const Inputs& in, const Gathered& gathered, double fwd_flops) {
  auto& log = logger(Subsystem::app);
  const std::int64_t T = opt.seq_len, H = opt.heads, K = opt.kv_heads, D = opt.head_dim;
  CheckOutcome check;
  const double check_flops = fwd_flops * (opt.backward ? 3.5 : 1.0);
  check.oracle = opt.oracle == "auto" ? (check_flops <= 2e10 ? "reference" : "cpu") : opt.oracle;
  log.info("checking against the single-process '{}' oracle", check.oracle);
  auto ob = make_backend(check.oracle, DeviceKind::cpu);
  omp_set_num_threads(cpu_threads_per_process(1));
  // The oracle sees the same rounded inputs as the ring: the full tensors go through the dtype.
  auto make_full = [&](const Input* file, int tensor, std::int64_t heads) {
    auto full = full_rows(file, opt.seed, tensor, T, heads * D);
    HostBuffer buf(full.size() * dtype_size(opt.dtype));
    convert_from_f32(full.data(), buf.data(), opt.dtype, full.size());
    return buf;
  };
  auto loaded = [](const std::optional<Input>& file) { return file ? &*file : nullptr; };
  HostBuffer fq = make_full(loaded(in.q), 0, H), fk = make_full(loaded(in.k), 1, K), fv = make_full(loaded(in.v), 2, K);
  std::optional<HostBuffer> fdo;
  if (opt.backward) fdo.emplace(make_full(loaded(in.d_o), 3, H));
  OracleProblem problem;
  problem.q = TensorView(fq.data(), opt.dtype, {T, H, D});
  problem.k = TensorView(fk.data(), opt.dtype, {T, K, D});
  problem.v = TensorView(fv.data(), opt.dtype, {T, K, D});
  if (fdo) problem.d_o = TensorView(fdo->data(), opt.dtype, {T, H, D});
  problem.causal = opt.causal;
  // Each call costs a fixed start (its threads meet at barriers, slow on oversubscribed cores), so
  // a short check is one call and a long one up to 16 blocks that report as they finish.
  const auto blocks = static_cast<std::int64_t>(std::clamp(check_flops / 1e11, 1.0, 16.0));
  using Clock = std::chrono::steady_clock;
  auto last_line = Clock::now();
  const auto start = last_line;
  // A line every few seconds once the check has taken that long; every block at debug level.
  const auto report = [&](const char* phase, std::int64_t done, std::int64_t rows) {
    const auto now = Clock::now();
    const bool due = now - start >= std::chrono::seconds(3) && (now - last_line >= std::chrono::seconds(3) || done == rows);
    if (due) last_line = now;
    constexpr const char* kLine = "check: oracle {} {}/{} query rows ({:.0f} s so far)";
    const double seconds = std::chrono::duration<double>(now - start).count();
    if (due) log.info(kLine, phase, done, rows, seconds);
    else log.debug(kLine, phase, done, rows, seconds);
  };
  const auto want = run_oracle(*ob, problem, opt.backward, (T + blocks - 1) / blocks, report);
  check.comparison.add("o", gathered.o, want.o);
  check.comparison.add("lse", gathered.lse, want.lse);
  if (opt.backward) {
    check.comparison.add("dq", gathered.dq, want.dq);
    check.comparison.add("dk", gathered.dk, want.dk);
    check.comparison.add("dv", gathered.dv, want.dv);
  }
  // A bf16 gradient transport rounds dK/dV at every hop, as 16-bit inputs round everything.
  const double tol = opt.dtype == DType::f32 && opt.grad_transport == DType::f32 ? 2e-4 : 3e-2;
  const auto& c = check.comparison;
  check.status = c.passed(tol) ? "passed" : "failed";
  if (check.status == "passed")
    log.info("check passed: max abs error {:.3g}, relative {:.3g} (tolerance {})", c.max_abs(), c.rel(), tol);
  else if (!c.failures().empty())
    log.error("CHECK FAILED: {}", c.failures());
  else
    log.error("CHECK FAILED: max abs error {:.3g}, relative {:.3g} exceeds tolerance {}", c.max_abs(), c.rel(), tol);
  return check;
}

}  // namespace longattn::ring_job
