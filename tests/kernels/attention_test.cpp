// Every CPU backend against the double-precision reference: forward and backward, odd sizes,
// head dims 40/64/128, GQA ratios 1/2/4/8, varlen batches with empty and length-1 sequences,
// causal by explicit positions, fp32/bf16/fp16.
#include <gtest/gtest.h>

#include <cmath>

#include <fmt/format.h>

#include "kernels/cpu_kernels.hpp"
#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

struct Case {
  int batch, max_len, hq, hkv, d;
  bool causal;
  DType dtype;
  bool positions;  // explicit shifted positions (a ring step's view)
};

std::string name(const Case& c) {
  return fmt::format("b{}_L{}_h{}x{}_d{}_{}{}_{}", c.batch, c.max_len, c.hq, c.hkv, c.d, c.causal ? "causal" : "full",
                     c.positions ? "_pos" : "", to_string(c.dtype));
}

double tolerance(DType t) { return t == DType::f32 ? 2e-5 : 2e-2; }

struct Problem {
  std::vector<std::int32_t> cu_q, cu_k, pos_q, pos_k;
  HostTensor q, k, v, d_o;
  AttentionArgs args;
};

Problem make_problem(std::mt19937_64& rng, const Case& c) {
  Problem p;
  p.cu_q = test::random_cu_seqlens(rng, c.batch, c.max_len);
  p.cu_k = test::random_cu_seqlens(rng, c.batch, c.max_len);
  const auto tq = p.cu_q.back(), tk = p.cu_k.back();
  p.q = test::random_tensor(rng, c.dtype, {tq, c.hq, c.d});
  p.k = test::random_tensor(rng, c.dtype, {tk, c.hkv, c.d});
  p.v = test::random_tensor(rng, c.dtype, {tk, c.hkv, c.d});
  p.d_o = test::random_tensor(rng, c.dtype, {tq, c.hq, c.d});
  if (c.positions) {
    // Queries sit at a random offset; keys at a smaller one, so some rows see part of the keys and
    // some see none at all (the -inf rows).
    std::uniform_int_distribution<int> off(0, c.max_len);
    for (int b = 0; b < c.batch; ++b) {
      const int oq = off(rng), ok = off(rng) / 2;
      for (int i = 0; i < p.cu_q[b + 1] - p.cu_q[b]; ++i) p.pos_q.push_back(oq + i);
      for (int i = 0; i < p.cu_k[b + 1] - p.cu_k[b]; ++i) p.pos_k.push_back(ok + 2 * i);  // strided, as striped shards
    }
  }
  auto& a = p.args;
  a.q = p.q.view;
  a.k = p.k.view;
  a.v = p.v.view;
  a.batch = c.batch;
  a.cu_seqlens_q = p.cu_q.data();
  a.cu_seqlens_k = p.cu_k.data();
  a.q_positions = c.positions ? p.pos_q.data() : nullptr;
  a.k_positions = c.positions ? p.pos_k.data() : nullptr;
  a.causal = c.causal;
  return p;
}

class BackendVsReference : public ::testing::TestWithParam<std::tuple<std::string, Case>> {};

TEST_P(BackendVsReference, ForwardAndBackward) {
  const auto& [backend_name, c] = GetParam();
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  auto p = make_problem(rng, c);
  const auto tq = p.cu_q.back(), tk = p.cu_k.back();
  auto backend = make_backend(backend_name);

  HostTensor o_ref(DType::f32, {tq, c.hq, c.d}), lse_ref(DType::f32, {c.hq, tq});
  kernels::reference_forward(p.args, {o_ref.view, lse_ref.view});
  auto o = test::poisoned_tensor(c.dtype, {tq, c.hq, c.d});
  auto lse = test::poisoned_tensor(DType::f32, {c.hq, tq});
  backend->forward(p.args, {o.view, lse.view});
  const auto d_o = test::compare(o.to_f32(), o_ref.to_f32());
  const auto d_l = test::compare(lse.to_f32(), lse_ref.to_f32());
  EXPECT_LE(d_o.max_abs, tolerance(c.dtype)) << "o differs from the reference";
  EXPECT_LE(d_l.max_abs, tolerance(c.dtype) * 10) << "lse differs from the reference";
  for (float x : o.to_f32()) ASSERT_FALSE(std::isnan(x)) << "NaN in o";

  // Backward from the reference's o and lse, so both backends see identical inputs.
  HostTensor dq_ref(DType::f32, {tq, c.hq, c.d}), dk_ref(DType::f32, {tk, c.hkv, c.d}), dv_ref(DType::f32, {tk, c.hkv, c.d});
  BackwardArgs g{o_ref.view, lse_ref.view, p.d_o.view, {}, dq_ref.view, dk_ref.view, dv_ref.view, false};
  kernels::reference_backward(p.args, g);
  auto dq = test::poisoned_tensor(DType::f32, {tq, c.hq, c.d});
  auto dk = test::poisoned_tensor(DType::f32, {tk, c.hkv, c.d});
  auto dv = test::poisoned_tensor(DType::f32, {tk, c.hkv, c.d});
  backend->backward(p.args, {o_ref.view, lse_ref.view, p.d_o.view, {}, dq.view, dk.view, dv.view, false});
  const double gtol = (c.dtype == DType::f32 ? 5e-5 : 5e-2) * std::sqrt(static_cast<double>(c.max_len) / 16 + 1);
  for (auto [got, want, what] : {std::tuple{&dq, &dq_ref, "dq"}, {&dk, &dk_ref, "dk"}, {&dv, &dv_ref, "dv"}}) {
    const auto d = test::compare(got->to_f32(), want->to_f32());
    EXPECT_LE(d.max_abs, gtol * std::max(1.0, d.max_ref)) << what << " differs from the reference (max ref " << d.max_ref << ")";
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  // head dims and GQA ratios
  for (int d : {40, 64, 128})
    for (int ratio : {1, 2, 4, 8}) out.push_back({3, 37, 8, 8 / ratio, d, true, DType::f32, false});
  // varlen with odd lengths, not causal and causal, explicit positions
  out.push_back({5, 150, 4, 2, 64, false, DType::f32, false});
  out.push_back({5, 150, 4, 1, 64, true, DType::f32, true});
  out.push_back({1, 301, 2, 2, 128, true, DType::f32, false});
  out.push_back({4, 90, 4, 4, 40, false, DType::f32, true});
  // 16-bit inputs
  out.push_back({3, 77, 4, 2, 64, true, DType::bf16, false});
  out.push_back({3, 77, 4, 2, 128, true, DType::f16, true});
  out.push_back({2, 65, 8, 1, 40, false, DType::bf16, true});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cpu, BackendVsReference, ::testing::Combine(::testing::Values("cpu"), ::testing::ValuesIn(cases())),
                         [](const auto& test_info) { return name(std::get<1>(test_info.param)); });

TEST(AttentionInputs, RejectsHeadsNotDivisibleByKvHeads) {
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {8, 6, 16});
  auto k = test::random_tensor(rng, DType::f32, {8, 4, 16});
  auto v = test::random_tensor(rng, DType::f32, {8, 4, 16});
  HostTensor o(DType::f32, {8, 6, 16}), lse(DType::f32, {6, 8});
  AttentionArgs a;
  a.q = q.view;
  a.k = k.view;
  a.v = v.view;
  for (const char* b : {"reference", "cpu"}) {
    try {
      make_backend(b)->forward(a, {o.view, lse.view});
      FAIL() << "no error for 6 query heads over 4 kv heads";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("multiple of kv heads"), std::string::npos) << e.what();
    }
  }
}

TEST(AttentionInputs, RejectsMismatchedShapes) {
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {8, 4, 16});
  auto k = test::random_tensor(rng, DType::f32, {8, 4, 16});
  auto v = test::random_tensor(rng, DType::f32, {7, 4, 16});
  HostTensor o(DType::f32, {8, 4, 16}), lse(DType::f32, {4, 8});
  AttentionArgs a;
  a.q = q.view;
  a.k = k.view;
  a.v = v.view;
  EXPECT_THROW(make_backend("cpu")->forward(a, {o.view, lse.view}), Error);
  a.v = k.view;
  HostTensor bad_lse(DType::f32, {8, 4});
  EXPECT_THROW(make_backend("cpu")->forward(a, {o.view, bad_lse.view}), Error);
  std::vector<std::int32_t> cu = {0, 5, 9};  // ends past the 8 tokens
  a.batch = 2;
  a.cu_seqlens_q = cu.data();
  a.cu_seqlens_k = cu.data();
  EXPECT_THROW(make_backend("reference")->forward(a, {o.view, lse.view}), Error);
}

TEST(Registry, UnknownBackendNamesTheKnownOnes) {
  try {
    make_backend("nope");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("reference"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn
