// The fast CPU kernel at its tiling edges, against the double-precision reference: lengths one
// less/more than the 64-token tiles, a long causal zigzag shard (two separate position chunks) with
// rows that see nothing, accumulate, 16-bit outputs, a given delta, and bitwise determinism across
// thread counts. Fresh random inputs every run.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <numeric>

#include <fmt/format.h>

#include "kernels/cpu_kernels.hpp"
#include "longattn/dtype_convert.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

struct Shape {
  std::vector<std::int32_t> cu_q, cu_k, pos_q, pos_k;
  int hq = 4, hkv = 2, d = 64;
  DType dtype = DType::f32;
  bool causal = true;
};

struct Inputs {
  HostTensor q, k, v, d_o;
  AttentionArgs args;
};

Inputs make_inputs(std::mt19937_64& rng, const Shape& s) {
  Inputs in;
  const std::int64_t tq = s.cu_q.back(), tk = s.cu_k.back();
  in.q = test::random_tensor(rng, s.dtype, {tq, s.hq, s.d});
  in.k = test::random_tensor(rng, s.dtype, {tk, s.hkv, s.d});
  in.v = test::random_tensor(rng, s.dtype, {tk, s.hkv, s.d});
  in.d_o = test::random_tensor(rng, s.dtype, {tq, s.hq, s.d});
  auto& a = in.args;
  a.q = in.q.view;
  a.k = in.k.view;
  a.v = in.v.view;
  a.batch = static_cast<int>(s.cu_q.size()) - 1;
  a.cu_seqlens_q = s.cu_q.data();
  a.cu_seqlens_k = s.cu_k.data();
  a.q_positions = s.pos_q.empty() ? nullptr : s.pos_q.data();
  a.k_positions = s.pos_k.empty() ? nullptr : s.pos_k.data();
  a.causal = s.causal;
  return in;
}

double fwd_tol(DType t) { return t == DType::f32 ? 2e-5 : 2e-2; }
double bwd_tol(DType t, std::int64_t len) {
  return (t == DType::f32 ? 5e-5 : 5e-2) * std::sqrt(static_cast<double>(len) / 16 + 1);
}

void expect_close(const HostTensor& got, const HostTensor& want, double tol, const char* what) {
  const auto d = test::compare(got.to_f32(), want.to_f32());
  EXPECT_LE(d.max_abs, tol * std::max(1.0, d.max_ref)) << what << " differs from the reference (max ref " << d.max_ref << ")";
}

// Forward and backward of the fast kernel against the reference on one setup.
void check_against_reference(const Shape& s, DType out_dtype = DType::f32) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  auto in = make_inputs(rng, s);
  const std::int64_t tq = s.cu_q.back(), tk = s.cu_k.back();

  HostTensor o_ref(DType::f32, {tq, s.hq, s.d}), lse_ref(DType::f32, {s.hq, tq});
  kernels::reference_forward(in.args, {o_ref.view, lse_ref.view});
  auto o = test::poisoned_tensor(out_dtype, {tq, s.hq, s.d});
  auto lse = test::poisoned_tensor(DType::f32, {s.hq, tq});
  kernels::cpu_fast_forward(in.args, {o.view, lse.view});
  const double ftol = out_dtype == DType::f32 ? fwd_tol(s.dtype) : 2e-2;
  expect_close(o, o_ref, ftol, "o");
  expect_close(lse, lse_ref, fwd_tol(s.dtype) * 10, "lse");
  // Rows that see nothing: exactly lse = -inf and o = 0.
  for (int h = 0; h < s.hq; ++h)
    for (std::int64_t i = 0; i < tq; ++i)
      if (std::isinf(lse_ref.at(static_cast<std::size_t>(h * tq + i)))) {
        for (int x = 0; x < s.d; ++x) ASSERT_EQ(o.at(static_cast<std::size_t>((i * s.hq + h) * s.d + x)), 0.0f);
      }

  HostTensor dq_ref(DType::f32, {tq, s.hq, s.d}), dk_ref(DType::f32, {tk, s.hkv, s.d}), dv_ref(DType::f32, {tk, s.hkv, s.d});
  kernels::reference_backward(in.args, {o_ref.view, lse_ref.view, in.d_o.view, {}, dq_ref.view, dk_ref.view, dv_ref.view, false});
  auto dq = test::poisoned_tensor(out_dtype, {tq, s.hq, s.d});
  auto dk = test::poisoned_tensor(out_dtype, {tk, s.hkv, s.d});
  auto dv = test::poisoned_tensor(out_dtype, {tk, s.hkv, s.d});
  kernels::cpu_fast_backward(in.args, {o_ref.view, lse_ref.view, in.d_o.view, {}, dq.view, dk.view, dv.view, false});
  const std::int64_t len = std::max(tq, tk);
  const double gtol = out_dtype == DType::f32 ? bwd_tol(s.dtype, len) : bwd_tol(DType::bf16, len);
  expect_close(dq, dq_ref, gtol, "dq");
  expect_close(dk, dk_ref, gtol, "dk");
  expect_close(dv, dv_ref, gtol, "dv");
}

std::vector<std::int32_t> cu_of(std::initializer_list<int> lengths) {
  std::vector<std::int32_t> cu{0};
  for (int l : lengths) cu.push_back(cu.back() + l);
  return cu;
}

TEST(CpuFast, LengthsAroundTheTileSize) {
  // Tiles are 64 tokens; 1, 63, 64, 65, 127, 128, 129 cover single, full, and partial last tiles.
  for (bool causal : {false, true}) {
    for (int d : {40, 128}) {
      Shape s;
      s.cu_q = cu_of({63, 64, 65, 1, 129});
      s.cu_k = cu_of({65, 64, 63, 127, 128});
      s.d = d;
      s.causal = causal;
      SCOPED_TRACE(fmt::format("causal {} d {}", causal, d));
      check_against_reference(s);
    }
  }
}

// A zigzag shard of a 2000-token sequence cut into 4 chunks of 500: this rank holds chunks 0 and 3.
std::vector<std::int32_t> chunk_positions(std::initializer_list<int> chunks, int chunk_len) {
  std::vector<std::int32_t> p;
  for (int c : chunks)
    for (int i = 0; i < chunk_len; ++i) p.push_back(c * chunk_len + i);
  return p;
}

TEST(CpuFast, LongCausalZigzagShard) {
  Shape s;
  s.hq = 4;
  s.hkv = 1;
  s.d = 64;
  s.cu_q = cu_of({1000});
  s.pos_q = chunk_positions({0, 3}, 500);
  {
    SCOPED_TRACE("local step: chunks {0,3} against themselves");
    s.cu_k = cu_of({1000});
    s.pos_k = s.pos_q;
    check_against_reference(s);
  }
  {
    SCOPED_TRACE("ring step: chunks {0,3} against chunks {1,2}; chunk 0 sees nothing");
    s.cu_k = cu_of({1000});
    s.pos_k = chunk_positions({1, 2}, 500);
    check_against_reference(s);
  }
}

TEST(CpuFast, SixteenBitOutputsAndInputs) {
  for (DType t : {DType::bf16, DType::f16}) {
    Shape s;
    s.dtype = t;
    s.cu_q = cu_of({130, 64});
    s.cu_k = cu_of({129, 65});
    s.hq = 8;
    s.hkv = 2;
    s.d = 128;
    SCOPED_TRACE(to_string(t));
    check_against_reference(s, t);  // o and gradients in the input dtype
  }
  Shape s;
  s.cu_q = cu_of({100});
  s.cu_k = cu_of({150});
  s.dtype = DType::bf16;
  check_against_reference(s, DType::f32);  // bf16 inputs, fp32 outputs
}

TEST(CpuFast, AccumulateAndGivenDelta) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  Shape s;
  s.cu_q = cu_of({70, 129});
  s.cu_k = cu_of({200, 63});
  s.hq = 6;
  s.hkv = 3;
  s.d = 64;
  auto in = make_inputs(rng, s);
  const std::int64_t tq = s.cu_q.back(), tk = s.cu_k.back();
  HostTensor o(DType::f32, {tq, s.hq, s.d}), lse(DType::f32, {s.hq, tq});
  kernels::reference_forward(in.args, {o.view, lse.view});
  // A delta that is not rowsum(dO * O): both kernels must use the given one, not recompute it.
  HostTensor delta(DType::f32, {s.hq, tq});
  kernels::cpu_compute_delta(o.view, in.d_o.view, delta.view);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  for (std::int64_t i = 0; i < s.hq * tq; ++i) delta.view.as<float>()[i] += u(rng);

  auto dq0 = test::random_tensor(rng, DType::f32, {tq, s.hq, s.d});
  auto dk0 = test::random_tensor(rng, DType::f32, {tk, s.hkv, s.d});
  auto dv0 = test::random_tensor(rng, DType::f32, {tk, s.hkv, s.d});
  auto copy = [](const HostTensor& t) {
    HostTensor c(t.view.dtype, {t.view.dim(0), t.view.dim(1), t.view.dim(2)});
    std::memcpy(c.view.data, t.view.data, t.view.bytes());
    return c;
  };
  auto dq_ref = copy(dq0), dk_ref = copy(dk0), dv_ref = copy(dv0);
  auto dq = copy(dq0), dk = copy(dk0), dv = copy(dv0);
  kernels::reference_backward(in.args, {o.view, lse.view, in.d_o.view, delta.view, dq_ref.view, dk_ref.view, dv_ref.view, true});
  kernels::cpu_fast_backward(in.args, {o.view, lse.view, in.d_o.view, delta.view, dq.view, dk.view, dv.view, true});
  const double gtol = bwd_tol(DType::f32, 200);
  expect_close(dq, dq_ref, gtol, "dq");
  expect_close(dk, dk_ref, gtol, "dk");
  expect_close(dv, dv_ref, gtol, "dv");
  // And the accumulated values really moved away from the starting gradients.
  EXPECT_GT(test::compare(dk.to_f32(), dk0.to_f32()).max_abs, 1e-3);
}

TEST(CpuFast, IdenticalResultsForAnyThreadCount) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  Shape s;
  s.cu_q = cu_of({0, 1, 300, 129});
  s.cu_k = cu_of({0, 5, 257, 200});
  s.hq = 8;
  s.hkv = 2;
  s.d = 40;
  auto in = make_inputs(rng, s);
  const std::int64_t tq = s.cu_q.back(), tk = s.cu_k.back();
  struct Result {
    std::vector<float> o, lse, dq, dk, dv;
  };
  auto run = [&](int threads) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    HostTensor o(DType::f32, {tq, s.hq, s.d}), lse(DType::f32, {s.hq, tq});
    kernels::cpu_fast_forward(in.args, {o.view, lse.view});
    HostTensor dq(DType::f32, {tq, s.hq, s.d}), dk(DType::f32, {tk, s.hkv, s.d}), dv(DType::f32, {tk, s.hkv, s.d});
    kernels::cpu_fast_backward(in.args, {o.view, lse.view, in.d_o.view, {}, dq.view, dk.view, dv.view, false});
    omp_set_num_threads(before);
    return Result{o.to_f32(), lse.to_f32(), dq.to_f32(), dk.to_f32(), dv.to_f32()};
  };
  const Result one = run(1);
  for (int threads : {2, 3, 5}) {
    const Result many = run(threads);
    EXPECT_EQ(std::memcmp(one.o.data(), many.o.data(), one.o.size() * 4), 0) << "o differs with " << threads << " threads";
    EXPECT_EQ(std::memcmp(one.lse.data(), many.lse.data(), one.lse.size() * 4), 0) << "lse, " << threads << " threads";
    EXPECT_EQ(std::memcmp(one.dq.data(), many.dq.data(), one.dq.size() * 4), 0) << "dq, " << threads << " threads";
    EXPECT_EQ(std::memcmp(one.dk.data(), many.dk.data(), one.dk.size() * 4), 0) << "dk, " << threads << " threads";
    EXPECT_EQ(std::memcmp(one.dv.data(), many.dv.data(), one.dv.size() * 4), 0) << "dv, " << threads << " threads";
  }
}

}  // namespace
}  // namespace longattn
