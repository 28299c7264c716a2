// varlen_attention: an mpirun job running attention over a packed batch of sequences of mixed
// lengths, balanced over the ranks (the hierarchical planner or a baseline). What a trainer does:
// each rank holds its linear-layer slice of the batch (P equal contiguous slices), remaps q, k, v
// to the attention layout, attends, and remaps o back (with --backward: dO in, dq, dk, dv back).
//
//   LONGATTN_NODE_SIZE=2 mpirun -np 4 build/bin/varlen_attention --seq-lens 0,1,300,5000,900,64
//          --balance hierarchical --causal --backward --check
//
// Ends with one line: RESULT {json}.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <omp.h>

#include "../common/device_tensor.hpp"
#include "check.hpp"
#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"
#include "longattn/error.hpp"
#include "longattn/varlen_attention.hpp"
#include "options.hpp"
#include "report.hpp"

namespace {

using namespace longattn;
using namespace longattn::varlen_job;
using examples::DeviceTensor;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// Every setup error takes this one path: each rank runs the stage, the ranks agree on whether any
// failed, the lowest failing rank prints one line, and all exit with status 2.
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
  if (reporter == rank) {
    std::fprintf(stderr, "varlen_attention: error: %s\n", error.c_str());
    std::fflush(stderr);
  }
  world.barrier();
  return false;
}

struct Job {
  Options opt;
  std::optional<BalancedBatch> batch;
  std::unique_ptr<Communicator> nccl;
  std::unique_ptr<AttentionBackend> backend;
  std::unique_ptr<VarlenAttention> attention;
  std::unique_ptr<VarlenRemap> remap;
};

int run_job(Communicator& world, Job& job) {
  const Options& o = job.opt;
  const BalancedBatch& batch = *job.batch;
  AttentionBackend& be = *job.backend;
  const int rank = world.rank();
  const std::int64_t n_lin = batch.linear_tokens(rank), n = batch.attention_tokens(rank), begin = batch.linear_begin(rank);
  const std::int64_t H = o.heads, K = o.kv_heads, D = o.head_dim;
  RankFigures mine;

  // This rank's linear slice of each input, then the remap to the attention layout.
  auto linear_input = [&](int tensor, std::int64_t heads) {
    DeviceTensor t(be, o.dtype, {n_lin, heads, D});
    t.fill_rows(be, [&](std::int64_t r, std::int64_t c) { return input_value(o, tensor, begin + r, c, heads * D); });
    return t;
  };
  auto remap_in = [&](const DeviceTensor& linear, std::int64_t heads) {
    DeviceTensor t(be, linear.view.dtype, {n, heads, D});
    const auto start = Clock::now();
    job.remap->to_attention(linear.view, t.view);
    mine.remap_ms += ms_since(start);
    mine.remap_bytes += static_cast<double>(job.remap->last_bytes_sent());
    return t;
  };
  auto remap_out = [&](const DeviceTensor& attention, std::int64_t heads) {
    DeviceTensor t(be, attention.view.dtype, {n_lin, heads, D});
    const auto start = Clock::now();
    job.remap->to_linear(attention.view, t.view);
    mine.remap_ms += ms_since(start);
    mine.remap_bytes += static_cast<double>(job.remap->last_bytes_sent());
    return t;
  };
  auto q = remap_in(linear_input(0, H), H), k = remap_in(linear_input(1, K), K), v = remap_in(linear_input(2, K), K);
  DeviceTensor out(be, DType::f32, {n, H, D}), lse(be, DType::f32, {H, n});
  job.attention->forward(q.view, k.view, v.view, out.view, lse.view);
  const auto fwd = job.attention->last_stats();
  mine.forward_ms = fwd.wall_ms;
  mine.bytes_intra += static_cast<double>(fwd.bytes_intra_node);
  mine.bytes_inter += static_cast<double>(fwd.bytes_inter_node);
  std::map<std::string, std::vector<float>> results;
  results["o"] = remap_out(out, H).download(be);
  if (o.backward) {
    auto d_o = remap_in(linear_input(3, H), H);
    DeviceTensor dq(be, DType::f32, {n, H, D}), dk(be, DType::f32, {n, K, D}), dv(be, DType::f32, {n, K, D});
    job.attention->backward(q.view, k.view, v.view, out.view, lse.view, d_o.view, dq.view, dk.view, dv.view);
    const auto bwd = job.attention->last_stats();
    mine.backward_ms = bwd.wall_ms;
    mine.bytes_intra += static_cast<double>(bwd.bytes_intra_node);
    mine.bytes_inter += static_cast<double>(bwd.bytes_inter_node);
    results["dq"] = remap_out(dq, H).download(be);
    results["dk"] = remap_out(dk, K).download(be);
    results["dv"] = remap_out(dv, K).download(be);
  }

  std::string verdict = "not run";
  if (o.check) {
    const auto result = check_linear_slice(o, batch, rank, [&](const std::string& name) -> const std::vector<float>& { return results.at(name); });
    std::int64_t failed = result.passed ? 0 : 1;
    world.allreduce(&failed, 1, ReduceType::i64, ReduceOp::max);
    double errors[2] = {result.o_error, result.grad_error};
    world.allreduce(errors, 2, ReduceType::f64, ReduceOp::max);
    verdict = fmt::format("{} (o {:.2e}{})", failed ? "FAILED" : "passed", errors[0],
                          o.backward ? fmt::format(", grads {:.2e}", errors[1]) : std::string());
    if (failed && rank == 0) std::fprintf(stderr, "varlen_attention: error: --check failed: %s\n", verdict.c_str());
    if (failed) {
      world.barrier();
      return 1;
    }
  }

  std::vector<RankFigures> all(static_cast<std::size_t>(world.size()));
  world.allgather(&mine, all.data(), sizeof(RankFigures));
  if (rank == 0) print_report(o, batch, all, verdict);
  return 0;
}

int run(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world_communicator();
  const int rank = world->rank();
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      if (rank == 0) std::fputs(kUsage, stdout);
      return 0;
    }

  Job job;
  std::optional<examples::Flags> flags;
  const Topology topo = world->topology();
  if (!setup_stage(*world, [&] { flags.emplace(read_flags(argc, argv)); })) return 2;
  if (!setup_stage(*world, [&] { require_same_on_all_ranks(*world, "command-line flags", flags->canonical()); })) return 2;
  // The plan: pure and the same on every rank, so a bad batch is the same one-line error everywhere.
  if (!setup_stage(*world, [&] {
        job.opt = parse_options(*flags);
        std::int64_t lo = topo.local_size, hi = topo.local_size;
        world->allreduce(&lo, 1, ReduceType::i64, ReduceOp::min);
        world->allreduce(&hi, 1, ReduceType::i64, ReduceOp::max);
        require(job.opt.gpus_per_node > 0 || lo == hi,
                         "the nodes hold between {} and {} ranks: give --gpus-per-node", lo, hi);
        job.batch.emplace(balance_request(job.opt, world->size(), topo.local_size));
      }))
    return 2;
  omp_set_num_threads(cpu_threads_per_process(topo.local_size));
  if (!setup_stage(*world, [&] {
        if (job.opt.device == DeviceKind::cuda) job.nccl = make_nccl_communicator(*world);
        job.backend = make_backend("auto", job.opt.device);
      }))
    return 2;
  Communicator& comm = job.nccl ? *job.nccl : *world;
  if (!setup_stage(*world, [&] {
        job.attention = std::make_unique<VarlenAttention>(comm, *job.batch, VarlenOptions{},
                                                          make_backend("auto", job.opt.device));
        job.remap = std::make_unique<VarlenRemap>(comm, *job.batch, job.attention->backend().device_ops());
      }))
    return 2;
  try {
    return run_job(*world, job);
  } catch (const std::exception& e) {
    // Past setup every rank is inside collective work: one that fails alone must end the job.
    std::fprintf(stderr, "varlen_attention: error: rank %d: %s\n", rank, e.what());
    std::fflush(stderr);
    MpiSession::abort(2);
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "varlen_attention: error: %s\n", e.what());
    return 2;
  }
}
