// The backward's travelling dK/dV sent as bf16 (RingOptions::gradient_transport), under mpirun
// -np 1..4: against the f32 transport and the double-precision reference on the same fresh inputs.
// dQ never travels, so it matches the f32 path exactly; dK/dV stay within bf16 rounding of the
// reference; the gradient traffic halves. Rank 0 prints the measured errors (README's ring section
// quotes them).
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "longattn/ring.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

HostTensor take_rows(const HostTensor& full, const RankShard& s) {
  HostTensor out(full.view.dtype, {s.tokens(), full.view.dim(1), full.view.dim(2)});
  shard_rows(full.view.data, out.view.data, static_cast<std::size_t>(full.view.dim(1) * full.view.dim(2)) * dtype_size(full.view.dtype),
             s);
  return out;
}

struct Gradients {
  HostTensor dq, dk, dv;
  std::size_t forward_bytes = 0, backward_bytes = 0;  // RingStats::bytes_sent
};

// Whole-batch inputs and the reference gradients.
struct Problem {
  std::vector<std::int32_t> cu;
  int hq = 4, hkv = 2, d = 32;
  bool causal = true;
  HostTensor q, k, v, d_o, dq, dk, dv;

  Problem(std::vector<std::int32_t> cu_seqlens, bool causal_mask, std::uint64_t seed) : cu(std::move(cu_seqlens)), causal(causal_mask) {
    std::mt19937_64 rng(seed);
    const std::int64_t t = cu.back();
    q = test::random_tensor(rng, DType::f32, {t, hq, d});
    k = test::random_tensor(rng, DType::f32, {t, hkv, d});
    v = test::random_tensor(rng, DType::f32, {t, hkv, d});
    d_o = test::random_tensor(rng, DType::f32, {t, hq, d});
    AttentionArgs a;
    a.q = q.view;
    a.k = k.view;
    a.v = v.view;
    a.batch = static_cast<int>(cu.size()) - 1;
    a.cu_seqlens_q = cu.data();
    a.cu_seqlens_k = cu.data();
    a.causal = causal;
    HostTensor o(DType::f32, {t, hq, d}), lse(DType::f32, {hq, t});
    auto ref = make_backend("reference");
    ref->forward(a, {o.view, lse.view});
    dq = HostTensor(DType::f32, {t, hq, d});
    dk = HostTensor(DType::f32, {t, hkv, d});
    dv = HostTensor(DType::f32, {t, hkv, d});
    ref->backward(a, {o.view, lse.view, d_o.view, {}, dq.view, dk.view, dv.view, false});
  }

  // The ring's gradients on this rank's shard with the given transport.
  Gradients ring_gradients(Communicator& comm, const ShardPlan& plan, DType transport) const {
    const auto shard = plan.shard(comm.rank());
    const auto n = shard.tokens();
    RingOptions opt;
    opt.causal = causal;
    opt.gradient_transport = transport;
    RingAttention ring(comm, plan, opt, make_backend("cpu"));
    auto lq = take_rows(q, shard), lk = take_rows(k, shard), lv = take_rows(v, shard), ldo = take_rows(d_o, shard);
    HostTensor o(DType::f32, {n, hq, d}), lse(DType::f32, {hq, n});
    Gradients g{HostTensor(DType::f32, {n, hq, d}), HostTensor(DType::f32, {n, hkv, d}), HostTensor(DType::f32, {n, hkv, d})};
    ring.forward(lq.view, lk.view, lv.view, o.view, lse.view);
    g.forward_bytes = ring.last_stats().bytes_sent;
    ring.backward(lq.view, lk.view, lv.view, o.view, lse.view, ldo.view, g.dq.view, g.dk.view, g.dv.view);
    g.backward_bytes = ring.last_stats().bytes_sent;
    return g;
  }
};

// The largest error over all ranks, relative to the largest reference value over all ranks.
double relative_error(Communicator& comm, const HostTensor& got, const HostTensor& want) {
  const auto d = test::compare(got.to_f32(), want.to_f32());
  double err[2] = {d.max_abs, d.max_ref};
  comm.allreduce(err, 2, ReduceType::f64, ReduceOp::max);
  return err[0] / std::max(err[1], 1e-30);
}

class GradientTransport : public ::testing::TestWithParam<std::tuple<Layout, bool>> {};

TEST_P(GradientTransport, Bf16AgainstF32AndReference) {
  const auto [layout, causal] = GetParam();
  auto comm = make_mpi_world_communicator();
  const int world = comm->size();
  std::uint64_t seed = test::fresh_seed();
  comm->broadcast(&seed, sizeof seed, 0);
  std::mt19937_64 rng(seed);
  // A long odd sequence and a short packed batch behind it.
  auto cu = test::random_cu_seqlens(rng, 4, 60);
  cu.push_back(cu.back() + 64 * world + 1 + 2 * static_cast<std::int32_t>(rng() % 16));
  const Problem p(cu, causal, seed);
  const ShardPlan plan(p.cu, layout, world);
  const auto shard = plan.shard(comm->rank());
  SCOPED_TRACE(fmt::format("{} {}, {} tokens, {} ranks, rank {}, seed {}", to_string(layout), causal ? "causal" : "full", cu.back(),
                           world, comm->rank(), seed));

  const auto wide = p.ring_gradients(*comm, plan, DType::f32);
  const auto narrow = p.ring_gradients(*comm, plan, DType::bf16);

  // dQ accumulates at home and never travels.
  EXPECT_EQ(test::compare(narrow.dq.to_f32(), wide.dq.to_f32()).max_abs, 0.0) << "dq";
  const double err_dk_wide = relative_error(*comm, wide.dk, take_rows(p.dk, shard));
  const double err_dv_wide = relative_error(*comm, wide.dv, take_rows(p.dv, shard));
  const double err_dk = relative_error(*comm, narrow.dk, take_rows(p.dk, shard));
  const double err_dv = relative_error(*comm, narrow.dv, take_rows(p.dv, shard));
  const double err_dk_vs_wide = relative_error(*comm, narrow.dk, wide.dk);
  if (comm->rank() == 0)
    std::printf("gradient transport %s %s P=%d: dk/dv relative error vs reference f32 %.2e/%.2e, bf16 %.2e/%.2e; bf16 vs f32 dk %.2e\n",
                to_string(layout), causal ? "causal" : "full", world, err_dk_wide, err_dv_wide, err_dk, err_dv, err_dk_vs_wide);
  EXPECT_LE(err_dk_wide, 2e-5);
  EXPECT_LE(err_dv_wide, 2e-5);
  // A shard's gradient is rounded to bf16 (relative step 2^-8) once per hop, P hops; partial sums
  // may exceed the final values, hence one rounding's slack.
  const double bound = (world + 1) * std::ldexp(1.0, -8);
  EXPECT_LE(err_dk, bound) << "dk";
  EXPECT_LE(err_dv, bound) << "dv";

  // The gradients' bytes on the wire halve; the key/value shards' (the forward's traffic) stay.
  const std::size_t wide_grads = wide.backward_bytes - wide.forward_bytes;
  EXPECT_EQ(narrow.forward_bytes, wide.forward_bytes);
  EXPECT_EQ(narrow.backward_bytes - narrow.forward_bytes, wide_grads / 2);
  if (world == 1) {
    EXPECT_EQ(err_dk_vs_wide, 0.0) << "one rank: nothing travels, nothing is rounded";
  } else {
    EXPECT_GT(wide_grads, 0u);
    EXPECT_GT(err_dk_vs_wide, 0.0) << "bf16 transport left the gradients bit-identical to f32: was it used?";
  }
}

INSTANTIATE_TEST_SUITE_P(All, GradientTransport,
                         ::testing::Combine(::testing::Values(Layout::contiguous, Layout::zigzag, Layout::striped), ::testing::Bool()),
                         [](const auto& param_info) {
                           return std::string(to_string(std::get<0>(param_info.param))) + (std::get<1>(param_info.param) ? "_causal" : "_full");
                         });

TEST(GradientTransportOption, OtherDtypesAreRefused) {
  auto comm = make_mpi_world_communicator();
  RingOptions opt;
  opt.gradient_transport = DType::f16;
  try {
    RingAttention ring(*comm, ShardPlan({0, 40}, Layout::zigzag, comm->size()), opt, make_backend("cpu"));
    FAIL() << "fp16 gradient transport accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gradient_transport must be f32 or bf16"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn
