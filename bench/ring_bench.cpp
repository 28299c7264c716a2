// longattn-bench ring: ring attention scaling under mpirun. For each sequence length: forward and
// forward+backward wall time (median), per-GPU TFLOP/s, overlap efficiency (sum of the local step
// times measured in a separate profiled run / ring wall time), and the same problem on one rank
// alone for strong-scaling efficiency, all in one job.
//
//   mpirun -np 2 build/bin/longattn-bench ring --seq-lens 131072,524288 --heads 32 --head-dim 128
#include <algorithm>
#include <cstdio>
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
#include "longattn/ring.hpp"

namespace longattn::bench {
namespace {

using examples::DeviceTensor;

struct Measure {
  double fwd_ms = 0, fwdbwd_ms = 0, fwd_compute_ms = 0, bwd_compute_ms = 0, bwd_ms = 0;
  double mem_gib = 0;
  std::string backend;  // what ran ("cudnn", "cuda", "cudnn+cuda" under auto)
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Runs one ring configuration on `comm` (every rank of it calls this).
Measure measure(Communicator& comm, Communicator& host, std::int64_t seq, int heads, int kv_heads, int dim, Layout layout,
                bool causal, DType dtype, DeviceKind dev, const std::string& backend_name, int iters, bool backward) {
  const auto plan = ShardPlan::single_sequence(seq, layout, comm.size());
  const auto shard = plan.shard(comm.rank());
  const std::int64_t n = shard.tokens();
  RingOptions opt;
  opt.causal = causal;
  RingAttention ring(comm, plan, opt, make_backend(backend_name, dev));
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
  m.mem_gib = static_cast<double>(gpu_memory_used_bytes()) / (1 << 30);
  // A profiled run: each local step synchronized and timed alone, for the overlap efficiency.
  RingOptions popt = opt;
  popt.profile_steps = true;
  RingAttention profiled(comm, plan, popt, make_backend(backend_name, dev));
  // Its own warm-up first: a fresh backend builds its cuDNN graphs on first use, which must not be
  // counted as compute time (the first 2-GPU run read overlap 1.65 without this).
  profiled.forward(q.view, k.view, v.view, o.view, lse.view);
  if (backward) profiled.backward(q.view, k.view, v.view, o.view, lse.view, d_o->view, dq->view, dk->view, dv->view);
  host.barrier();
  profiled.forward(q.view, k.view, v.view, o.view, lse.view);
  m.fwd_compute_ms = profiled.last_stats().compute_ms;
  if (backward) {
    profiled.backward(q.view, k.view, v.view, o.view, lse.view, d_o->view, dq->view, dk->view, dv->view);
    m.bwd_compute_ms = profiled.last_stats().compute_ms;
  }
  // The slowest rank defines the times.
  double t[7] = {m.fwd_ms, m.fwdbwd_ms, m.bwd_ms, m.fwd_compute_ms, m.bwd_compute_ms, m.mem_gib, 0};
  host.allreduce(t, 7, ReduceType::f64, ReduceOp::max);
  return {t[0], t[1], t[3], t[4], t[2], t[5], be.name()};
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

int run_ring(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world_communicator();
  examples::Flags f(argc, argv,
                    {"seq-lens", "heads", "kv-heads", "head-dim", "layout", "dtype", "device", "backend", "iters",
                     "single-max"},
                    {"causal", "no-causal", "forward-only"});
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

  std::unique_ptr<Communicator> nccl;
  if (gpu) nccl = make_nccl_communicator(*world);
  Communicator& ring_comm = nccl ? *nccl : *world;
  // One-rank baseline: rank 0 alone (its own communicator), the others wait.
  auto solo_host = world->split(world->rank() == 0 ? 0 : 1, world->rank());

  const int P = world->size();
  if (world->rank() == 0)
    std::printf("%-9s %5s %10s %10s %12s %12s %9s %9s %10s %9s %8s\n", "seq", "gpus", "fwd ms", "fwd+bwd ms", "fwd TF/gpu",
                "f+b TF/gpu", "ovl fwd", "ovl bwd", "1-rank ms", "scaling", "mem GiB");
  std::string rows, used_backend = backend;
  for (const auto seq : seqs) {
    const Measure m = measure(ring_comm, *world, seq, heads, kv_heads, dim, layout, causal, dtype, dev, backend, iters, backward);
    Measure solo;
    if (seq <= single_max && P > 1) {
      if (world->rank() == 0)
        solo = measure(*solo_host, *solo_host, seq, heads, kv_heads, dim, layout, causal, dtype, dev, backend, std::max(1, iters / 2), backward);
      world->barrier();
    }
    if (world->rank() != 0) continue;
    if (!m.backend.empty()) used_backend = m.backend;
    const double fwd_flops = 4.0 * static_cast<double>(seq) * static_cast<double>(seq) * heads * dim * (causal ? 0.5 : 1.0);
    const double tf_fwd = fwd_flops / P / (m.fwd_ms * 1e-3) / 1e12;
    const double tf_fb = backward ? 3.5 * fwd_flops / P / (m.fwdbwd_ms * 1e-3) / 1e12 : 0;
    const double ovl_fwd = m.fwd_compute_ms / m.fwd_ms;
    const double ovl_bwd = backward ? m.bwd_compute_ms / m.bwd_ms : 0;
    const double solo_ms = backward ? solo.fwdbwd_ms : solo.fwd_ms;
    const double ring_ms = backward ? m.fwdbwd_ms : m.fwd_ms;
    const double scaling = solo_ms > 0 ? solo_ms / (P * ring_ms) : 0;
    std::printf("%-9lld %5d %10.1f %10.1f %12.1f %12.1f %9.3f %9.3f %10.1f %9.3f %8.1f\n", static_cast<long long>(seq), P, m.fwd_ms,
                m.fwdbwd_ms, tf_fwd, tf_fb, ovl_fwd, ovl_bwd, solo_ms, scaling, m.mem_gib);
    rows += fmt::format(
        "{}{{\"seq_len\":{},\"fwd_ms\":{:.3f},\"fwdbwd_ms\":{:.3f},\"fwd_tflops_per_gpu\":{:.2f},\"fwdbwd_tflops_per_gpu\":{:.2f},"
        "\"overlap_fwd\":{:.4f},\"overlap_bwd\":{:.4f},\"single_rank_ms\":{:.3f},\"strong_scaling\":{:.4f},\"gpu_mem_gib\":{:.2f}}}",
        rows.empty() ? "" : ",", seq, m.fwd_ms, m.fwdbwd_ms, tf_fwd, tf_fb, ovl_fwd, ovl_bwd, solo_ms, scaling, m.mem_gib);
  }
  if (world->rank() == 0)
    std::printf("RESULT {\"bench\":\"ring\",\"ranks\":%d,\"device\":\"%s\",\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"layout\":\"%s\","
                "\"causal\":%s,\"dtype\":\"%s\",\"backend\":\"%s\",\"rows\":[%s]}\n",
                P, to_string(dev), heads, kv_heads, dim, to_string(layout), causal ? "true" : "false", to_string(dtype),
                used_backend.c_str(), rows.c_str());
  return 0;
}

const Register kRing("ring", "ring attention scaling under mpirun: TFLOP/s per GPU, overlap, strong scaling", run_ring);

}  // namespace
}  // namespace longattn::bench
