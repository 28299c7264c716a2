// ring_attention: an mpirun job running ring attention forward (and backward) over a sequence
// sharded across the ranks, optionally checked against a single-process oracle on rank 0.
//
//   mpirun -np 4 build/bin/ring_attention --seq-len 16384 --heads 8 --kv-heads 2 --head-dim 64
//          --layout zigzag --causal --backward --check
//
// Ends with one line: RESULT {json}.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <omp.h>

#include "../common/device_tensor.hpp"
#include "inputs.hpp"
#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "longattn/host_buffer.hpp"
#include "longattn/layout.hpp"
#include "longattn/log.hpp"
#include "longattn/npy.hpp"
#include "longattn/ring.hpp"
#include "memory_estimate.hpp"
#include "options.hpp"
#include "oracle.hpp"
#include "result_check.hpp"

namespace {

using namespace longattn;
using namespace longattn::ring_job;
using examples::DeviceTensor;
using examples::random_value;

// Every setup error (flags, files, memory, devices) takes this one path: each rank runs the stage,
// the ranks agree on whether any failed, the lowest failing rank prints one line, and all exit
// with status 2. A stage may end in a collective only if every rank reaches it.
bool setup_stage(Communicator& world, const std::function<void()>& stage) {
  std::string error;
  try {
    stage();
  } catch (const std::exception& e) {
    error = e.what();
  }
  const int rank = world.rank(), nranks = world.size();
  std::int64_t reporter = error.empty() ? nranks : rank;
  world.allreduce(&reporter, 1, ReduceType::i64, ReduceOp::min);
  if (reporter == nranks) return true;
  // Print before anyone exits: mpirun kills the job at the first non-zero exit, which could
  // otherwise swallow the reporter's line.
  if (reporter == rank) {
    std::fprintf(stderr, "ring_attention: error: %s\n", error.c_str());
    std::fflush(stderr);
  }
  world.barrier();
  return false;
}

std::string plural(std::int64_t count, const char* noun) { return fmt::format("{} {}{}", count, noun, count == 1 ? "" : "s"); }

// "16384 tokens (4096 per rank)", "5 tokens (1 to 2 per rank)", "1 token (0 to 1 per rank; 3 ranks hold none)".
std::string token_spread(const ShardPlan& plan) {
  std::int64_t least = plan.total_tokens(), most = 0;
  int empty = 0;
  for (int r = 0; r < plan.world(); ++r) {
    const auto n = plan.local_tokens(r);
    least = std::min(least, n);
    most = std::max(most, n);
    empty += n == 0;
  }
  std::string s = plural(plan.total_tokens(), "token") + " (" +
                  (least == most ? fmt::format("{} per rank", most) : fmt::format("{} to {} per rank", least, most));
  if (empty > 0) s += fmt::format("; {} hold{} none", plural(empty, "rank"), empty == 1 ? "s" : "");
  return s + ")";
}

std::vector<float> full_rows(const Input* loaded, std::uint64_t seed, int tensor, std::int64_t tokens, std::int64_t width) {
  if (loaded) return loaded->full;
  std::vector<float> out(static_cast<std::size_t>(tokens * width));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = random_value(seed, tensor, static_cast<std::int64_t>(i));
  return out;
}

// Collects every rank's rows of a [T, width] result on rank 0, in global order.
std::vector<float> gather_rows(Communicator& comm, const ShardPlan& plan, const std::vector<float>& local, std::int64_t width) {
  constexpr int kTag = 77;
  if (comm.rank() != 0) {
    comm.isend(local.data(), local.size() * 4, 0, kTag)->wait();
    return {};
  }
  std::vector<float> full(static_cast<std::size_t>(plan.total_tokens() * width));
  for (int r = 0; r < comm.size(); ++r) {
    const auto shard = plan.shard(r);
    std::vector<float> rows(static_cast<std::size_t>(shard.tokens() * width));
    if (r == 0) rows = local;
    else comm.irecv(rows.data(), rows.size() * 4, r, kTag)->wait();
    unshard_rows(rows.data(), full.data(), static_cast<std::size_t>(width) * 4, shard);
  }
  return full;
}

// [H, n] <-> [n, H], so per-head rows can be gathered token-wise.
std::vector<float> transpose(const std::vector<float>& a, std::int64_t rows, std::int64_t cols) {
  std::vector<float> t(a.size());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) t[static_cast<std::size_t>(c * rows + r)] = a[static_cast<std::size_t>(r * cols + c)];
  return t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::string json_number(double x, const char* format) {
  return std::isfinite(x) ? fmt::format(fmt::runtime(format), x) : std::string("null");
}

// One pass's timings over the iterations, each column its median over iterations on this rank.
struct PassTimes {
  std::vector<double> wall, compute, wait;
  int skipped = 0;
  void add(const RingStats& s) {
    wall.push_back(s.wall_ms);
    compute.push_back(s.compute_ms);
    wait.push_back(s.wait_ms);
    skipped = s.skipped_steps;
  }
};

// What the setup stages build, in the order they build it.
struct Job {
  Options opt;
  Inputs in;
  std::optional<ShardPlan> plan;
  std::unique_ptr<Communicator> nccl;
  std::unique_ptr<AttentionBackend> backend;
  std::unique_ptr<RingAttention> ring;
  std::optional<DeviceTensor> q, k, v, o, lse, d_o, dq, dk, dv;
  int iteration = 0;  // of the pass running now, for the progress lines
};

int run_job(Communicator& world, Job& job);

int run(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world_communicator();
  const int rank = world->rank(), nranks = world->size();

  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      if (rank == 0) std::fputs(kUsage, stdout);
      return 0;
    }

  Job job;
  Options& opt = job.opt;
  std::optional<examples::Flags> flags;
  const Topology topo = world->topology();
  if (!setup_stage(*world, [&] { flags.emplace(read_flags(argc, argv)); })) return 2;
  if (!setup_stage(*world, [&] { require_same_on_all_ranks(*world, "command-line flags", flags->canonical()); })) return 2;
  // Flags, files and the memory estimate: local work on every rank, nothing the size of the
  // sequence built before the estimate says it fits.
  if (!setup_stage(*world, [&] {
        opt = parse_options(*flags);
        job.in = load_inputs(opt);
        check_shape(opt);
        require_memory(opt, nranks, topo.local_size, rank == 0);
        // --dump's folder is made now, so that an unwritable path fails before the work, not after.
        std::error_code dump_error;
        if (rank == 0 && !opt.dump.empty() && !std::filesystem::is_directory(opt.dump) &&
            !std::filesystem::create_directories(opt.dump, dump_error))
          throw Error(ErrorCode::io, fmt::format("--dump {}: cannot create the folder ({})", opt.dump,
                                                 dump_error ? dump_error.message() : "a file of that name exists"));
        job.plan.emplace(ShardPlan::single_sequence(opt.seq_len, opt.layout, nranks));
      }))
    return 2;
  omp_set_num_threads(cpu_threads_per_process(topo.local_size));
  // On GPUs the ring runs over NCCL (which also picks this rank's GPU); on CPUs over MPI.
  if (!setup_stage(*world, [&] {
        if (opt.device == DeviceKind::cuda) job.nccl = make_nccl_communicator(*world);
        job.backend = make_backend(opt.backend, opt.device);
      }))
    return 2;
  if (!setup_stage(*world, [&] {
        RingOptions ropt;
        ropt.causal = opt.causal;
        const bool progress = rank == 0 && static_cast<double>(opt.seq_len) * static_cast<double>(opt.seq_len) * opt.heads *
                                                   opt.head_dim >= static_cast<double>(1LL << 36);
        // Long runs report every step; short ones only at debug level.
        ropt.on_step = [&job, progress](const char* phase, int step, int steps) {
          auto& log = logger(Subsystem::app);
          constexpr const char* kLine = "{} iteration {}/{}, step {}/{}";
          if (progress) log.info(kLine, phase, job.iteration, job.opt.iters, step, steps);
          else log.debug(kLine, phase, job.iteration, job.opt.iters, step, steps);
        };
        Communicator& ring_comm = job.nccl ? *job.nccl : *world;
        job.ring = std::make_unique<RingAttention>(ring_comm, *job.plan, ropt, std::move(job.backend));
        AttentionBackend& be = job.ring->backend();
        const auto shard = job.plan->shard(rank);
        const std::int64_t n = shard.tokens(), H = opt.heads, K = opt.kv_heads, D = opt.head_dim;
        auto make = [&](std::optional<DeviceTensor>& t, DType type, std::int64_t a, std::int64_t b, std::int64_t c) {
          t.emplace(be, type, std::initializer_list<std::int64_t>{a, b, c});
        };
        make(job.q, opt.dtype, n, H, D);
        make(job.k, opt.dtype, n, K, D);
        make(job.v, opt.dtype, n, K, D);
        make(job.o, opt.dtype, n, H, D);
        job.lse.emplace(be, DType::f32, std::initializer_list<std::int64_t>{H, n});
        job.q->fill_shard(be, shard, opt.seed, 0, job.in.q ? &job.in.q->full : nullptr);
        job.k->fill_shard(be, shard, opt.seed, 1, job.in.k ? &job.in.k->full : nullptr);
        job.v->fill_shard(be, shard, opt.seed, 2, job.in.v ? &job.in.v->full : nullptr);
        if (opt.backward) {
          make(job.d_o, opt.dtype, n, H, D);
          make(job.dq, opt.dtype, n, H, D);
          make(job.dk, opt.dtype, n, K, D);
          make(job.dv, opt.dtype, n, K, D);
          job.d_o->fill_shard(be, shard, opt.seed, 3, job.in.d_o ? &job.in.d_o->full : nullptr);
        }
      }))
    return 2;
  try {
    return run_job(*world, job);
  } catch (const std::exception& e) {
    // Past setup, peers may be blocked in a collective with us: report and take the job down.
    std::fprintf(stderr, "ring_attention: error on rank %d: %s\n", rank, e.what());
    std::fflush(stderr);
    MpiSession::abort(2);
    return 2;
  }
}

// --check on rank 0: the oracle over the whole sequence, compared with the gathered results.
struct CheckOutcome {
  std::string status = "skipped", oracle;
  ResultComparison comparison;
};

int run_job(Communicator& world, Job& job) {
  const Options& opt = job.opt;
  const ShardPlan& plan = *job.plan;
  const int rank = world.rank(), nranks = world.size();
  auto& log = logger(Subsystem::app);
  RingAttention& ring = *job.ring;
  AttentionBackend& be = ring.backend();
  const std::string backend_name = be.name();
  const std::int64_t n = plan.local_tokens(rank), H = opt.heads, K = opt.kv_heads, D = opt.head_dim;

  if (rank == 0)
    log.info("ring attention: {}, {}, {} heads / {} kv heads, dim {}, {}, {}{}, backend {}", plural(nranks, "rank"), token_spread(plan),
             H, K, D, to_string(opt.layout), to_string(opt.dtype), opt.causal ? ", causal" : "", backend_name);

  // Device memory in use on this rank's GPU (whole device: context, libraries, pools included).
  auto log_memory = [&](const char* when) {
    if (opt.device == DeviceKind::cuda && rank == 0)
      log.info("GPU memory in use {}: {:.2f} GiB", when, static_cast<double>(gpu_memory_used_bytes()) / (1 << 30));
  };
  log_memory("after setup");
  PassTimes fwd, bwd;
  for (job.iteration = 1; job.iteration <= opt.iters; ++job.iteration) {
    world.barrier();
    ring.forward(job.q->view, job.k->view, job.v->view, job.o->view, job.lse->view);
    fwd.add(ring.last_stats());
  }
  std::size_t mem_peak = gpu_memory_used_bytes();
  log_memory("after forward");
  if (opt.backward) {
    for (job.iteration = 1; job.iteration <= opt.iters; ++job.iteration) {
      world.barrier();
      ring.backward(job.q->view, job.k->view, job.v->view, job.o->view, job.lse->view, job.d_o->view, job.dq->view, job.dk->view,
                    job.dv->view);
      bwd.add(ring.last_stats());
    }
    mem_peak = std::max(mem_peak, gpu_memory_used_bytes());
    log_memory("after backward");
  }
  // Each column is a median over the iterations on each rank, then the largest over the ranks (the
  // slowest rank defines the step time); peak device memory is the largest over ranks.
  double summary[] = {median(fwd.wall), median(fwd.compute), median(fwd.wait), static_cast<double>(fwd.skipped),
                      median(bwd.wall), median(bwd.compute), median(bwd.wait), static_cast<double>(bwd.skipped),
                      static_cast<double>(mem_peak)};
  world.allreduce(summary, std::size(summary), ReduceType::f64, ReduceOp::max);

  // Gather results on rank 0 for --check and --dump.
  std::vector<float> g_o, g_lse, g_dq, g_dk, g_dv;
  if (opt.check || !opt.dump.empty()) {
    g_o = gather_rows(world, plan, job.o->download(be), H * D);
    g_lse = gather_rows(world, plan, transpose(job.lse->download(be), H, n), H);
    if (rank == 0) g_lse = transpose(g_lse, opt.seq_len, H);
    if (opt.backward) {
      g_dq = gather_rows(world, plan, job.dq->download(be), H * D);
      g_dk = gather_rows(world, plan, job.dk->download(be), K * D);
      g_dv = gather_rows(world, plan, job.dv->download(be), K * D);
    }
  }

  const double causal_factor = opt.causal ? 0.5 : 1.0;
  const double fwd_flops = 4.0 * static_cast<double>(opt.seq_len) * static_cast<double>(opt.seq_len) * H * D * causal_factor;
  CheckOutcome check;
  if (rank == 0 && opt.check) {
    const std::int64_t T = opt.seq_len;
    const double check_flops = fwd_flops * (opt.backward ? 3.5 : 1.0);
    check.oracle = opt.oracle == "auto" ? (check_flops <= 2e10 ? "reference" : "cpu") : opt.oracle;
    log.info("checking against the single-process '{}' oracle", check.oracle);
    auto ob = make_backend(check.oracle, DeviceKind::cpu);
    omp_set_num_threads(cpu_threads_per_process(1));
    // The oracle sees the same rounded inputs as the ring: the full tensors go through the dtype.
    auto make_full = [&](const Input* in, int tensor, std::int64_t heads) {
      auto full = full_rows(in, opt.seed, tensor, T, heads * D);
      HostBuffer buf(full.size() * dtype_size(opt.dtype));
      convert_from_f32(full.data(), buf.data(), opt.dtype, full.size());
      return buf;
    };
    auto loaded = [](const std::optional<Input>& in) { return in ? &*in : nullptr; };
    HostBuffer fq = make_full(loaded(job.in.q), 0, H), fk = make_full(loaded(job.in.k), 1, K), fv = make_full(loaded(job.in.v), 2, K);
    std::optional<HostBuffer> fdo;
    if (opt.backward) fdo.emplace(make_full(loaded(job.in.d_o), 3, H));
    OracleProblem problem;
    problem.q = TensorView(fq.data(), opt.dtype, {T, H, D});
    problem.k = TensorView(fk.data(), opt.dtype, {T, K, D});
    problem.v = TensorView(fv.data(), opt.dtype, {T, K, D});
    if (fdo) problem.d_o = TensorView(fdo->data(), opt.dtype, {T, H, D});
    problem.causal = opt.causal;
    // Blocks of about 1/16 of the rows.
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
    const auto want = run_oracle(*ob, problem, opt.backward, (T + 15) / 16, report);
    check.comparison.add("o", g_o, want.o);
    check.comparison.add("lse", g_lse, want.lse);
    if (opt.backward) {
      check.comparison.add("dq", g_dq, want.dq);
      check.comparison.add("dk", g_dk, want.dk);
      check.comparison.add("dv", g_dv, want.dv);
    }
    const double tol = opt.dtype == DType::f32 ? 2e-4 : 3e-2;
    const auto& c = check.comparison;
    check.status = c.passed(tol) ? "passed" : "failed";
    if (check.status == "passed")
      log.info("check passed: max abs error {:.3g}, relative {:.3g} (tolerance {})", c.max_abs(), c.rel(), tol);
    else if (!c.failures().empty())
      log.error("CHECK FAILED: {}", c.failures());
    else
      log.error("CHECK FAILED: max abs error {:.3g}, relative {:.3g} exceeds tolerance {}", c.max_abs(), c.rel(), tol);
  }

  if (rank == 0 && !opt.dump.empty()) {
    const std::int64_t T = opt.seq_len;
    save_npy(opt.dump + "/o.npy", g_o.data(), {T, H, D});
    save_npy(opt.dump + "/lse.npy", g_lse.data(), {H, T});
    if (opt.backward) {
      save_npy(opt.dump + "/dq.npy", g_dq.data(), {T, H, D});
      save_npy(opt.dump + "/dk.npy", g_dk.data(), {T, K, D});
      save_npy(opt.dump + "/dv.npy", g_dv.data(), {T, K, D});
    }
    log.info("wrote outputs to {}", opt.dump);
  }

  if (rank == 0) {
    const double fwd_ms = summary[0], bwd_ms = summary[4];
    const double tflops = fwd_ms > 0 ? fwd_flops / (fwd_ms * 1e-3) / 1e12 : 0.0;
    const double bwd_tflops = bwd_ms > 0 ? 2.5 * fwd_flops / (bwd_ms * 1e-3) / 1e12 : 0.0;
    // Host-timed compute is real only on CPUs (GPU kernels run asynchronously).
    const bool compute_measured = opt.device == DeviceKind::cpu;
    auto row = [&](const char* pass, const double* t, double rate) {
      const std::string compute = compute_measured ? fmt::format("{:.1f}", t[1]) : "-";
      std::printf("%-10s %10.1f %10.4f %12s %12.1f %14.0f\n", pass, t[0], rate, compute.c_str(), t[2], t[3]);
    };
    std::printf("%-10s %10s %10s %12s %12s %14s\n", "pass", "wall ms", "TFLOP/s", "compute ms", "wait ms", "skipped steps");
    row("forward", summary, tflops);
    if (opt.backward) row("backward", summary + 4, bwd_tflops);
    std::printf("wall, compute and wait: median over %s, slowest rank; compute is local attention and merges%s;\n"
                "skipped steps: of the %d ring steps per pass, those where the causal mask hides every key of the\n"
                "arriving shard from the rank's queries (nothing to compute), most over ranks\n",
                plural(opt.iters, "iteration").c_str(), compute_measured ? "" : " (not timed on GPUs)", nranks);
    // The backend(s) that ran (for "auto" on a GPU: "cudnn", "cuda" or "cudnn+cuda").
    const std::string used_backend = be.name();
    const auto& c = check.comparison;
    std::printf(
        "RESULT {\"program\":\"ring_attention\",\"ranks\":%d,\"seq_len\":%lld,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
        "\"layout\":\"%s\",\"causal\":%s,\"dtype\":\"%s\",\"backend\":\"%s\",\"device\":\"%s\",\"iters\":%d,\"peak_gpu_mem_gib\":%.3f,"
        "\"fwd_ms\":%.3f,\"bwd_ms\":%s,\"tflops\":%.5f,\"bwd_tflops\":%s,\"fwd_compute_ms\":%s,\"fwd_wait_ms\":%.3f,"
        "\"fwd_skipped_steps\":%d,\"check\":\"%s\",\"check_oracle\":\"%s\",\"max_abs_err\":%s,\"rel_err\":%s}\n",
        nranks, static_cast<long long>(opt.seq_len), opt.heads, opt.kv_heads, opt.head_dim, to_string(opt.layout),
        opt.causal ? "true" : "false", to_string(opt.dtype), used_backend.c_str(), to_string(opt.device), opt.iters,
        summary[8] / (1 << 30), fwd_ms, opt.backward ? fmt::format("{:.3f}", bwd_ms).c_str() : "null", tflops,
        opt.backward ? fmt::format("{:.5f}", bwd_tflops).c_str() : "null",
        compute_measured ? fmt::format("{:.3f}", summary[1]).c_str() : "null", summary[2], static_cast<int>(summary[3]),
        check.status.c_str(), check.oracle.c_str(), opt.check ? json_number(c.max_abs(), "{:.3e}").c_str() : "null",
        opt.check ? json_number(c.rel(), "{:.3e}").c_str() : "null");
    std::fflush(stdout);
  }
  std::int64_t bad = check.status == "failed" ? 1 : 0;
  world.allreduce(&bad, 1, ReduceType::i64, ReduceOp::max);
  return bad ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ring_attention: error: %s\n", e.what());
    std::fflush(stderr);
    return 2;
  }
}
