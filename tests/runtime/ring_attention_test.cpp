// Ring attention under mpirun -np 1..4 against the single-process double-precision reference:
// every layout, causal and not, forward and backward, GQA, odd lengths, varlen batches, 16-bit.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "longattn/ring.hpp"
#include "support/ring_check.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;
using test::RingCase;

void run_case(const RingCase& c) {
  auto comm = make_mpi_world_communicator();
  // The same fresh seed on every rank: all ranks build the same global inputs.
  std::uint64_t seed = test::fresh_seed();
  comm->broadcast(&seed, sizeof seed, 0);
  test::check_ring_against_reference(*comm, c, seed);
}

class RingVsReference : public ::testing::TestWithParam<std::tuple<Layout, bool>> {};

TEST_P(RingVsReference, SingleSequenceOddLengthGqa) {
  const auto [layout, causal] = GetParam();
  run_case({layout, causal, {0, 203}, 4, 2, 40, DType::f32});
}

TEST_P(RingVsReference, VarlenBatchWithEmptyAndTinySequences) {
  const auto [layout, causal] = GetParam();
  run_case({layout, causal, {0, 0, 1, 58, 129, 133}, 4, 1, 64, DType::f32});
}

// Sixteen sequences: a step's calls run grouped into one varlen launch per mask kind, with filler
// sequences between the rows they skip.
TEST_P(RingVsReference, SixteenSequenceBatch) {
  const auto [layout, causal] = GetParam();
  auto comm = make_mpi_world_communicator();
  std::uint64_t seed = test::fresh_seed();  // the same batch on every rank
  comm->broadcast(&seed, sizeof seed, 0);
  std::mt19937_64 rng(seed);
  run_case({layout, causal, test::random_cu_seqlens(rng, 16, 37), 4, 2, 16, DType::f32});
}

TEST_P(RingVsReference, Bf16Inputs) {
  const auto [layout, causal] = GetParam();
  run_case({layout, causal, {0, 97}, 2, 2, 64, DType::bf16});
}

INSTANTIATE_TEST_SUITE_P(All, RingVsReference,
                         ::testing::Combine(::testing::Values(Layout::contiguous, Layout::zigzag, Layout::striped),
                                            ::testing::Bool()),
                         [](const auto& param_info) {
                           return std::string(to_string(std::get<0>(param_info.param))) + (std::get<1>(param_info.param) ? "_causal" : "_full");
                         });

TEST(RingAttention, WorkspacesFollowShapeChanges) {
  run_case({Layout::zigzag, true, {0, 64}, 2, 2, 32, DType::f32});
  run_case({Layout::zigzag, true, {0, 150}, 8, 2, 64, DType::f32});
}

TEST(RingAttention, RejectsShardOfTheWrongSize) {
  auto comm = make_mpi_world_communicator();
  ShardPlan plan({0, 40}, Layout::zigzag, comm->size());
  RingAttention ring(*comm, plan, {}, make_backend("cpu"));
  const auto n = plan.local_tokens(comm->rank()) + 1;
  HostTensor q(DType::f32, {n, 2, 16}), k(DType::f32, {n, 2, 16}), o(DType::f32, {n, 2, 16}), l(DType::f32, {2, n});
  try {
    ring.forward(q.view, k.view, k.view, o.view, l.view);
    FAIL() << "wrong shard size accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds"), std::string::npos) << e.what();
  }
}

TEST(RingAttention, ShapesThatDifferBetweenRanksAreRefusedEverywhere) {
  auto comm = make_mpi_world_communicator();
  if (comm->size() == 1) GTEST_SKIP() << "needs two ranks";
  ShardPlan plan({0, 40}, Layout::striped, comm->size());
  RingAttention ring(*comm, plan, {}, make_backend("cpu"));
  const auto n = plan.local_tokens(comm->rank());
  const int d = comm->rank() == 0 ? 16 : 32;
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {n, 2, d});
  HostTensor o(DType::f32, {n, 2, d}), l(DType::f32, {2, n});
  EXPECT_THROW(ring.forward(q.view, q.view, q.view, o.view, l.view), Error);
}

TEST(RingAttention, PlanForAnotherWorldSizeIsRefused) {
  auto comm = make_mpi_world_communicator();
  EXPECT_THROW(RingAttention(*comm, ShardPlan({0, 40}, Layout::zigzag, comm->size() + 1), {}, make_backend("cpu")), Error);
}

}  // namespace
}  // namespace longattn
