// merge: equal to attention over the union of key sets, independent of order, exact on -inf rows.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "kernels/cpu_kernels.hpp"
#include "longattn/backend.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

// Attention of q over keys [lo, hi) of k/v (one sequence), via the reference.
void attend(const HostTensor& q, const HostTensor& k, const HostTensor& v, int lo, int hi, HostTensor& o, HostTensor& lse,
            bool causal) {
  const auto d = k.view.dim(2), h = k.view.dim(1);
  AttentionArgs a;
  a.q = q.view;
  a.k = TensorView(static_cast<char*>(k.view.data) + lo * h * d * 4, DType::f32, {hi - lo, h, d});
  a.v = TensorView(static_cast<char*>(v.view.data) + lo * h * d * 4, DType::f32, {hi - lo, h, d});
  a.causal = causal;
  static std::vector<std::int32_t> qpos, kpos;
  qpos.resize(static_cast<std::size_t>(q.view.dim(0)));
  for (std::size_t i = 0; i < qpos.size(); ++i) qpos[i] = static_cast<int>(i);
  kpos.resize(static_cast<std::size_t>(hi - lo));
  for (std::size_t j = 0; j < kpos.size(); ++j) kpos[j] = lo + static_cast<int>(j);
  a.q_positions = qpos.data();
  a.k_positions = kpos.data();
  kernels::reference_forward(a, {o.view, lse.view});
}

TEST(Merge, EqualsAttentionOverUnionInAnyOrder) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int t = 33, h = 3, d = 24, n = 71;
  auto q = test::random_tensor(rng, DType::f32, {t, h, d}, 2.0f);
  auto k = test::random_tensor(rng, DType::f32, {n, h, d}, 2.0f);
  auto v = test::random_tensor(rng, DType::f32, {n, h, d});
  for (bool causal : {false, true}) {
    HostTensor o_all(DType::f32, {t, h, d}), l_all(DType::f32, {h, t});
    attend(q, k, v, 0, n, o_all, l_all, causal);
    // Three disjoint key ranges; with causal, the last range is beyond every query (-inf parts).
    const int cuts[] = {0, 20, 40, n};
    std::vector<HostTensor> os, ls;
    for (int i = 0; i < 3; ++i) {
      os.emplace_back(DType::f32, std::initializer_list<std::int64_t>{t, h, d});
      ls.emplace_back(DType::f32, std::initializer_list<std::int64_t>{h, t});
      attend(q, k, v, cuts[i], cuts[i + 1], os.back(), ls.back(), causal);
    }
    auto backend = make_backend("cpu");
    for (auto order : {std::array{0, 1, 2}, std::array{2, 0, 1}, std::array{1, 2, 0}}) {
      HostTensor o(DType::f32, {t, h, d}), l(DType::f32, {h, t});
      backend->device_ops().fill(o.view, 0.0f, nullptr);
      backend->device_ops().fill(l.view, -std::numeric_limits<float>::infinity(), nullptr);
      for (int i : order) backend->merge_into(o.view, l.view, os[static_cast<std::size_t>(i)].view, ls[static_cast<std::size_t>(i)].view, nullptr);
      EXPECT_LE(test::compare(o.to_f32(), o_all.to_f32()).max_abs, 1e-5);
      EXPECT_LE(test::compare(l.to_f32(), l_all.to_f32()).max_abs, 1e-5);
    }
  }
}

TEST(Merge, BothSidesEmptyStaysEmptyWithoutNaN) {
  const int t = 4, h = 2, d = 8;
  HostTensor o(DType::f32, {t, h, d}), l(DType::f32, {h, t}), op(DType::f32, {t, h, d}), lp(DType::f32, {h, t});
  auto backend = make_backend("cpu");
  // Whatever the accumulator held, a row that saw no key at all has o = 0 (DESIGN.md).
  backend->device_ops().fill(o.view, 7.0f, nullptr);
  backend->device_ops().fill(op.view, 3.0f, nullptr);
  backend->device_ops().fill(l.view, -std::numeric_limits<float>::infinity(), nullptr);
  backend->device_ops().fill(lp.view, -std::numeric_limits<float>::infinity(), nullptr);
  backend->merge_into(o.view, l.view, op.view, lp.view, nullptr);
  for (float x : o.to_f32()) EXPECT_EQ(x, 0.0f);
  for (float x : l.to_f32()) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
}

TEST(Merge, RowThatSeesNothingHasZeroOutputAndMinusInfLse) {
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {5, 2, 16});
  auto k = test::random_tensor(rng, DType::f32, {6, 2, 16});
  auto v = test::random_tensor(rng, DType::f32, {6, 2, 16});
  std::vector<std::int32_t> qpos = {0, 1, 2, 3, 4}, kpos = {3, 4, 5, 6, 7, 8};
  AttentionArgs a;
  a.q = q.view;
  a.k = k.view;
  a.v = v.view;
  a.causal = true;
  a.q_positions = qpos.data();
  a.k_positions = kpos.data();
  for (const char* b : {"reference", "cpu"}) {
    auto o = test::poisoned_tensor(DType::f32, {5, 2, 16});
    auto l = test::poisoned_tensor(DType::f32, {2, 5});
    make_backend(b)->forward(a, {o.view, l.view});
    for (int i = 0; i < 3; ++i)
      for (int hh = 0; hh < 2; ++hh) {
        EXPECT_EQ(l.at(static_cast<std::size_t>(hh * 5 + i)), -std::numeric_limits<float>::infinity()) << b;
        for (int x = 0; x < 16; ++x) EXPECT_EQ(o.at(static_cast<std::size_t>((i * 2 + hh) * 16 + x)), 0.0f) << b;
      }
    EXPECT_TRUE(std::isfinite(l.at(3))) << b;
  }
}

}  // namespace
}  // namespace longattn
