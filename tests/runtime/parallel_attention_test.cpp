// ParallelAttention under mpirun against the single-process double-precision reference: ring,
// Ulysses, every valid hybrid U x R and auto; every layout, causal and not, MHA/GQA/MQA, forward
// and backward, odd lengths and packed batches with an empty and a one-token sequence; nodes
// simulated with LONGATTN_NODE_SIZE; and bad input refused with one clear error on every rank.
#include <gtest/gtest.h>

#include <cstdlib>
#include <thread>

#include <fmt/format.h>

#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "longattn/parallel_attention.hpp"
#include "support/ring_check.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;
using test::ParallelCase;
using test::RingCase;

std::uint64_t shared_seed(Communicator& comm) {
  std::uint64_t seed = test::fresh_seed();
  comm.broadcast(&seed, sizeof seed, 0);
  return seed;
}

// Query heads that every Ulysses size dividing the ranks divides (and at least four).
int query_heads_for(int ranks) { return std::max(4, 2 * ranks); }

// What the strategy supports, by the rule the constructor applies.
bool can_run(int ulysses, int ranks, int hq, int hkv) {
  return ranks % ulysses == 0 && hq % ulysses == 0 && (hkv % ulysses == 0 || ulysses % hkv == 0);
}

// Every strategy on this many ranks: ring, Ulysses, hybrid with each Ulysses size strictly between
// (1 and all ranks are the other two), and auto.
std::vector<ParallelCase> strategies(int ranks, const RingCase& shape) {
  std::vector<ParallelCase> cases{{shape, Strategy::ring, 0}};
  if (can_run(ranks, ranks, shape.hq, shape.hkv)) cases.push_back({shape, Strategy::ulysses, 0});
  for (int u = 2; u < ranks; ++u)
    if (can_run(u, ranks, shape.hq, shape.hkv)) cases.push_back({shape, Strategy::hybrid, u});
  cases.push_back({shape, Strategy::automatic, 0});
  return cases;
}

int expected_ulysses(const ParallelCase& c, int ranks) {
  switch (c.strategy) {
    case Strategy::ring: return 1;
    case Strategy::ulysses: return ranks;
    default: return c.ulysses_size;
  }
}

// Runs every strategy on the shape, for each kv head count the shape's query heads allow.
void run_all_strategies(RingCase shape, std::initializer_list<int> kv_heads) {
  auto comm = make_mpi_world_communicator();
  const int P = comm->size();
  for (int hkv : kv_heads) {
    shape.hkv = hkv;
    for (const auto& c : strategies(P, shape)) {
      const int ran = test::check_parallel_against_reference(*comm, c, shared_seed(*comm));
      if (c.strategy != Strategy::automatic) {
        EXPECT_EQ(ran, expected_ulysses(c, P)) << test::describe(c);
      }
    }
  }
}

class ParallelVsReference : public ::testing::TestWithParam<std::tuple<Layout, bool>> {};

TEST_P(ParallelVsReference, OddLengthMhaGqaMqa) {
  const auto [layout, causal] = GetParam();
  const int hq = query_heads_for(make_mpi_world_communicator()->size());
  run_all_strategies({layout, causal, {0, 77}, hq, hq, 16, DType::f32}, {hq, 2, 1});
}

TEST_P(ParallelVsReference, VarlenBatchWithEmptyAndTinySequences) {
  const auto [layout, causal] = GetParam();
  const int hq = query_heads_for(make_mpi_world_communicator()->size());
  run_all_strategies({layout, causal, {0, 0, 1, 38, 91, 96}, hq, hq, 16, DType::f32}, {hq, 1});
}

INSTANTIATE_TEST_SUITE_P(All, ParallelVsReference,
                         ::testing::Combine(::testing::Values(Layout::contiguous, Layout::zigzag, Layout::striped),
                                            ::testing::Bool()),
                         [](const auto& param_info) {
                           return std::string(to_string(std::get<0>(param_info.param))) + (std::get<1>(param_info.param) ? "_causal" : "_full");
                         });

TEST(ParallelAttention, Bf16InputsAndGradients) {
  const int hq = query_heads_for(make_mpi_world_communicator()->size());
  run_all_strategies({Layout::zigzag, true, {0, 97}, hq, hq, 32, DType::bf16, DType::bf16}, {2, 1});
}

TEST(ParallelAttention, TokensFewerThanRanks) {
  // Some ranks (and, with several groups, whole groups) hold no token at all.
  const int hq = query_heads_for(make_mpi_world_communicator()->size());
  run_all_strategies({Layout::zigzag, true, {0, 2, 3}, hq, hq, 16, DType::f32}, {1});
}

TEST(ParallelAttention, ShardsFollowTheStrategy) {
  auto comm = make_mpi_world_communicator();
  const int P = comm->size();
  const std::vector<std::int32_t> cu{0, 50, 131};
  const AttentionProblem problem{cu, query_heads_for(P), 1, 16, DType::f32, true, Layout::zigzag};
  for (int u = 1; u <= P; ++u) {
    if (P % u) continue;
    ParallelOptions options;
    options.strategy = Strategy::hybrid;
    options.ulysses_size = u;
    ParallelAttention attention(*comm, problem, options, make_backend("cpu"));
    EXPECT_EQ(attention.ulysses_size(), u);
    EXPECT_EQ(attention.strategy(), Strategy::hybrid);
    EXPECT_EQ(attention.shards().group_size(), u);
    const ShardPlan want(cu, Layout::zigzag, P, u);
    for (int r = 0; r < P; ++r) EXPECT_EQ(attention.shards().runs(r), want.runs(r)) << "U=" << u << " rank " << r;
  }
  ParallelOptions ring;
  ParallelAttention flat(*comm, problem, ring, make_backend("cpu"));
  EXPECT_EQ(flat.ulysses_size(), 1);
  const ShardPlan want(cu, Layout::zigzag, P);
  for (int r = 0; r < P; ++r) EXPECT_EQ(flat.shards().runs(r), want.runs(r));
  EXPECT_NE(flat.choice_reason().find("ring"), std::string::npos) << flat.choice_reason();
}

TEST(ParallelAttention, StatsCountTheExchanges) {
  auto comm = make_mpi_world_communicator();
  const int P = comm->size();
  const int hq = query_heads_for(P), d = 16;
  const std::vector<std::int32_t> cu{0, 64};
  std::mt19937_64 rng(test::fresh_seed());
  for (Strategy s : {Strategy::ring, Strategy::ulysses}) {
    ParallelOptions options;
    options.strategy = s;
    ParallelAttention attention(*comm, {cu, hq, hq, d, DType::f32, true, Layout::zigzag}, options, make_backend("cpu"));
    const auto n = attention.shards().local_tokens(comm->rank());
    auto q = test::random_tensor(rng, DType::f32, {n, hq, d});
    HostTensor o(DType::f32, {n, hq, d}), lse(DType::f32, {hq, n});
    lse.view = TensorView(lse.view.data, DType::f32, {hq, n});
    attention.forward(q.view, q.view, q.view, o.view, lse.view);
    const auto& st = attention.last_stats();
    if (s == Strategy::ring || P == 1) {
      EXPECT_EQ(st.exchange_bytes_sent, 0u);
      EXPECT_EQ(st.ring.steps, P);
    } else {
      // q, k, v out: the rank's tokens for the other members' heads; o and lse back: the other
      // members' tokens for this rank's heads.
      const auto mine = static_cast<std::size_t>(n), all = static_cast<std::size_t>(cu.back());
      const auto heads = static_cast<std::size_t>(hq), share = heads / static_cast<std::size_t>(P), dim = static_cast<std::size_t>(d);
      const auto out = 3 * mine * (heads - share) * dim * 4;
      const auto back = (all - mine) * share * (dim + 1) * 4;
      EXPECT_EQ(st.exchange_bytes_sent, out + back);
      EXPECT_EQ(st.ring.steps, 1);  // Ulysses: one group, local attention
    }
    EXPECT_GT(st.wall_ms, 0.0);
  }
}

// Sets an environment variable for one scope (every rank sets the same).
struct ScopedEnv {
  std::string name;
  ScopedEnv(std::string n, const char* value) : name(std::move(n)) { setenv(name.c_str(), value, 1); }
  ~ScopedEnv() { unsetenv(name.c_str()); }
};

TEST(ParallelAttention, HybridOnSimulatedNodesTakesTheNodeSize) {
  ScopedEnv nodes("LONGATTN_NODE_SIZE", "2");
  auto comm = make_mpi_world_communicator();  // reads the topology now
  const int P = comm->size();
  const int hq = query_heads_for(P);
  const ParallelCase c{{Layout::zigzag, true, {0, 5, 88}, hq, 2, 16, DType::f32}, Strategy::hybrid, 0};
  if (P % 2 != 0 && P > 1) {
    // The last node holds one rank: no single node size to take.
    try {
      test::check_parallel_against_reference(*comm, c, shared_seed(*comm));
      FAIL() << "unequal nodes accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("give the Ulysses size explicitly"), std::string::npos) << e.what();
    }
    return;
  }
  EXPECT_EQ(test::check_parallel_against_reference(*comm, c, shared_seed(*comm)), std::min(P, 2));
}

// Constructs with these settings and expects one Error on this rank (every rank runs it).
void expect_refused(const AttentionProblem& problem, const ParallelOptions& options, const std::string& needle) {
  auto comm = make_mpi_world_communicator();
  try {
    ParallelAttention attention(*comm, problem, options, make_backend("cpu"));
    FAIL() << "accepted: " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  comm->barrier();  // every rank got here: nobody hangs in a collective of the constructor
}

TEST(ParallelAttention, UlyssesSizeNotDividingTheRanksIsRefused) {
  const int P = make_mpi_world_communicator()->size();
  ParallelOptions options;
  options.strategy = Strategy::hybrid;
  options.ulysses_size = P + 1;
  const int hq = (P + 1) * 2;
  expect_refused({{0, 40}, hq, hq, 16, DType::f32, true, Layout::zigzag}, options,
                 fmt::format("Ulysses size {} does not divide the {} ranks", P + 1, P));
  expect_refused({{0, 40}, hq, hq, 16, DType::f32, true, Layout::zigzag}, options, "Ulysses sizes that can: 1");
}

TEST(ParallelAttention, HeadsNotDivisibleByTheUlyssesSizeAreRefused) {
  const int P = make_mpi_world_communicator()->size();
  if (P == 1) GTEST_SKIP() << "every head count divides over one rank";
  ParallelOptions options;
  options.strategy = Strategy::ulysses;
  const int hq = P + 1;  // P and P + 1 share no divisor but 1
  expect_refused({{0, 40}, hq, 1, 16, DType::f32, false, Layout::zigzag}, options,
                 fmt::format("does not divide the {} query heads", hq));
  expect_refused({{0, 40}, hq, 1, 16, DType::f32, false, Layout::zigzag}, options, "Ulysses sizes that can: 1");
}

TEST(ParallelAttention, UnsupportedGqaGroupIsRefused) {
  const int P = make_mpi_world_communicator()->size();
  if (P == 1) GTEST_SKIP() << "one rank holds every head";
  ParallelOptions options;
  options.strategy = Strategy::ulysses;
  // P + 1 kv heads: P divides neither them nor they P.
  expect_refused({{0, 40}, P * (P + 1), P + 1, 16, DType::f32, true, Layout::striped}, options,
                 fmt::format("the {} kv heads do not divide one another", P + 1));
}

TEST(ParallelAttention, StrategiesThatDifferBetweenRanksAreRefusedEverywhere) {
  auto comm = make_mpi_world_communicator();
  if (comm->size() == 1) GTEST_SKIP() << "needs two ranks";
  ParallelOptions options;
  options.strategy = comm->rank() == 0 ? Strategy::ring : Strategy::ulysses;
  expect_refused({{0, 40}, 2 * comm->size(), 2, 16, DType::f32, true, Layout::zigzag}, options, "differ between ranks");
  expect_refused({{0, 40}, 2 * comm->size(), 2, 16, DType::f32, true, Layout::zigzag}, options, "rank 1: strategy ulysses");
}

TEST(ParallelAttention, ShardOfTheWrongSizeOnOneRankIsRefusedEverywhere) {
  auto comm = make_mpi_world_communicator();
  const int P = comm->size();
  const int hq = query_heads_for(P), d = 16;
  for (Strategy s : {Strategy::ring, Strategy::ulysses}) {
    ParallelOptions options;
    options.strategy = s;
    ParallelAttention attention(*comm, {{0, 40}, hq, 1, d, DType::f32, true, Layout::zigzag}, options, make_backend("cpu"));
    // Rank 0 passes one row too many; the others are right and must not wait for it.
    const auto n = attention.shards().local_tokens(comm->rank()) + (comm->rank() == 0 ? 1 : 0);
    std::mt19937_64 rng(test::fresh_seed());
    auto q = test::random_tensor(rng, DType::f32, {n, hq, d}), kv = test::random_tensor(rng, DType::f32, {n, 1, d});
    HostTensor o(DType::f32, {n, hq, d}), lse(DType::f32, {hq, n});
    lse.view = TensorView(lse.view.data, DType::f32, {hq, n});
    try {
      attention.forward(q.view, kv.view, kv.view, o.view, lse.view);
      FAIL() << "wrong shard size accepted";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(P > 1 ? "rank 0: q must be" : "q must be"), std::string::npos) << what;
      EXPECT_NE(what.find("shards()"), std::string::npos) << what;
    }
  }
}

TEST(ParallelAttention, InputsOfAnotherDtypeThanTheProblemAreRefused) {
  auto comm = make_mpi_world_communicator();
  const int hq = query_heads_for(comm->size()), d = 16;
  ParallelOptions options;
  options.strategy = Strategy::ulysses;
  ParallelAttention attention(*comm, {{0, 40}, hq, hq, d, DType::bf16, false, Layout::zigzag}, options, make_backend("cpu"));
  const auto n = attention.shards().local_tokens(comm->rank());
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {n, hq, d});
  HostTensor o(DType::f32, {n, hq, d}), lse(DType::f32, {hq, n});
  lse.view = TensorView(lse.view.data, DType::f32, {hq, n});
  try {
    attention.forward(q.view, q.view, q.view, o.view, lse.view);
    FAIL() << "f32 inputs accepted for a bf16 problem";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("q must be a contiguous bf16"), std::string::npos) << e.what();
  }
}

TEST(ParallelAttention, ThreadRanksOverInProcessCommunicators) {
  // The path the GPU suite takes (ranks as threads, sub-communicators split in process), on host
  // memory; each MPI process runs its own set of threads.
  for (const auto& [strategy, u] : {std::pair{Strategy::ulysses, 0}, std::pair{Strategy::hybrid, 2}}) {
    const auto seed = test::fresh_seed();
    auto comms = make_local_communicators(4);
    std::vector<std::thread> threads;
    for (auto& c : comms)
      threads.emplace_back([&, comm = c.get()] {
        test::check_parallel_against_reference(*comm, {{Layout::striped, true, {0, 1, 70, 113}, 8, 2, 16, DType::f32}, strategy, u},
                                               seed);
      });
    for (auto& t : threads) t.join();
  }
}

TEST(ParallelAttention, StrategyNamesRoundTrip) {
  for (Strategy s : {Strategy::ring, Strategy::ulysses, Strategy::hybrid, Strategy::automatic})
    EXPECT_EQ(parse_strategy(to_string(s)), s);
  EXPECT_EQ(std::string(to_string(Strategy::automatic)), "auto");
  try {
    parse_strategy("tree");
    FAIL() << "unknown strategy accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use ring, ulysses, hybrid or auto"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn
