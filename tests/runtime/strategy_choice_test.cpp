// The `auto` strategy choice under mpirun -np 1..4 on CPU ranks: with a machine file whose network
// is slow it picks the hybrid with one Ulysses group per (simulated) node; with fast links it picks
// what the cost model ranks first; a malformed machine file is one error naming file:line on every
// rank; nodes the model cannot price fall back to the ring with the reason; the link probe gives
// positive, finite figures, the same on every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>

#include <fmt/format.h>

#include "longattn/communicator.hpp"
#include "longattn/device_ops.hpp"
#include "longattn/error.hpp"
#include "partition/machine_file.hpp"
#include "runtime/link_probe.hpp"
#include "runtime/strategy_choice.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

// Sets an environment variable for one scope and puts the old value back.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_, old_->c_str(), 1);
    else unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// A world communicator whose topology groups every `node_size` consecutive ranks into a node
// (the topology is read when the communicator is made).
std::unique_ptr<Communicator> world_with_nodes_of(int node_size) {
  ScopedEnv nodes("LONGATTN_NODE_SIZE", std::to_string(node_size));
  return make_mpi_world_communicator();
}

// The same fresh seed on every rank.
std::uint64_t shared_seed(Communicator& comm) {
  std::uint64_t seed = test::fresh_seed();
  comm.broadcast(&seed, sizeof seed, 0);
  return seed;
}

double uniform(std::mt19937_64& rng, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
int uniform_int(std::mt19937_64& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// A machine file on rank 0 (the only rank that reads it), removed with the object.
class MachineFileOnRank0 {
 public:
  MachineFileOnRank0(Communicator& comm, std::uint64_t seed, const std::string& text)
      : path_(std::filesystem::temp_directory_path() / fmt::format("longattn_choice_{}_{}.machine", seed, text.size())),
        owner_(comm.rank() == 0) {
    if (owner_) std::ofstream(path_) << text;
  }
  ~MachineFileOnRank0() {
    if (owner_) std::filesystem::remove(path_);
  }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
  bool owner_;
};

// Kernel rates that rise with the block length, as measured ones do, for both masks.
std::string random_rates(std::mt19937_64& rng, int head_dim) {
  std::string text;
  for (const char* mask : {"causal", "full"}) {
    double fwd = uniform(rng, 20, 60), bwd = uniform(rng, 10, 40);
    for (int length = 128; length <= 65536; length *= 8) {
      text += fmt::format("{} {} {} {} {}\n", mask, head_dim, length, fwd, bwd);
      fwd *= uniform(rng, 1.2, 1.8);
      bwd *= uniform(rng, 1.2, 1.8);
    }
  }
  return text;
}

AttentionProblem random_problem(std::mt19937_64& rng, int q_heads, int kv_heads, int max_tokens = 65536) {
  AttentionProblem problem;
  problem.cu_seqlens = {0, uniform_int(rng, 8192, max_tokens)};
  problem.q_heads = q_heads;
  problem.kv_heads = kv_heads;
  problem.head_dim = 64;
  problem.dtype = DType::bf16;
  problem.causal = uniform_int(rng, 0, 1) == 1;
  return problem;
}

partition::AttentionShape shape_of(const AttentionProblem& p) {
  partition::AttentionShape shape;
  shape.seq_len = p.cu_seqlens.back();
  shape.query_heads = p.q_heads;
  shape.kv_heads = p.kv_heads;
  shape.head_dim = p.head_dim;
  shape.causal = p.causal;
  shape.element_bytes = 2;
  return shape;
}

// Every rank got the same strategy, degree and reason.
void expect_same_everywhere(Communicator& comm, const runtime::StrategyChoice& choice) {
  const std::string mine = fmt::format("{} {} {}", to_string(choice.strategy), choice.ulysses_size, choice.reason);
  EXPECT_NO_THROW(require_same_on_all_ranks(comm, "the strategy choice", mine));
}

TEST(StrategyChoice, SlowNetworkPicksHybridWithOneGroupPerNode) {
  const int ranks = make_mpi_world_communicator()->size();
  if (ranks % 2 != 0 || ranks < 4) GTEST_SKIP() << "two simulated nodes of two ranks or more need an even number of ranks >= 4";
  const int node_size = ranks / 2;
  auto comm = world_with_nodes_of(node_size);
  const auto seed = shared_seed(*comm);
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  // A fast node and a network ten thousand times slower: the ring should cross it as rarely as it
  // can. The claim is the model's, not a law: with a network only a thousand times slower (0.05 to
  // 0.3 GB/s) and up to 64k tokens, pure Ulysses or the flat ring came first for 1.6% of the draws
  // (their transfers hide behind the longer compute), which made this test fail now and then. In
  // the ranges below the node-sized hybrid led in every one of 200,000 draws at 4, 6 and 8 ranks.
  const std::string text = random_rates(rng, 64) +
                           fmt::format("link intra_node {} {}\nlink inter_node {} {}\nlinear_seconds_per_token 0\n",
                                       uniform(rng, 300, 900), uniform(rng, 1, 5), uniform(rng, 0.005, 0.02), uniform(rng, 50, 200));
  MachineFileOnRank0 file(*comm, seed, text);
  const int q_heads = 2 * node_size * uniform_int(rng, 1, 4);
  // kv heads the node-sized group can split or replicate (1, or as many as the group): with 2 kv
  // heads and nodes of 3, no Ulysses group fits a node and the claim below does not hold.
  const AttentionProblem problem = random_problem(rng, q_heads, uniform_int(rng, 0, 1) ? 1 : node_size, 16384);
  ParallelOptions options;
  options.strategy = Strategy::automatic;
  options.machine_file = file.path();
  const auto choice = runtime::choose_strategy(*comm, problem, options, DeviceKind::cpu);
  SCOPED_TRACE(choice.reason);
  EXPECT_EQ(choice.ulysses_size, node_size);
  EXPECT_EQ(choice.strategy, Strategy::hybrid);
  // The model's own ranking agrees, and the reason lists every candidate it priced.
  std::istringstream in(text);
  const auto machine = partition::apply_machine_file(partition::default_machine("cpu"), partition::parse_machine_file(in, "x"));
  const auto ranked = partition::rank_strategies(machine, shape_of(problem), {ranks, node_size});
  EXPECT_EQ(ranked.front().ulysses, node_size);
  for (const auto& c : ranked)
    EXPECT_NE(choice.reason.find(fmt::format("{:<16} modelled fwd {:.3f} ms, bwd {:.3f} ms", c.name(), c.forward_seconds * 1e3,
                                             c.backward_seconds * 1e3)),
              std::string::npos)
        << c.name();
  EXPECT_NE(choice.reason.find("inter-node link from " + file.path()), std::string::npos);
  // Links given: nothing probed.
  EXPECT_EQ(choice.reason.find("probed"), std::string::npos);
  expect_same_everywhere(*comm, choice);
}

TEST(StrategyChoice, FastLinksPickWhatTheModelRanksFirst) {
  const int ranks = make_mpi_world_communicator()->size();
  const int node_size = ranks % 2 == 0 ? ranks / 2 : ranks;
  auto comm = world_with_nodes_of(node_size);
  const auto seed = shared_seed(*comm);
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const std::string text = random_rates(rng, 64) +
                           fmt::format("link intra_node {} {}\nlink inter_node {} {}\nlinear_seconds_per_token {}\n",
                                       uniform(rng, 300, 900), uniform(rng, 1, 5), uniform(rng, 300, 900), uniform(rng, 1, 5),
                                       uniform(rng, 1e-9, 1e-7));
  MachineFileOnRank0 file(*comm, seed, text);
  // Heads every degree divides, so every degree is a candidate.
  const int q_heads = 2 * ranks * uniform_int(rng, 1, 2);
  const AttentionProblem problem = random_problem(rng, q_heads, uniform_int(rng, 0, 1) ? q_heads : q_heads / 2);
  ParallelOptions options;
  options.strategy = Strategy::automatic;
  options.machine_file = file.path();
  const auto choice = runtime::choose_strategy(*comm, problem, options, DeviceKind::cpu);
  SCOPED_TRACE(choice.reason);
  std::istringstream in(text);
  const auto machine = partition::apply_machine_file(partition::default_machine("cpu"), partition::parse_machine_file(in, "x"));
  const auto ranked = partition::rank_strategies(machine, shape_of(problem), {ranks, node_size});
  int degrees = 0;
  for (int u = 1; u <= ranks; ++u) degrees += ranks % u == 0;
  EXPECT_EQ(static_cast<int>(ranked.size()), degrees);
  EXPECT_EQ(choice.ulysses_size, ranked.front().ulysses);
  const Strategy expected = ranked.front().ulysses == 1 ? Strategy::ring
                            : ranked.front().ulysses == ranks ? Strategy::ulysses
                                                              : Strategy::hybrid;
  EXPECT_EQ(choice.strategy, expected);
  EXPECT_NE(choice.reason.find("* " + ranked.front().name()), std::string::npos);
  expect_same_everywhere(*comm, choice);
}

TEST(StrategyChoice, Bf16GradientTransportIsWhatGetsPriced) {
  auto comm = make_mpi_world_communicator();
  if (comm->size() == 1) GTEST_SKIP() << "one rank moves no gradients";
  const auto seed = shared_seed(*comm);
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  // Slow links, so that the travelling dK/dV show in the backward's time.
  const std::string text = random_rates(rng, 64) + fmt::format("link intra_node {} 5\nlink inter_node {} 5\n",
                                                               uniform(rng, 0.5, 2), uniform(rng, 0.5, 2));
  MachineFileOnRank0 file(*comm, seed, text);
  const AttentionProblem problem = random_problem(rng, 2 * comm->size(), 2);
  ParallelOptions options;
  options.strategy = Strategy::automatic;
  options.machine_file = file.path();
  options.ring.gradient_transport = DType::bf16;
  const auto choice = runtime::choose_strategy(*comm, problem, options, DeviceKind::cpu);
  std::istringstream in(text);
  const auto machine = partition::apply_machine_file(partition::default_machine("cpu"), partition::parse_machine_file(in, "x"));
  auto shape = shape_of(problem);
  auto line_of = [](const partition::StrategyEstimate& c) {
    return fmt::format("{:<16} modelled fwd {:.3f} ms, bwd {:.3f} ms", c.name(), c.forward_seconds * 1e3, c.backward_seconds * 1e3);
  };
  shape.gradient_bytes = 4;
  const auto f32 = partition::rank_strategies(machine, shape, {comm->size(), comm->size()});
  shape.gradient_bytes = 2;
  const auto bf16 = partition::rank_strategies(machine, shape, {comm->size(), comm->size()});
  EXPECT_EQ(choice.ulysses_size, bf16.front().ulysses);
  for (const auto& c : bf16) EXPECT_NE(choice.reason.find(line_of(c)), std::string::npos) << line_of(c) << "\n" << choice.reason;
  // The ring's backward carries dK/dV: priced at 4 bytes it reads differently.
  const auto ring_f32 = std::find_if(f32.begin(), f32.end(), [](const auto& c) { return c.ulysses == 1; });
  ASSERT_NE(ring_f32, f32.end());
  EXPECT_EQ(choice.reason.find(line_of(*ring_f32)), std::string::npos) << choice.reason;
}

TEST(StrategyChoice, MalformedMachineFileIsOneErrorWithFileAndLineOnEveryRank) {
  auto comm = make_mpi_world_communicator();
  const auto seed = shared_seed(*comm);
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const std::string rates = random_rates(rng, 64);
  MachineFileOnRank0 file(*comm, seed, rates + "link intra_node 300 5\nlink inter_node fifty 10\n");
  const auto bad_line = std::count(rates.begin(), rates.end(), '\n') + 2;
  std::mt19937_64 shapes(seed + 1);
  ParallelOptions options;
  options.strategy = Strategy::automatic;
  options.machine_file = file.path();
  try {
    runtime::choose_strategy(*comm, random_problem(shapes, 2 * comm->size(), 2), options, DeviceKind::cpu);
    ADD_FAILURE() << "a malformed machine file was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io);
    EXPECT_NE(std::string(e.what()).find(fmt::format("{}:{}:", file.path(), bad_line)), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bandwidth"), std::string::npos) << e.what();
  }
  // Nobody is left inside a collective: the communicator still works for everyone.
  std::int64_t alive = 1;
  comm->allreduce(&alive, 1, ReduceType::i64, ReduceOp::sum);
  EXPECT_EQ(alive, comm->size());
}

TEST(StrategyChoice, NodesOfUnequalSizeFallBackToTheRingWithTheReason) {
  const int ranks = make_mpi_world_communicator()->size();
  if (ranks < 3) GTEST_SKIP() << "unequal nodes need three ranks";
  auto comm = world_with_nodes_of(ranks - 1);
  const auto seed = shared_seed(*comm);
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  ParallelOptions options;
  options.strategy = Strategy::automatic;
  const auto choice = runtime::choose_strategy(*comm, random_problem(rng, 2 * ranks, 2), options, DeviceKind::cpu);
  EXPECT_EQ(choice.strategy, Strategy::ring);
  EXPECT_EQ(choice.ulysses_size, 1);
  EXPECT_NE(choice.reason.find("nodes differ in size"), std::string::npos) << choice.reason;
  expect_same_everywhere(*comm, choice);
}

TEST(StrategyChoice, AnEmptyBatchRunsTheRing) {
  auto comm = make_mpi_world_communicator();
  const auto seed = shared_seed(*comm);
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  AttentionProblem problem = random_problem(rng, 2 * comm->size(), 2);
  problem.cu_seqlens = {0, 0, 0};
  ParallelOptions options;
  options.strategy = Strategy::automatic;
  const auto choice = runtime::choose_strategy(*comm, problem, options, DeviceKind::cpu);
  EXPECT_EQ(choice.strategy, Strategy::ring);
  EXPECT_EQ(choice.ulysses_size, 1);
  EXPECT_NE(choice.reason.find("no token"), std::string::npos) << choice.reason;
}

TEST(StrategyChoice, ProbedLinksOrBuiltInOnesAsTheEnvironmentSays) {
  auto comm = make_mpi_world_communicator();
  const auto seed = shared_seed(*comm);
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const auto problem = random_problem(rng, 2 * comm->size(), 2);
  ParallelOptions options;
  options.strategy = Strategy::automatic;
  {
    ScopedEnv probe("LONGATTN_LINK_PROBE", "1");
    const auto choice = runtime::choose_strategy(*comm, problem, options, DeviceKind::cpu);
    const bool expect_probe = comm->size() > 1;
    EXPECT_EQ(choice.reason.find("intra-node link probed") != std::string::npos, expect_probe) << choice.reason;
    expect_same_everywhere(*comm, choice);
  }
  {
    // A value outside 0/1 is refused on every rank, naming the variable, not read as either.
    ScopedEnv probe("LONGATTN_LINK_PROBE", "2");
    try {
      runtime::choose_strategy(*comm, problem, options, DeviceKind::cpu);
      ADD_FAILURE() << "LONGATTN_LINK_PROBE=2 was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("LONGATTN_LINK_PROBE"), std::string::npos) << e.what();
    }
  }
  {
    ScopedEnv probe("LONGATTN_LINK_PROBE", "0");
    const auto choice = runtime::choose_strategy(*comm, problem, options, DeviceKind::cpu);
    EXPECT_NE(choice.reason.find("intra-node link built in"), std::string::npos) << choice.reason;
    EXPECT_NE(choice.reason.find("machine cpu"), std::string::npos) << choice.reason;
  }
}

void expect_measured_link(const partition::Link& link, const char* tier) {
  EXPECT_TRUE(std::isfinite(link.bytes_per_second) && link.bytes_per_second > 0) << tier << ": " << link.bytes_per_second;
  EXPECT_TRUE(std::isfinite(link.latency_seconds) && link.latency_seconds > 0) << tier << ": " << link.latency_seconds;
  // A ping-pong of a few bytes on one machine: far below a second, and above a nanosecond.
  EXPECT_LT(link.latency_seconds, 1.0) << tier;
  EXPECT_GT(link.latency_seconds, 1e-9) << tier;
}

TEST(LinkProbe, PositiveFiniteFiguresForEveryTierItCanReach) {
  const int ranks = make_mpi_world_communicator()->size();
  // Every rank a node of its own (across nodes), then all ranks one node (inside a node).
  for (const int node_size : {1, ranks}) {
    auto comm = world_with_nodes_of(node_size);
    const auto start = std::chrono::steady_clock::now();
    const auto result = runtime::probe_links(*comm, device_ops_for(DeviceKind::cpu), node_size);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(result.intra_measured, node_size >= 2);
    EXPECT_EQ(result.inter_measured, ranks > node_size);
    if (result.intra_measured) expect_measured_link(result.intra_node, "intra-node");
    if (result.inter_measured) expect_measured_link(result.inter_node, "inter-node");
    // Short enough to run at every construction (a loaded test machine gets a wide margin).
    EXPECT_LT(seconds, 5.0);
    const std::string mine = fmt::format("{} {} {} {} {} {}", result.intra_measured, result.intra_node.bytes_per_second,
                                         result.intra_node.latency_seconds, result.inter_measured,
                                         result.inter_node.bytes_per_second, result.inter_node.latency_seconds);
    EXPECT_NO_THROW(require_same_on_all_ranks(*comm, "the probed links", mine));
  }
}

TEST(LinkProbe, RefusesNodesThatDoNotDivideTheRanks) {
  auto comm = make_mpi_world_communicator();
  if (comm->size() == 1) GTEST_SKIP() << "one rank divides into any node size";
  EXPECT_THROW(runtime::probe_links(*comm, device_ops_for(DeviceKind::cpu), comm->size() + 1), Error);
}

}  // namespace
}  // namespace longattn
