// The `automatic` strategy choice: the nodes from the topology (checked on every rank), the machine
// from the built-in model of the device, the startup link probe and the machine file, then the
// cost model's ranking of every Ulysses degree for the problem's shape. Rank 0 decides and
// broadcasts, so every rank runs the same strategy even where their clocks or files differ.
#include "runtime/strategy_choice.hpp"

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/config.hpp"
#include "longattn/device_ops.hpp"
#include "longattn/log.hpp"
#include "partition/cost_model.hpp"
#include "partition/machine_file.hpp"
#include "runtime/link_probe.hpp"

#ifdef LONGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace longattn::runtime {

namespace {

// The nodes as the cost model needs them: consecutive blocks of ranks, all of one size. Anything
// else (a hostfile that interleaves hosts, nodes of unequal size) cannot be priced by tier, so the
// choice falls back to the ring; `problem` says why.
struct Nodes {
  int ranks_per_node = 1;
  int count = 1;
  std::string problem;
};

Nodes check_nodes(Communicator& comm) {
  const Topology mine = comm.topology();
  const int ranks = comm.size();
  std::vector<std::int32_t> all(static_cast<std::size_t>(4 * ranks));
  const std::int32_t own[4] = {mine.node, mine.nodes, mine.local_rank, mine.local_size};
  comm.allgather(own, all.data(), sizeof own);
  Nodes nodes;
  nodes.ranks_per_node = all[3];
  nodes.count = all[1];
  for (int r = 0; r < ranks && nodes.problem.empty(); ++r) {
    const std::int32_t* t = &all[static_cast<std::size_t>(4 * r)];
    if (t[3] != nodes.ranks_per_node || t[1] != nodes.count)
      nodes.problem = fmt::format("the nodes differ in size (rank 0: {} of {} ranks, rank {}: {} of {})", nodes.count,
                                  nodes.ranks_per_node, r, t[1], t[3]);
    else if (t[0] != r / nodes.ranks_per_node || t[2] != r % nodes.ranks_per_node)
      nodes.problem = fmt::format("rank {} is rank {} of node {}, not of node {}: launch ranks node by node "
                                  "(mpirun --map-by node fills nodes round robin; use --map-by slot)",
                                  r, t[2], t[0], r / nodes.ranks_per_node);
  }
  if (nodes.problem.empty() && nodes.count * nodes.ranks_per_node != ranks)
    nodes.problem = fmt::format("{} nodes of {} ranks do not make the job's {} ranks", nodes.count, nodes.ranks_per_node, ranks);
  return nodes;
}

// The built-in machine closest to this device; `note` says when it is only a stand-in.
std::string builtin_machine_name(DeviceKind device, std::string& note) {
  if (device == DeviceKind::cpu) return "cpu";
  std::string gpu = "unknown";
#ifdef LONGATTN_HAVE_CUDA
  int index = 0;
  cudaDeviceProp properties{};
  if (cudaGetDevice(&index) == cudaSuccess && cudaGetDeviceProperties(&properties, index) == cudaSuccess) gpu = properties.name;
#endif
  if (gpu.find("H200") != std::string::npos) return "h200";
  if (gpu.find("H100") != std::string::npos) return "h100";
  note = fmt::format("no built-in model of GPU `{}`: h100's kernel rates stand in; give a machine file with its own", gpu);
  return "h100";
}

// Runs `decide` on rank 0 only and shares its outcome: a failure there (an unreadable machine
// file, say) becomes the same Error on every rank instead of a hang in the next collective.
void on_rank0_for_all(Communicator& comm, const std::function<void()>& decide) {
  std::int32_t code = -1;
  std::string message;
  if (comm.rank() == 0) {
    try {
      decide();
    } catch (const Error& e) {
      code = static_cast<std::int32_t>(e.code());
      message = e.what();
    } catch (const std::exception& e) {
      code = static_cast<std::int32_t>(ErrorCode::internal);
      message = e.what();
    }
  }
  comm.broadcast(&code, sizeof code, 0);
  if (code < 0) return;
  std::uint64_t length = message.size();
  comm.broadcast(&length, sizeof length, 0);
  message.resize(length);
  comm.broadcast(message.data(), length, 0);
  throw Error(static_cast<ErrorCode>(code), message);
}

void broadcast_string(Communicator& comm, std::string& text) {
  std::uint64_t length = text.size();
  comm.broadcast(&length, sizeof length, 0);
  text.resize(length);
  if (length > 0) comm.broadcast(text.data(), length, 0);
}

// The built-in cpu machine is one thread's; a rank runs its kernels and its GEMMs on `threads`.
partition::MachineModel with_threads(partition::MachineModel machine, int threads) {
  partition::KernelRateTable rates;
  for (const auto& curve : machine.rates.curves())
    for (const auto& p : curve.points)
      rates.add(curve.causal, curve.head_dim, {p.length, p.forward_tflops * threads, p.backward_tflops * threads});
  machine.rates = std::move(rates);
  machine.linear_seconds_per_token /= threads;
  machine.name = fmt::format("{} ({} thread{} a rank)", machine.name, threads, threads == 1 ? "" : "s");
  return machine;
}

Strategy strategy_of(int ulysses, int ranks) {
  if (ulysses == 1) return Strategy::ring;
  return ulysses == ranks ? Strategy::ulysses : Strategy::hybrid;
}

partition::AttentionShape shape_of(const AttentionProblem& problem, const RingOptions& ring) {
  partition::AttentionShape shape;
  shape.seq_len = problem.cu_seqlens.empty() ? 0 : problem.cu_seqlens.back();
  shape.query_heads = problem.q_heads;
  shape.kv_heads = problem.kv_heads;
  shape.head_dim = problem.head_dim;
  shape.causal = problem.causal;
  shape.element_bytes = static_cast<int>(dtype_size(problem.dtype));
  shape.gradient_bytes = static_cast<int>(dtype_size(ring.gradient_transport));
  return shape;
}

std::string describe_link(const partition::Link& link) {
  return fmt::format("{:.3g} GB/s, {:.3g} us", link.bytes_per_second / 1e9, link.latency_seconds * 1e6);
}

// Where the machine's figures came from, in words, for the reason's first line.
struct MachineSources {
  std::string rates = "built in", intra = "built in", inter = "built in";
};

std::string describe_choice(const partition::MachineModel& machine, const MachineSources& sources, const Nodes& nodes,
                            const AttentionProblem& problem, const std::vector<partition::StrategyEstimate>& candidates,
                            const std::string& note) {
  const auto& best = candidates.front();
  const int ranks = best.ulysses * best.ring;
  std::string text = fmt::format(
      "automatic: {} (U = {} ranks per Ulysses group, a ring of R = {} groups) for {} ranks in {} node{} of {}, {} tokens, "
      "{} / {} heads, dim {}{}; machine {} (kernel rates {}; intra-node link {}: {}; inter-node link {}: {})",
      best.name(), best.ulysses, best.ring, ranks, nodes.count, nodes.count == 1 ? "" : "s", nodes.ranks_per_node,
      problem.cu_seqlens.back(), problem.q_heads, problem.kv_heads, problem.head_dim, problem.causal ? ", causal" : "",
      machine.name, sources.rates, sources.intra, describe_link(machine.intra_node), sources.inter,
      describe_link(machine.inter_node));
  if (!note.empty()) text += "; " + note;
  if (problem.cu_seqlens.size() > 2) text += "; the batch priced as one sequence of its total length";
  for (const auto& c : candidates)
    text += fmt::format("\n  {} {:<16} modelled fwd {:.3f} ms, bwd {:.3f} ms (of which linear layers {:.3f} ms, alike for all)",
                        &c == &best ? "*" : " ", c.name(), c.forward_seconds * 1e3, c.backward_seconds * 1e3,
                        c.linear_seconds * 1e3);
  return text;
}

void log_reason(Communicator& comm, const std::string& reason) {
  if (comm.rank() != 0) return;
  const auto& log = logger(Subsystem::ring);
  std::size_t start = 0;
  while (start <= reason.size()) {
    const auto end = reason.find('\n', start);
    log.info("{}", reason.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
}

}  // namespace

StrategyChoice choose_strategy(Communicator& comm, const AttentionProblem& problem, const ParallelOptions& options,
                               DeviceKind device) {
  const int ranks = comm.size();
  StrategyChoice choice;
  const Nodes nodes = check_nodes(comm);
  if (!nodes.problem.empty()) {
    choice.reason = fmt::format("automatic: ring, because the cost model cannot price this layout: {}", nodes.problem);
    log_reason(comm, choice.reason);
    return choice;
  }
  if (problem.cu_seqlens.empty() || problem.cu_seqlens.back() <= 0) {
    choice.reason = "automatic: ring, because the batch holds no token (nothing to price)";
    log_reason(comm, choice.reason);
    return choice;
  }

  // The machine file is read on rank 0 alone (it need not exist on the other hosts); whether links
  // are probed is rank 0's call too, so that an environment that differs between hosts cannot
  // send some ranks into the probe and others past it.
  std::optional<partition::MachineFile> file;
  std::int32_t probe = 0;
  on_rank0_for_all(comm, [&] {
    if (!options.machine_file.empty()) file = partition::load_machine_file(options.machine_file);
    // Read even where nothing would be probed, so that a bad value is refused on any job size.
    const bool probe_enabled = env_int("LONGATTN_LINK_PROBE") != 0;
    probe = ranks > 1 && probe_enabled && !(file && file->gives_links());
  });
  comm.broadcast(&probe, sizeof probe, 0);
  std::optional<LinkProbeResult> probed;
  if (probe) probed = probe_links(comm, device_ops_for(device), nodes.ranks_per_node);

  std::int32_t ulysses = 1;
  on_rank0_for_all(comm, [&] {
    std::string note;
    MachineSources sources;
    partition::MachineModel machine = partition::default_machine(builtin_machine_name(device, note));
    if (device == DeviceKind::cpu) machine = with_threads(std::move(machine), cpu_threads_per_process(nodes.ranks_per_node));
    if (probed && probed->intra_measured) {
      machine.intra_node = probed->intra_node;
      sources.intra = "probed";
    }
    if (probed && probed->inter_measured) {
      machine.inter_node = probed->inter_node;
      sources.inter = "probed";
    }
    if (file) {
      machine = partition::apply_machine_file(machine, *file);
      if (!file->rates.empty()) sources.rates = "from " + file->source;
      if (file->intra_node) sources.intra = "from " + file->source;
      if (file->inter_node) sources.inter = "from " + file->source;
    }
    const partition::NodeLayout layout{ranks, nodes.ranks_per_node};
    const auto candidates = partition::rank_strategies(machine, shape_of(problem, options.ring), layout);
    ulysses = candidates.front().ulysses;
    choice.reason = describe_choice(machine, sources, nodes, problem, candidates, note);
  });
  comm.broadcast(&ulysses, sizeof ulysses, 0);
  broadcast_string(comm, choice.reason);
  choice.ulysses_size = ulysses;
  choice.strategy = strategy_of(ulysses, ranks);
  log_reason(comm, choice.reason);
  return choice;
}

}  // namespace longattn::runtime
