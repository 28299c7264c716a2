// Ring attention under mpirun -np 1..4 against the single-process double-precision reference:
// every layout, causal and not, forward and backward, GQA, odd lengths, varlen batches, 16-bit.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "longattn/ring.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

struct RingCase {
  Layout layout;
  bool causal;
  std::vector<std::int32_t> cu;  // global batch
  int hq, hkv, d;
  DType dtype;
};

std::string describe(const RingCase& c) {
  return fmt::format("{} {} tokens={} batch={} h={}x{} d={} {}", to_string(c.layout), c.causal ? "causal" : "full", c.cu.back(),
                     c.cu.size() - 1, c.hq, c.hkv, c.d, to_string(c.dtype));
}

// Rows of a full tensor for one shard.
HostTensor take_rows(const HostTensor& full, const RankShard& s) {
  HostTensor out(full.view.dtype, {s.tokens(), full.view.dim(1), full.view.dim(2)});
  shard_rows(full.view.data, out.view.data, static_cast<std::size_t>(full.view.dim(1) * full.view.dim(2)) * dtype_size(full.view.dtype), s);
  return out;
}

void run_case(const RingCase& c) {
  auto comm = make_mpi_world_communicator();
  SCOPED_TRACE(describe(c));
  // The same fresh seed on every rank: all ranks build the same global inputs.
  std::uint64_t seed = test::fresh_seed();
  comm->broadcast(&seed, sizeof seed, 0);
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  const std::int64_t T = c.cu.back();
  auto q = test::random_tensor(rng, c.dtype, {T, c.hq, c.d});
  auto k = test::random_tensor(rng, c.dtype, {T, c.hkv, c.d});
  auto v = test::random_tensor(rng, c.dtype, {T, c.hkv, c.d});
  auto d_o = test::random_tensor(rng, c.dtype, {T, c.hq, c.d});

  // Oracle on the whole batch.
  auto ref = make_backend("reference");
  AttentionArgs a;
  a.q = q.view;
  a.k = k.view;
  a.v = v.view;
  a.batch = static_cast<int>(c.cu.size()) - 1;
  a.cu_seqlens_q = c.cu.data();
  a.cu_seqlens_k = c.cu.data();
  a.causal = c.causal;
  HostTensor ro(DType::f32, {T, c.hq, c.d}), rl(DType::f32, {c.hq, T});
  ref->forward(a, {ro.view, rl.view});
  HostTensor rdq(DType::f32, {T, c.hq, c.d}), rdk(DType::f32, {T, c.hkv, c.d}), rdv(DType::f32, {T, c.hkv, c.d});
  ref->backward(a, {ro.view, rl.view, d_o.view, {}, rdq.view, rdk.view, rdv.view, false});

  ShardPlan plan(c.cu, c.layout, comm->size());
  const auto shard = plan.shard(comm->rank());
  const auto n = shard.tokens();
  RingOptions opt;
  opt.causal = c.causal;
  RingAttention ring(*comm, plan, opt, make_backend("cpu"));
  auto lq = take_rows(q, shard), lk = take_rows(k, shard), lv = take_rows(v, shard), ldo = take_rows(d_o, shard);
  auto o = test::poisoned_tensor(c.dtype, {n, c.hq, c.d});
  auto lse = test::poisoned_tensor(DType::f32, {c.hq, n});
  ring.forward(lq.view, lk.view, lv.view, o.view, lse.view);

  const double tol = c.dtype == DType::f32 ? 3e-5 : 2e-2;
  EXPECT_LE(test::compare(o.to_f32(), take_rows(ro, shard).to_f32()).max_abs, tol) << "o";
  // lse is [H, n]: compare per head.
  // lse is [H, n]: compare per head. (No ASSERT_* before the collective backward below: a rank
  // that returned early would leave its peers waiting.)
  auto lse_local = lse.to_f32();
  auto lse_ref = rl.to_f32();
  std::vector<float> lse_want(lse_local.size());
  for (int h = 0; h < c.hq; ++h)
    for (std::int64_t i = 0; i < n; ++i)
      lse_want[static_cast<std::size_t>(h * n + i)] = lse_ref[static_cast<std::size_t>(h * T + shard.global_index[static_cast<std::size_t>(i)])];
  EXPECT_LE(test::compare(lse_local, lse_want).max_abs, tol * 10) << "lse";

  // Backward from our own forward results (as a trainer would).
  auto dq = test::poisoned_tensor(DType::f32, {n, c.hq, c.d});
  auto dk = test::poisoned_tensor(DType::f32, {n, c.hkv, c.d});
  auto dv = test::poisoned_tensor(DType::f32, {n, c.hkv, c.d});
  ring.backward(lq.view, lk.view, lv.view, o.view, lse.view, ldo.view, dq.view, dk.view, dv.view);
  const double gtol = c.dtype == DType::f32 ? 2e-4 : 8e-2;
  for (auto [got, want, what] : {std::tuple{&dq, &rdq, "dq"}, {&dk, &rdk, "dk"}, {&dv, &rdv, "dv"}}) {
    const auto d = test::compare(got->to_f32(), take_rows(*want, shard).to_f32());
    EXPECT_LE(d.max_abs, gtol * std::max(1.0, d.max_ref)) << what;
  }
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
