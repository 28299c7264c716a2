// ring_attention: an mpirun job running ring attention forward (and backward) over a sequence
// sharded across the ranks, optionally checked against a single-process oracle on rank 0.
//
//   mpirun -np 4 build/bin/ring_attention --seq-len 16384 --heads 8 --kv-heads 2 --head-dim 64
//          --layout zigzag --causal --backward --check
//
// Ends with one line: RESULT {json}.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <omp.h>

#include "../common/device_tensor.hpp"
#include "../common/flags.hpp"
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

namespace {

using namespace longattn;
using examples::DeviceTensor;
using examples::random_value;

constexpr const char* kUsage = R"(usage: mpirun -np P ring_attention [flags]
  --seq-len N        tokens in the sequence (default 4096; with --load, from the files)
  --heads H          query heads (default 8)
  --kv-heads K       key/value heads, H % K == 0 (default = heads)
  --head-dim D       head dimension (default 64)
  --layout L         contiguous | zigzag | striped (default zigzag)
  --causal           causal mask
  --dtype T          fp32 | bf16 | fp16 (default fp32 on cpu, bf16 on cuda)
  --device D         cpu | cuda (default cuda where GPUs and NCCL exist): one GPU per rank, NCCL ring
  --backend B        local attention backend: auto | cpu | reference | cuda | cudnn (default auto)
  --backward         also run the backward pass
  --check            compare with a single-process oracle on rank 0; fail beyond tolerance
  --check-oracle O   auto | reference | cpu: reference (double precision) below ~2e10 FLOPs under auto
  --load DIR         read q.npy [T,H,D], k.npy and v.npy [T,K,D] (and do.npy with --backward), float32
  --dump DIR         write o.npy [T,H,D], lse.npy [H,T] (and dq.npy, dk.npy, dv.npy), float32
  --seed S           random input seed (default 1234)
  --iters N          timed repetitions, the median is reported (default 1)
)";

struct Options {
  std::int64_t seq_len = 4096;
  int heads = 8, kv_heads = 8, head_dim = 64;
  Layout layout = Layout::zigzag;
  bool causal = false, backward = false, check = false;
  DType dtype = DType::f32;
  std::string backend = "auto", oracle = "auto", load, dump;
  DeviceKind device = DeviceKind::cpu;
  std::uint64_t seed = 1234;
  int iters = 1;
};

Options parse(const examples::Flags& f) {
  Options o;
  o.seq_len = f.integer("seq-len", o.seq_len, 1, (1LL << 31) - 1);
  o.heads = static_cast<int>(f.integer("heads", o.heads, 1, 4096));
  o.kv_heads = static_cast<int>(f.integer("kv-heads", o.heads, 1, 4096));
  o.head_dim = static_cast<int>(f.integer("head-dim", o.head_dim, 1, 1024));
  o.layout = parse_layout(f.str("layout", "zigzag"));
  o.causal = f.flag("causal");
  o.backward = f.flag("backward");
  o.check = f.flag("check");

  o.backend = f.str("backend", "auto");
  {
    const auto names = available_backends();
    if (o.backend != "auto" && std::find(names.begin(), names.end(), o.backend) == names.end())
      throw Error(ErrorCode::invalid_argument,
                  fmt::format("unknown or unavailable backend '{}'; here: auto, {}", o.backend, fmt::join(names, ", ")));
  }
  const std::string device = f.str("device", nccl_available() ? "cuda" : "cpu");
  if (device == "cuda") {
    if (!nccl_available())
      throw Error(ErrorCode::unsupported, "--device cuda needs a GPU and a longattn built with CUDA and NCCL; use --device cpu");
    o.device = DeviceKind::cuda;
  } else if (device != "cpu") {
    throw Error(ErrorCode::invalid_argument, "--device must be cpu or cuda, got '" + device + "'");
  }
  o.dtype = parse_dtype(f.str("dtype", o.device == DeviceKind::cuda ? "bf16" : "fp32"));
  if (o.device == DeviceKind::cuda && o.dtype == DType::f32)
    throw Error(ErrorCode::unsupported, "the GPU kernels take bf16 or fp16 inputs: add --dtype bf16");
  o.oracle = f.str("check-oracle", "auto");
  o.load = f.str("load", "");
  o.dump = f.str("dump", "");
  o.seed = static_cast<std::uint64_t>(f.integer("seed", 1234, 0, (1LL << 62)));
  o.iters = static_cast<int>(f.integer("iters", 1, 1, 1000));
  if (o.oracle != "auto" && o.oracle != "reference" && o.oracle != "cpu")
    throw Error(ErrorCode::invalid_argument, "--check-oracle must be auto, reference or cpu, got '" + o.oracle + "'");
  return o;
}

// Rows [T, width] of one input tensor as f32, either read from a file or generated.
struct Input {
  std::vector<std::int64_t> shape;  // [T, heads, dim]
  std::vector<float> full;          // only when loaded from a file (or built for the check)
};

Input load_input(const std::string& dir, const char* name) {
  auto a = load_npy(dir + "/" + name);
  if (a.shape.size() != 3)
    throw Error(ErrorCode::io, fmt::format("{}/{}: expected 3 dimensions [tokens, heads, dim], got {}", dir, name, a.shape.size()));
  return {a.shape, std::move(a.data)};
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

int run_job(Communicator& world_comm, const Options& opt, const std::optional<Input>& in_q, const std::optional<Input>& in_k,
            const std::optional<Input>& in_v, const std::optional<Input>& in_do);

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct ErrorStats {
  double max_abs = 0, max_ref = 0;
  void add(const std::vector<float>& got, const std::vector<float>& want) {
    for (std::size_t i = 0; i < got.size() && i < want.size(); ++i) {
      const double a = got[i], b = want[i];
      if (std::isinf(a) && std::isinf(b) && a == b) continue;
      const double d = std::abs(a - b);
      max_abs = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(max_abs, d);
      if (std::isfinite(b)) max_ref = std::max(max_ref, std::abs(b));
    }
  }
  double rel() const { return max_abs / (max_ref > 0 ? max_ref : 1.0); }
};

int run(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world_communicator();
  const int rank = world->rank(), nranks = world->size();

  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      if (rank == 0) std::fputs(kUsage, stdout);
      return 0;
    }

  // Setup errors (flags, files, shapes) are agreed on collectively so that every rank exits with
  // the same message instead of some ranks hanging in the first collective.
  Options opt;
  std::optional<Input> in_q, in_k, in_v, in_do;
  std::string setup_error;
  try {
    examples::Flags flags(argc, argv,
                          {"seq-len", "heads", "kv-heads", "head-dim", "layout", "dtype", "device", "backend", "check-oracle", "load",
                           "dump", "seed", "iters"},
                          {"causal", "backward", "check"});
    require_same_on_all_ranks(*world, "command-line flags", flags.canonical());
    opt = parse(flags);
    if (!opt.load.empty()) {
      in_q = load_input(opt.load, "q.npy");
      in_k = load_input(opt.load, "k.npy");
      in_v = load_input(opt.load, "v.npy");
      if (opt.backward) in_do = load_input(opt.load, "do.npy");
      const auto& qs = in_q->shape;
      if (in_k->shape != in_v->shape)
        throw Error(ErrorCode::invalid_argument, fmt::format("k.npy and v.npy shapes differ: [{}] vs [{}]", fmt::join(in_k->shape, ","), fmt::join(in_v->shape, ",")));
      if (in_k->shape[0] != qs[0] || in_k->shape[2] != qs[2])
        throw Error(ErrorCode::invalid_argument, fmt::format("q.npy [{}] and k.npy [{}] disagree in tokens or head dim", fmt::join(qs, ","), fmt::join(in_k->shape, ",")));
      if (in_do && in_do->shape != qs)
        throw Error(ErrorCode::invalid_argument, fmt::format("do.npy [{}] must have q.npy's shape [{}]", fmt::join(in_do->shape, ","), fmt::join(qs, ",")));
      opt.seq_len = qs[0];
      opt.heads = static_cast<int>(qs[1]);
      opt.kv_heads = static_cast<int>(in_k->shape[1]);
      opt.head_dim = static_cast<int>(qs[2]);
    }
    if (opt.heads % opt.kv_heads != 0)
      throw Error(ErrorCode::invalid_argument, fmt::format("--heads ({}) must be a multiple of --kv-heads ({})", opt.heads, opt.kv_heads));
  } catch (const std::exception& e) {
    setup_error = e.what();
  }
  // The lowest rank that failed reports; the others exit quietly with the same status.
  std::int64_t reporter = setup_error.empty() ? nranks : rank;
  world->allreduce(&reporter, 1, ReduceType::i64, ReduceOp::min);
  if (reporter < nranks) {
    // Print before anyone exits: mpirun kills the job at the first non-zero exit, which could
    // otherwise swallow the reporter's line.
    if (reporter == rank) {
      std::fprintf(stderr, "ring_attention: error: %s\n", setup_error.c_str());
      std::fflush(stderr);
    }
    world->barrier();
    return 2;
  }
  try {
    return run_job(*world, opt, in_q, in_k, in_v, in_do);
  } catch (const std::exception& e) {
    // Past setup, peers may be blocked in a collective with us: report and take the job down.
    std::fprintf(stderr, "ring_attention: error on rank %d: %s\n", rank, e.what());
    std::fflush(stderr);
    MpiSession::abort(2);
    return 2;
  }
}

int run_job(Communicator& world_comm, const Options& opt, const std::optional<Input>& in_q, const std::optional<Input>& in_k,
            const std::optional<Input>& in_v, const std::optional<Input>& in_do) {
  Communicator* world = &world_comm;
  const int rank = world->rank(), nranks = world->size();
  auto& log = logger(Subsystem::app);

  const Topology topo = world->topology();
  omp_set_num_threads(cpu_threads_per_process(topo.local_size));
  const auto plan = ShardPlan::single_sequence(opt.seq_len, opt.layout, nranks);
  const auto shard = plan.shard(rank);
  const std::int64_t n = shard.tokens(), H = opt.heads, K = opt.kv_heads, D = opt.head_dim;
  // On GPUs the ring runs over NCCL (which also picks this rank's GPU); on CPUs over MPI.
  std::unique_ptr<Communicator> nccl;
  if (opt.device == DeviceKind::cuda) nccl = make_nccl_communicator(*world);
  Communicator& ring_comm = nccl ? *nccl : *world;
  auto backend = make_backend(opt.backend, opt.device);
  const std::string backend_name = backend->name();

  RingOptions ropt;
  ropt.causal = opt.causal;
  const bool progress = rank == 0 && opt.seq_len * opt.seq_len * H * D >= (1LL << 36);
  ropt.on_step = [&](const char* phase, int step, int steps) {
    if (progress) log.info("{} step {}/{}", phase, step, steps);
  };
  RingAttention ring(ring_comm, plan, ropt, std::move(backend));
  AttentionBackend& be = ring.backend();

  DeviceTensor q(be, opt.dtype, {n, H, D}), k(be, opt.dtype, {n, K, D}), v(be, opt.dtype, {n, K, D});
  q.fill_shard(be, shard, opt.seed, 0, in_q ? &in_q->full : nullptr);
  k.fill_shard(be, shard, opt.seed, 1, in_k ? &in_k->full : nullptr);
  v.fill_shard(be, shard, opt.seed, 2, in_v ? &in_v->full : nullptr);
  DeviceTensor o(be, opt.dtype, {n, H, D}), lse(be, DType::f32, {H, n});

  if (rank == 0)
    log.info("ring attention: {} ranks, {} tokens ({} per rank), {} heads / {} kv heads, dim {}, {}, {}{}, backend {}", nranks,
             opt.seq_len, n, H, K, D, to_string(opt.layout), to_string(opt.dtype), opt.causal ? ", causal" : "",
             backend_name);

  // Device memory in use on this rank's GPU (whole device: context, libraries, pools included).
  auto log_memory = [&](const char* when) {
    if (opt.device == DeviceKind::cuda && rank == 0)
      log.info("GPU memory in use {}: {:.2f} GiB", when, static_cast<double>(gpu_memory_used_bytes()) / (1 << 30));
  };
  log_memory("after setup");
  std::vector<double> fwd_ms, bwd_ms;
  RingStats fwd_stats, bwd_stats;
  for (int it = 0; it < opt.iters; ++it) {
    world->barrier();
    ring.forward(q.view, k.view, v.view, o.view, lse.view);
    fwd_stats = ring.last_stats();
    fwd_ms.push_back(fwd_stats.wall_ms);
  }
  std::size_t mem_peak = gpu_memory_used_bytes();
  log_memory("after forward");
  std::optional<DeviceTensor> d_o, dq, dk, dv;
  if (opt.backward) {
    d_o.emplace(be, opt.dtype, std::initializer_list<std::int64_t>{n, H, D});
    d_o->fill_shard(be, shard, opt.seed, 3, in_do ? &in_do->full : nullptr);
    dq.emplace(be, opt.dtype, std::initializer_list<std::int64_t>{n, H, D});
    dk.emplace(be, opt.dtype, std::initializer_list<std::int64_t>{n, K, D});
    dv.emplace(be, opt.dtype, std::initializer_list<std::int64_t>{n, K, D});
    for (int it = 0; it < opt.iters; ++it) {
      world->barrier();
      ring.backward(q.view, k.view, v.view, o.view, lse.view, d_o->view, dq->view, dk->view, dv->view);
      bwd_stats = ring.last_stats();
      bwd_ms.push_back(bwd_stats.wall_ms);
    }
    mem_peak = std::max(mem_peak, gpu_memory_used_bytes());
    log_memory("after backward");
  }
  // The slowest rank defines the step time; peak device memory is the largest over ranks.
  double times[3] = {median(fwd_ms), median(bwd_ms), static_cast<double>(mem_peak)};
  world->allreduce(times, 3, ReduceType::f64, ReduceOp::max);

  // Gather results on rank 0 for --check and --dump.
  std::vector<float> g_o, g_lse, g_dq, g_dk, g_dv;
  if (opt.check || !opt.dump.empty()) {
    g_o = gather_rows(*world, plan, o.download(be), H * D);
    g_lse = gather_rows(*world, plan, transpose(lse.download(be), H, n), H);
    if (rank == 0) g_lse = transpose(g_lse, opt.seq_len, H);
    if (opt.backward) {
      g_dq = gather_rows(*world, plan, dq->download(be), H * D);
      g_dk = gather_rows(*world, plan, dk->download(be), K * D);
      g_dv = gather_rows(*world, plan, dv->download(be), K * D);
    }
  }

  const double causal_factor = opt.causal ? 0.5 : 1.0;
  const double fwd_flops = 4.0 * static_cast<double>(opt.seq_len) * static_cast<double>(opt.seq_len) * H * D * causal_factor;
  std::string check = "skipped", oracle;
  ErrorStats err;
  if (rank == 0 && opt.check) {
    const std::int64_t T = opt.seq_len;
    oracle = opt.oracle;
    if (oracle == "auto") oracle = fwd_flops * (opt.backward ? 3.5 : 1.0) <= 2e10 ? "reference" : "cpu";
    log.info("checking against the single-process '{}' oracle", oracle);
    auto ob = make_backend(oracle, DeviceKind::cpu);
    omp_set_num_threads(cpu_threads_per_process(1));
    // The oracle sees the same rounded inputs as the ring: the full tensors go through the dtype.
    auto make_full = [&](const Input* in, int tensor, std::int64_t heads) {
      auto full = full_rows(in, opt.seed, tensor, T, heads * D);
      HostBuffer buf(full.size() * dtype_size(opt.dtype));
      convert_from_f32(full.data(), buf.data(), opt.dtype, full.size());
      return buf;
    };
    HostBuffer fq = make_full(in_q ? &*in_q : nullptr, 0, H), fk = make_full(in_k ? &*in_k : nullptr, 1, K),
               fv = make_full(in_v ? &*in_v : nullptr, 2, K);
    AttentionArgs a;
    a.q = TensorView(fq.data(), opt.dtype, {T, H, D});
    a.k = TensorView(fk.data(), opt.dtype, {T, K, D});
    a.v = TensorView(fv.data(), opt.dtype, {T, K, D});
    a.causal = opt.causal;
    std::vector<float> ro(static_cast<std::size_t>(T * H * D)), rl(static_cast<std::size_t>(H * T));
    ob->forward(a, {TensorView(ro.data(), DType::f32, {T, H, D}), TensorView(rl.data(), DType::f32, {H, T})});
    err.add(g_o, ro);
    err.add(g_lse, rl);
    if (opt.backward) {
      HostBuffer fdo = make_full(in_do ? &*in_do : nullptr, 3, H);
      std::vector<float> rdq(static_cast<std::size_t>(T * H * D)), rdk(static_cast<std::size_t>(T * K * D)),
          rdv(static_cast<std::size_t>(T * K * D));
      // Backward from the oracle's own forward results, as a single process would do it.
      BackwardArgs g;
      g.o = TensorView(ro.data(), DType::f32, {T, H, D});
      g.lse = TensorView(rl.data(), DType::f32, {H, T});
      g.d_o = TensorView(fdo.data(), opt.dtype, {T, H, D});
      g.dq = TensorView(rdq.data(), DType::f32, {T, H, D});
      g.dk = TensorView(rdk.data(), DType::f32, {T, K, D});
      g.dv = TensorView(rdv.data(), DType::f32, {T, K, D});
      ob->backward(a, g);
      err.add(g_dq, rdq);
      err.add(g_dk, rdk);
      err.add(g_dv, rdv);
    }
    const double tol = opt.dtype == DType::f32 ? 2e-4 : 3e-2;
    check = err.rel() <= tol ? "passed" : "failed";
    if (check == "passed") log.info("check passed: max abs error {:.3g}, relative {:.3g} (tolerance {})", err.max_abs, err.rel(), tol);
    else log.error("CHECK FAILED: max abs error {:.3g}, relative {:.3g} exceeds tolerance {}", err.max_abs, err.rel(), tol);
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
    const double tflops = times[0] > 0 ? fwd_flops / (times[0] * 1e-3) / 1e12 : 0.0;
    const double bwd_tflops = times[1] > 0 ? 2.5 * fwd_flops / (times[1] * 1e-3) / 1e12 : 0.0;
    std::printf("%-10s %10s %10s %12s %12s %10s\n", "pass", "wall ms", "TFLOP/s", "compute ms", "wait ms", "skipped");
    std::printf("%-10s %10.1f %10.4f %12.1f %12.1f %10d\n", "forward", times[0], tflops, fwd_stats.compute_ms, fwd_stats.wait_ms, fwd_stats.skipped_steps);
    if (opt.backward)
      std::printf("%-10s %10.1f %10.4f %12.1f %12.1f %10d\n", "backward", times[1], bwd_tflops, bwd_stats.compute_ms, bwd_stats.wait_ms, bwd_stats.skipped_steps);
    // The backend(s) that ran (for "auto" on a GPU: "cudnn", "cuda" or "cudnn+cuda").
    const std::string used_backend = be.name();
    std::printf(
        "RESULT {\"program\":\"ring_attention\",\"ranks\":%d,\"seq_len\":%lld,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
        "\"layout\":\"%s\",\"causal\":%s,\"dtype\":\"%s\",\"backend\":\"%s\",\"device\":\"%s\",\"peak_gpu_mem_gib\":%.3f,\"fwd_ms\":%.3f,\"bwd_ms\":%s,"
        "\"tflops\":%.5f,\"bwd_tflops\":%s,\"fwd_compute_ms\":%.3f,\"fwd_wait_ms\":%.3f,\"check\":\"%s\",\"check_oracle\":\"%s\","
        "\"max_abs_err\":%s,\"rel_err\":%s}\n",
        nranks, static_cast<long long>(opt.seq_len), opt.heads, opt.kv_heads, opt.head_dim, to_string(opt.layout),
        opt.causal ? "true" : "false", to_string(opt.dtype), used_backend.c_str(), to_string(opt.device), times[2] / (1 << 30), times[0],
        opt.backward ? fmt::format("{:.3f}", times[1]).c_str() : "null", tflops,
        opt.backward ? fmt::format("{:.5f}", bwd_tflops).c_str() : "null", fwd_stats.compute_ms, fwd_stats.wait_ms,
        check.c_str(), oracle.c_str(), opt.check ? fmt::format("{:.3e}", err.max_abs).c_str() : "null",
        opt.check ? fmt::format("{:.3e}", err.rel()).c_str() : "null");
    std::fflush(stdout);
  }
  std::int64_t bad = check == "failed" ? 1 : 0;
  world->allreduce(&bad, 1, ReduceType::i64, ReduceOp::max);
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
