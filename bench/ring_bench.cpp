// longattn-bench ring: sequence-parallel attention scaling under mpirun, for each strategy asked
// for (ring, Ulysses, their hybrid, the cost model's auto). For each sequence length and strategy:
// forward and forward+backward wall time (median), per-GPU TFLOP/s (per-rank GFLOP/s on CPUs),
// overlap efficiency (sum of the local step times measured in a separate profiled run / wall time),
// peak memory, and on GPUs the same problem on one rank alone for strong-scaling efficiency, all in
// one job. Figures a job cannot measure (overlap with one rank, scaling on CPUs) are left out with
// the reason.
//
//   mpirun -np 2 build/bin/longattn-bench ring --seq-lens 131072,524288 --heads 32 --head-dim 128
//          --strategy ring,ulysses,auto
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/device_tensor.hpp"
#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/communicator.hpp"
#include "longattn/error.hpp"
#include "longattn/log.hpp"
#include "longattn/parallel_attention.hpp"
#include "longattn/ring.hpp"

namespace longattn::bench {
namespace {

using examples::DeviceTensor;

struct Measure {
  double fwd_ms = 0, fwdbwd_ms = 0, fwd_compute_ms = 0, bwd_compute_ms = 0, bwd_ms = 0;
  double mem_gib = 0;       // GPU memory in use after the passes (workspaces still held)
  double peak_host_mib = 0;  // the process's peak resident memory during this measure (CPU runs)
  std::string backend;       // what ran ("cudnn", "cuda", "cudnn+cuda" under auto)
  Strategy strategy = Strategy::ring;  // what ran (auto's pick)
  int ulysses = 1;
};

// What to run: a strategy and its options (auto's choice is made once per shape, then the profiled
// run repeats what it chose, so that both runs time the same strategy).
struct StrategyRequest {
  Strategy strategy = Strategy::ring;
  int ulysses_size = 0;
  std::string machine_file;
};

// The process's peak resident memory (VmHWM) in MiB, and its reset (writing 5 to clear_refs): so
// each strategy's peak is its own, not the largest of the job so far. 0 where /proc lacks them.
double peak_resident_mib() {
  std::ifstream status("/proc/self/status");
  std::string key;
  double kib = 0;
  std::string unit;
  while (status >> key) {
    if (key == "VmHWM:" && status >> kib >> unit) return kib / 1024;
    std::getline(status, unit);
  }
  return 0;
}
void reset_peak_resident() { std::ofstream("/proc/self/clear_refs") << "5"; }

std::string strategy_label(Strategy strategy, int ulysses, int ranks) {
  return strategy == Strategy::hybrid ? fmt::format("hybrid {}x{}", ulysses, ranks / ulysses) : to_string(strategy);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Runs one ring configuration on `comm` (every rank of it calls this); with `profile`, also a run
// with every local step timed alone, for the overlap efficiency.
Measure measure(Communicator& comm, Communicator& host, std::int64_t seq, int heads, int kv_heads, int dim, Layout layout,
                bool causal, DType dtype, DeviceKind dev, const std::string& backend_name, int iters, bool backward,
                bool profile, const StrategyRequest& request) {
  if (dev == DeviceKind::cpu) reset_peak_resident();
  AttentionProblem problem;
  problem.cu_seqlens = {0, static_cast<std::int32_t>(seq)};
  problem.q_heads = heads;
  problem.kv_heads = kv_heads;
  problem.head_dim = dim;
  problem.dtype = dtype;
  problem.causal = causal;
  problem.layout = layout;
  ParallelOptions opt;
  opt.strategy = request.strategy;
  opt.ulysses_size = request.ulysses_size;
  opt.machine_file = request.machine_file;
  ParallelAttention ring(comm, problem, opt, make_backend(backend_name, dev));
  const ShardPlan& plan = ring.shards();
  const auto shard = plan.shard(comm.rank());
  const std::int64_t n = shard.tokens();
  auto& be = ring.backend();
  DeviceTensor q(be, dtype, {n, heads, dim}), k(be, dtype, {n, kv_heads, dim}), v(be, dtype, {n, kv_heads, dim});
  DeviceTensor o(be, dtype, {n, heads, dim}), lse(be, DType::f32, {heads, n});
  q.fill_shard(be, shard, 7, 0, nullptr);
  k.fill_shard(be, shard, 7, 1, nullptr);
  v.fill_shard(be, shard, 7, 2, nullptr);
  std::unique_ptr<DeviceTensor> d_o, dq, dk, dv;
  if (backward) {
    d_o = std::make_unique<DeviceTensor>(be, dtype, std::initializer_list<std::int64_t>{n, heads, dim});
    dq = std::make_unique<DeviceTensor>(be, dtype, std::initializer_list<std::int64_t>{n, heads, dim});
    dk = std::make_unique<DeviceTensor>(be, dtype, std::initializer_list<std::int64_t>{n, kv_heads, dim});
    dv = std::make_unique<DeviceTensor>(be, dtype, std::initializer_list<std::int64_t>{n, kv_heads, dim});
    d_o->fill_shard(be, shard, 7, 3, nullptr);
  }
  auto fwd = [&] { ring.forward(q.view, k.view, v.view, o.view, lse.view); };
  auto bwd = [&] { ring.backward(q.view, k.view, v.view, o.view, lse.view, d_o->view, dq->view, dk->view, dv->view); };

  Measure m;
  fwd();  // warm-up (workspaces, kernels, NCCL connections)
  if (backward) bwd();
  std::vector<double> f, fb, b;
  for (int i = 0; i < iters; ++i) {
    host.barrier();
    fwd();
    f.push_back(ring.last_stats().wall_ms);
    if (backward) {
      bwd();
      b.push_back(ring.last_stats().wall_ms);
      fb.push_back(f.back() + b.back());
    }
  }
  m.fwd_ms = median(f);
  m.fwdbwd_ms = backward ? median(fb) : 0;
  m.bwd_ms = backward ? median(b) : 0;
  if (dev == DeviceKind::cuda) m.mem_gib = static_cast<double>(gpu_memory_used_bytes()) / (1 << 30);
  if (profile) {
    // A profiled run of the same strategy: each local step synchronized and timed alone, for the
    // overlap efficiency (the head exchanges count as not hidden).
    ParallelOptions popt = opt;
    popt.strategy = ring.strategy();
    popt.ulysses_size = ring.ulysses_size();
    popt.ring.profile_steps = true;
    ParallelAttention profiled(comm, problem, popt, make_backend(backend_name, dev));
    // Its own warm-up first: a fresh backend builds its cuDNN graphs on first use, which must not be
    // counted as compute time.
    profiled.forward(q.view, k.view, v.view, o.view, lse.view);
    if (backward) profiled.backward(q.view, k.view, v.view, o.view, lse.view, d_o->view, dq->view, dk->view, dv->view);
    host.barrier();
    profiled.forward(q.view, k.view, v.view, o.view, lse.view);
    m.fwd_compute_ms = profiled.last_stats().ring.compute_ms;
    if (backward) {
      profiled.backward(q.view, k.view, v.view, o.view, lse.view, d_o->view, dq->view, dk->view, dv->view);
      m.bwd_compute_ms = profiled.last_stats().ring.compute_ms;
    }
  }
  if (dev == DeviceKind::cpu) m.peak_host_mib = peak_resident_mib();
  // The slowest rank defines the times, the fullest the memory.
  double t[7] = {m.fwd_ms, m.fwdbwd_ms, m.bwd_ms, m.fwd_compute_ms, m.bwd_compute_ms, m.mem_gib, m.peak_host_mib};
  host.allreduce(t, 7, ReduceType::f64, ReduceOp::max);
  return {t[0], t[1], t[3], t[4], t[2], t[5], t[6], be.name(), ring.strategy(), ring.ulysses_size()};
}

std::vector<std::int64_t> parse_list(const std::string& s) {
  std::vector<std::int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::size_t pos = 0;
    long long x = std::stoll(item, &pos);
    if (pos < item.size() && (item[pos] == 'k' || item[pos] == 'K')) x *= 1024;
    if (pos < item.size() && (item[pos] == 'm' || item[pos] == 'M')) x *= 1024 * 1024;
    if (x <= 0) throw Error(ErrorCode::invalid_argument, "sequence length '" + item + "' must be positive");
    out.push_back(x);
  }
  return out;
}

constexpr const char* kUsage =
    "usage: mpirun -np P longattn-bench ring [flags]\n"
    "  --seq-lens L,L,...  sequence lengths, k/m suffixes allowed (default 131072,524288 on cuda, 8192 on cpu)\n"
    "  --heads H           query heads (default 32 on cuda, 4 on cpu); --kv-heads K (default = heads)\n"
    "  --head-dim D        head dimension (default 128 on cuda, 64 on cpu)\n"
    "  --layout L          contiguous | zigzag | striped (default zigzag)\n"
    "  --strategy S,S,...  ring | ulysses | hybrid | auto, each run in turn (default ring)\n"
    "  --ulysses-size U    hybrid's ranks per Ulysses group (default 0 = one node)\n"
    "  --machine-file F    auto's machine model (README, \"Choosing a strategy\")\n"
    "  --dtype T           fp32 | bf16 | fp16 (default bf16 on cuda, fp32 on cpu)\n"
    "  --device D          cpu | cuda (default cuda where NCCL is built); --backend B (default auto)\n"
    "  --iters N           timed repetitions, median reported (default 3)\n"
    "  --single-max N      longest length also run on one rank for strong scaling (default 524288)\n"
    "  --no-causal         no causal mask (default causal); --forward-only: skip the backward\n"
    "Prints per-rank throughput, overlap efficiency (compute time / wall time), peak memory (GPU: in use\n"
    "after the passes; CPU: the process's peak resident memory) and, on GPUs, strong scaling against one\n"
    "rank (a ring on it), per strategy, then a RESULT {json} line.\n";

// Why this job cannot give overlap efficiency ("" when it can). On CPUs the transfers are driven by
// threads on the same cores as the compute, so compute time / ring time does not measure how much
// communication was hidden (and on a shared machine it strays above 1).
std::string why_no_overlap(int ranks, bool gpu) {
  if (ranks == 1) return "one rank: no communication to overlap";
  if (!gpu) return "on CPUs the transfers share the cores with the compute, so the ratio would not measure hiding";
  return "";
}

// Why this job cannot give strong scaling ("" when it can). On CPUs every rank gets its share of
// the node's cores, so the one-rank baseline would run on a fraction of the machine.
std::string why_no_scaling(int ranks, bool gpu) {
  if (ranks == 1) return "one rank: nothing to scale against";
  if (!gpu) return "on CPUs the one-rank baseline gets only one rank's share of the cores";
  return "";
}

int run_ring(int argc, char** argv) {
  // Before MPI starts, so that --help exits without an MPI shutdown.
  examples::Flags f(argc, argv, kUsage,
                    {"seq-lens", "heads", "kv-heads", "head-dim", "layout", "strategy", "ulysses-size", "machine-file", "dtype",
                     "device", "backend", "iters", "single-max"},
                    {"causal", "no-causal", "forward-only"});
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world_communicator();
  require_same_on_all_ranks(*world, "longattn-bench ring flags", f.canonical());
  const bool gpu = f.str("device", nccl_available() ? "cuda" : "cpu") == "cuda";
  const DeviceKind dev = gpu ? DeviceKind::cuda : DeviceKind::cpu;
  const auto seqs = parse_list(f.str("seq-lens", gpu ? "131072,524288" : "8192"));
  const int heads = static_cast<int>(f.integer("heads", gpu ? 32 : 4, 1, 4096));
  const int kv_heads = static_cast<int>(f.integer("kv-heads", heads, 1, 4096));
  const int dim = static_cast<int>(f.integer("head-dim", gpu ? 128 : 64, 1, 1024));
  const Layout layout = parse_layout(f.str("layout", "zigzag"));
  const DType dtype = parse_dtype(f.str("dtype", gpu ? "bf16" : "fp32"));
  const std::string backend = f.str("backend", "auto");
  const int iters = static_cast<int>(f.integer("iters", 3, 1, 100));
  const std::int64_t single_max = f.integer("single-max", 524288, 0, 1LL << 31);  // largest length also run on one rank
  const bool causal = !f.flag("no-causal");
  const bool backward = !f.flag("forward-only");
  std::vector<StrategyRequest> requests;
  {
    std::stringstream list(f.str("strategy", "ring"));
    std::string name;
    while (std::getline(list, name, ','))
      requests.push_back({parse_strategy(name), static_cast<int>(f.integer("ulysses-size", 0, 0, 1 << 20)), f.str("machine-file", "")});
    if (requests.empty()) throw Error(ErrorCode::invalid_argument, "--strategy needs at least one of ring, ulysses, hybrid, auto");
  }

  std::unique_ptr<Communicator> nccl;
  if (gpu) nccl = make_nccl_communicator(*world);
  Communicator& ring_comm = nccl ? *nccl : *world;
  // One-rank baseline: rank 0 alone (its own communicator), the others wait.
  auto solo_host = world->split(world->rank() == 0 ? 0 : 1, world->rank());

  const int P = world->size();
  const std::string no_overlap = why_no_overlap(P, gpu);
  const std::string no_scaling = why_no_scaling(P, gpu);
  // Per-GPU TFLOP/s on GPUs; on CPUs, per-rank GFLOP/s (TFLOP/s would print as 0.0).
  const double flops_unit = gpu ? 1e12 : 1e9;
  const char* unit = gpu ? "TF/gpu" : "GF/rank";
  if (world->rank() == 0) {
    std::printf("longattn-bench ring: %d %s, %s, heads %d/%d, head_dim %d, %s, %s%s\n", P, gpu ? "GPUs" : "CPU ranks",
                to_string(layout), heads, kv_heads, dim, to_string(dtype), causal ? "causal" : "no mask",
                backward ? ", forward+backward" : ", forward only");
    if (!no_overlap.empty()) std::printf("overlap efficiency not measured: %s\n", no_overlap.c_str());
    if (!no_scaling.empty()) std::printf("strong scaling not measured: %s\n", no_scaling.c_str());
    std::string head = fmt::format("{:<9} {:<14} {:>5} {:>10} {:>10} {:>12} {:>12}", "seq", "strategy", gpu ? "gpus" : "ranks",
                                   "fwd ms", "fwd+bwd ms", fmt::format("fwd {}", unit), fmt::format("f+b {}", unit));
    if (no_overlap.empty()) head += fmt::format(" {:>9} {:>9}", "ovl fwd", "ovl bwd");
    if (no_scaling.empty()) head += fmt::format(" {:>10} {:>9}", "1-rank ms", "scaling");
    head += gpu ? fmt::format(" {:>8}", "mem GiB") : fmt::format(" {:>9}", "peak MiB");
    std::printf("%s\n", head.c_str());
  }
  auto json_number = [](bool measured, double x) { return measured ? fmt::format("{:.4f}", x) : std::string("null"); };
  std::string rows, used_backend = backend;
  for (const auto seq : seqs) {
    // One baseline per length: a ring on rank 0 alone (any strategy is a ring on one rank).
    Measure solo;
    const bool scaled = no_scaling.empty() && seq <= single_max;
    if (scaled) {
      if (world->rank() == 0)
        solo = measure(*solo_host, *solo_host, seq, heads, kv_heads, dim, layout, causal, dtype, dev, backend, std::max(1, iters / 2),
                       backward, false, StrategyRequest{});
      world->barrier();
    }
    for (const auto& request : requests) {
      const Measure m = measure(ring_comm, *world, seq, heads, kv_heads, dim, layout, causal, dtype, dev, backend, iters, backward,
                                no_overlap.empty(), request);
      if (world->rank() != 0) continue;
      if (!m.backend.empty()) used_backend = m.backend;
      const double fwd_flops = 4.0 * static_cast<double>(seq) * static_cast<double>(seq) * heads * dim * (causal ? 0.5 : 1.0);
      const double rate_fwd = fwd_flops / P / (m.fwd_ms * 1e-3) / flops_unit;
      const double rate_fb = backward ? 3.5 * fwd_flops / P / (m.fwdbwd_ms * 1e-3) / flops_unit : 0;
      const double ovl_fwd = m.fwd_compute_ms / m.fwd_ms;
      const double ovl_bwd = backward ? m.bwd_compute_ms / m.bwd_ms : 0;
      const double solo_ms = backward ? solo.fwdbwd_ms : solo.fwd_ms;
      const double ring_ms = backward ? m.fwdbwd_ms : m.fwd_ms;
      const double scaling = solo_ms > 0 ? solo_ms / (P * ring_ms) : 0;
      // auto names what it picked: "auto: hybrid 2x2".
      const std::string label = (request.strategy == Strategy::automatic ? "auto: " : "") + strategy_label(m.strategy, m.ulysses, P);
      std::string line = fmt::format("{:<9} {:<14} {:>5} {:>10.1f} {:>10} {:>12.1f} {:>12}", seq, label, P, m.fwd_ms,
                                     backward ? fmt::format("{:.1f}", m.fwdbwd_ms) : "-", rate_fwd,
                                     backward ? fmt::format("{:.1f}", rate_fb) : "-");
      if (no_overlap.empty()) line += fmt::format(" {:>9.3f} {:>9}", ovl_fwd, backward ? fmt::format("{:.3f}", ovl_bwd) : "-");
      if (no_scaling.empty())
        line += scaled ? fmt::format(" {:>10.1f} {:>9.3f}", solo_ms, scaling) : fmt::format(" {:>10} {:>9}", "-", "-");
      line += gpu ? fmt::format(" {:>8.1f}", m.mem_gib) : fmt::format(" {:>9.0f}", m.peak_host_mib);
      std::printf("%s\n", line.c_str());
      rows += fmt::format(
          "{}{{\"seq_len\":{},\"strategy\":\"{}\",\"requested_strategy\":\"{}\",\"ulysses_size\":{},\"ring_size\":{},"
          "\"fwd_ms\":{:.3f},\"fwdbwd_ms\":{:.3f},\"fwd_tflops_per_{}\":{:.4f},\"fwdbwd_tflops_per_{}\":{:.4f},"
          "\"overlap_fwd\":{},\"overlap_bwd\":{},\"single_rank_ms\":{},\"strong_scaling\":{},\"gpu_mem_gib\":{},"
          "\"peak_host_mib\":{}}}",
          rows.empty() ? "" : ",", seq, to_string(m.strategy), to_string(request.strategy), m.ulysses, P / m.ulysses, m.fwd_ms,
          m.fwdbwd_ms, gpu ? "gpu" : "rank", rate_fwd * flops_unit / 1e12, gpu ? "gpu" : "rank", rate_fb * flops_unit / 1e12,
          json_number(no_overlap.empty(), ovl_fwd), json_number(no_overlap.empty() && backward, ovl_bwd), json_number(scaled, solo_ms),
          json_number(scaled, scaling), gpu ? fmt::format("{:.2f}", m.mem_gib) : "null",
          gpu || m.peak_host_mib <= 0 ? "null" : fmt::format("{:.1f}", m.peak_host_mib));
    }
  }
  if (world->rank() == 0)
    std::printf("RESULT {\"bench\":\"ring\",\"ranks\":%d,\"device\":\"%s\",\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"layout\":\"%s\","
                "\"causal\":%s,\"dtype\":\"%s\",\"backend\":\"%s\",\"rows\":[%s]}\n",
                P, to_string(dev), heads, kv_heads, dim, to_string(layout), causal ? "true" : "false", to_string(dtype),
                used_backend.c_str(), rows.c_str());
  return 0;
}

const Register kRing("ring", "sequence-parallel attention by strategy under mpirun: TFLOP/s per GPU, overlap, memory, scaling",
                      run_ring);

}  // namespace
}  // namespace longattn::bench
