// ring_attention: an mpirun job running sequence-parallel attention forward (and backward) over a
// sequence sharded across the ranks, by the strategy asked for (a ring, Ulysses, their hybrid, or
// the cost model's choice), optionally checked against a single-process oracle on rank 0.
//
//   mpirun -np 4 build/bin/ring_attention --seq-len 16384 --heads 8 --kv-heads 2 --head-dim 64
//          --layout zigzag --causal --backward --check [--strategy hybrid --ulysses-size 2]
//
// Ends with one line: RESULT {json}.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
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
#include "check.hpp"
#include "inputs.hpp"
#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"
#include "longattn/error.hpp"
#include "longattn/layout.hpp"
#include "longattn/log.hpp"
#include "longattn/npy.hpp"
#include "longattn/parallel_attention.hpp"
#include "longattn/ring.hpp"
#include "memory_estimate.hpp"
#include "options.hpp"
#include "report.hpp"

namespace {

using namespace longattn;
using namespace longattn::ring_job;
using examples::DeviceTensor;

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

// One pass's timings on this rank, one entry per iteration (reported as medians).
struct PassTimes {
  std::vector<double> wall, compute, wait, exchange;
  int skipped = 0;
  void add(const ParallelStats& s) {
    wall.push_back(s.wall_ms);
    compute.push_back(s.ring.compute_ms);
    wait.push_back(s.ring.wait_ms);
    exchange.push_back(s.exchange_ms);
    skipped = s.ring.skipped_steps;
  }
};

// What the setup stages build, in the order they build it.
struct Job {
  Options opt;
  Inputs in;
  std::optional<ShardPlan> plan;
  RankShard shard;  // this rank's tokens
  std::unique_ptr<Communicator> nccl;
  std::unique_ptr<AttentionBackend> backend;
  std::unique_ptr<ParallelAttention> attention;
  std::optional<DeviceTensor> q, k, v, o, lse, d_o, dq, dk, dv;
  int iteration = 0;  // of the pass running now, for the progress lines
};

int run_job(Communicator& world, Job& job);

// torchrun's variables without those of an MPI launcher (Open MPI, MPICH/Hydra, PMIx under Slurm).
bool launched_by_torchrun() {
  for (const char* mpi_variable : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(mpi_variable)) return false;
  return torchrun_environment_present();
}

int run(int argc, char** argv) {
  // Under torchrun (its variables set, no MPI launcher's) the job runs over TCP instead of MPI.
  const bool over_tcp = launched_by_torchrun();
  std::optional<MpiSession> mpi;
  if (!over_tcp) mpi.emplace(&argc, &argv);
  auto world = over_tcp ? make_tcp_communicator_from_env() : make_mpi_world_communicator();
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
  // Flags and files: local work on every rank, nothing the size of the sequence built yet.
  if (!setup_stage(*world, [&] {
        opt = parse_options(*flags);
        job.in = open_inputs(opt);
        check_shape(opt);
        // --dump's folder is made now, so that an unwritable path fails before the work, not after.
        std::error_code dump_error;
        if (rank == 0 && !opt.dump.empty() && !std::filesystem::is_directory(opt.dump) &&
            !std::filesystem::create_directories(opt.dump, dump_error))
          throw Error(ErrorCode::io, fmt::format("--dump {}: cannot create the folder ({})", opt.dump,
                                                 dump_error ? dump_error.message() : "a file of that name exists"));
      }))
    return 2;
  omp_set_num_threads(cpu_threads_per_process(topo.local_size));
  // On GPUs the ring runs over NCCL (which also picks this rank's GPU); on CPUs over MPI.
  if (!setup_stage(*world, [&] {
        if (opt.device == DeviceKind::cuda) job.nccl = make_nccl_communicator(*world);
        job.backend = make_backend(opt.backend, opt.device);
      }))
    return 2;
  // The strategy (and so which tokens each rank holds): collective, and cheap: nothing the size of
  // the sequence is allocated before the first pass.
  if (!setup_stage(*world, [&] {
        RingOptions ropt;
        ropt.gradient_transport = opt.grad_transport;
        const bool progress = rank == 0 && static_cast<double>(opt.seq_len) * static_cast<double>(opt.seq_len) * opt.heads *
                                                   opt.head_dim >= static_cast<double>(1LL << 36);
        // Long runs report every step; short ones only at debug level.
        ropt.on_step = [&job, progress](const char* phase, int step, int steps) {
          auto& log = logger(Subsystem::app);
          constexpr const char* kLine = "{} iteration {}/{}, step {}/{}";
          if (progress) log.info(kLine, phase, job.iteration, job.opt.iters, step, steps);
          else log.debug(kLine, phase, job.iteration, job.opt.iters, step, steps);
        };
        Communicator& comm = job.nccl ? *job.nccl : *world;
        AttentionProblem problem;
        problem.cu_seqlens = {0, static_cast<std::int32_t>(opt.seq_len)};
        problem.q_heads = opt.heads;
        problem.kv_heads = opt.kv_heads;
        problem.head_dim = opt.head_dim;
        problem.dtype = opt.dtype;
        problem.causal = opt.causal;
        problem.layout = opt.layout;
        ParallelOptions popt;
        popt.strategy = opt.strategy;
        popt.ulysses_size = opt.ulysses_size;
        popt.machine_file = opt.machine_file;
        popt.ring = std::move(ropt);
        job.attention = std::make_unique<ParallelAttention>(comm, std::move(problem), std::move(popt), std::move(job.backend));
      }))
    return 2;
  // The memory estimate for the strategy that runs, then this rank's rows: nothing the size of the
  // sequence is read before the estimate says it fits.
  if (!setup_stage(*world, [&] {
        job.plan.emplace(job.attention->shards());
        require_memory(opt, nranks, job.attention->ulysses_size(), topo.local_size, rank == 0);
        job.shard = job.plan->shard(rank);
        read_inputs(job.in, job.shard, opt.dtype);
      }))
    return 2;
  if (!setup_stage(*world, [&] {
        AttentionBackend& be = job.attention->backend();
        const RankShard& shard = job.shard;
        const std::int64_t n = shard.tokens(), H = opt.heads, K = opt.kv_heads, D = opt.head_dim;
        auto make = [&](std::optional<DeviceTensor>& t, DType type, std::int64_t a, std::int64_t b, std::int64_t c) {
          t.emplace(be, type, std::initializer_list<std::int64_t>{a, b, c});
        };
        make(job.q, opt.dtype, n, H, D);
        make(job.k, opt.dtype, n, K, D);
        make(job.v, opt.dtype, n, K, D);
        make(job.o, opt.dtype, n, H, D);
        job.lse.emplace(be, DType::f32, std::initializer_list<std::int64_t>{H, n});
        // This rank's rows: from the file, or generated from the seed.
        auto fill = [&](DeviceTensor& t, int tensor, const std::optional<Input>& file) {
          if (!file) return t.fill_shard(be, shard, opt.seed, tensor, nullptr);
          const std::int64_t width = t.width();
          t.fill_rows(be, [&](std::int64_t r, std::int64_t c) { return file->rows[static_cast<std::size_t>(r * width + c)]; });
        };
        fill(*job.q, 0, job.in.q);
        fill(*job.k, 1, job.in.k);
        fill(*job.v, 2, job.in.v);
        if (opt.backward) {
          make(job.d_o, opt.dtype, n, H, D);
          make(job.dq, opt.dtype, n, H, D);
          make(job.dk, opt.dtype, n, K, D);
          make(job.dv, opt.dtype, n, K, D);
          fill(*job.d_o, 3, job.in.d_o);
        }
      }))
    return 2;
  try {
    return run_job(*world, job);
  } catch (const std::exception& e) {
    // Past setup, peers may be blocked in a collective with us: report and take the job down.
    std::fprintf(stderr, "ring_attention: error on rank %d: %s\n", rank, e.what());
    std::fflush(stderr);
    if (over_tcp) std::_Exit(2);  // peers see the connection close and name this rank
    MpiSession::abort(2);
    return 2;
  }
}

int run_job(Communicator& world, Job& job) {
  const Options& opt = job.opt;
  const ShardPlan& plan = *job.plan;
  const int rank = world.rank(), nranks = world.size();
  auto& log = logger(Subsystem::app);
  ParallelAttention& attention = *job.attention;
  AttentionBackend& be = attention.backend();
  const std::string backend_name = be.name();
  const std::int64_t n = plan.local_tokens(rank), H = opt.heads, K = opt.kv_heads, D = opt.head_dim;
  const int ulysses = attention.ulysses_size(), ring_size = nranks / ulysses;

  if (rank == 0) {
    log.info("{} attention: {}, {}, {} heads / {} kv heads, dim {}, {}, {}{}, backend {}", to_string(attention.strategy()),
             plural(nranks, "rank"), token_spread(plan), H, K, D, to_string(opt.layout), to_string(opt.dtype),
             opt.causal ? ", causal" : "", backend_name);
    // auto's candidates were logged where they were priced; a requested strategy says what it runs.
    if (opt.strategy == Strategy::automatic)
      log.info("strategy auto chose {}: U = {}, R = {}", to_string(attention.strategy()), ulysses, ring_size);
    else
      log.info("strategy {}: U = {}, R = {}; {}", to_string(attention.strategy()), ulysses, ring_size, attention.choice_reason());
  }

  // Device memory in use on this rank's GPU (whole device: context, libraries, pools included).
  auto log_memory = [&](const char* when) {
    if (opt.device == DeviceKind::cuda && rank == 0)
      log.info("GPU memory in use {}: {:.2f} GiB", when, static_cast<double>(gpu_memory_used_bytes()) / (1 << 30));
  };
  log_memory("after setup");
  PassTimes fwd, bwd;
  for (job.iteration = 1; job.iteration <= opt.iters; ++job.iteration) {
    world.barrier();
    attention.forward(job.q->view, job.k->view, job.v->view, job.o->view, job.lse->view);
    fwd.add(attention.last_stats());
  }
  std::size_t mem_peak = gpu_memory_used_bytes();
  log_memory("after forward");
  if (opt.backward) {
    for (job.iteration = 1; job.iteration <= opt.iters; ++job.iteration) {
      world.barrier();
      attention.backward(job.q->view, job.k->view, job.v->view, job.o->view, job.lse->view, job.d_o->view, job.dq->view,
                         job.dk->view, job.dv->view);
      bwd.add(attention.last_stats());
    }
    mem_peak = std::max(mem_peak, gpu_memory_used_bytes());
    log_memory("after backward");
  }
  // Each column is a median over the iterations on each rank, then the largest over the ranks (the
  // slowest rank defines the step time); peak device memory is the largest over ranks.
  double summary[] = {median(fwd.wall),     median(fwd.compute), median(fwd.wait),     static_cast<double>(fwd.skipped),
                      median(bwd.wall),     median(bwd.compute), median(bwd.wait),     static_cast<double>(bwd.skipped),
                      static_cast<double>(mem_peak), median(fwd.exchange), median(bwd.exchange)};
  world.allreduce(summary, std::size(summary), ReduceType::f64, ReduceOp::max);

  // Gather results on rank 0 for --check and --dump.
  Gathered gathered;
  if (opt.check || !opt.dump.empty()) {
    gathered.o = gather_rows(world, plan, job.o->download(be), H * D);
    gathered.lse = gather_rows(world, plan, transpose(job.lse->download(be), H, n), H);
    if (rank == 0) gathered.lse = transpose(gathered.lse, opt.seq_len, H);
    if (opt.backward) {
      gathered.dq = gather_rows(world, plan, job.dq->download(be), H * D);
      gathered.dk = gather_rows(world, plan, job.dk->download(be), K * D);
      gathered.dv = gather_rows(world, plan, job.dv->download(be), K * D);
    }
  }

  const double causal_factor = opt.causal ? 0.5 : 1.0;
  const double fwd_flops = 4.0 * static_cast<double>(opt.seq_len) * static_cast<double>(opt.seq_len) * H * D * causal_factor;
  CheckOutcome check;
  if (rank == 0 && opt.check) check = check_results(opt, job.in, gathered, fwd_flops);

  if (rank == 0 && !opt.dump.empty()) {
    const std::int64_t T = opt.seq_len;
    save_npy(opt.dump + "/o.npy", gathered.o.data(), {T, H, D});
    save_npy(opt.dump + "/lse.npy", gathered.lse.data(), {H, T});
    if (opt.backward) {
      save_npy(opt.dump + "/dq.npy", gathered.dq.data(), {T, H, D});
      save_npy(opt.dump + "/dk.npy", gathered.dk.data(), {T, K, D});
      save_npy(opt.dump + "/dv.npy", gathered.dv.data(), {T, K, D});
    }
    log.info("wrote outputs to {}", opt.dump);
  }

  if (rank == 0)
    print_report(opt, nranks,
                 RunSummary{{summary[0], summary[1], summary[2], static_cast<int>(summary[3]), summary[9]},
                            {summary[4], summary[5], summary[6], static_cast<int>(summary[7]), summary[10]},
                            summary[8],
                            {attention.strategy(), ulysses, ring_size}},
                 fwd_flops, be.name(), check);
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
