// merge: equal to attention over the union of key sets, independent of order, exact on -inf rows.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "kernels/attention_state.hpp"
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

// The merge's edge cases, one row per case, through the backend's merge and through the state type
// every other merge site uses (online and two-pass forms).
TEST(Merge, EdgeCasesFollowTheEmptyRowContract) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  enum Case { both_empty, acc_empty, part_empty, far_apart, large_and_close, cases };
  const int h = 2, d = 16, t = cases;
  auto o = test::random_tensor(rng, DType::f32, {t, h, d}, 2.0f), op = test::random_tensor(rng, DType::f32, {t, h, d}, 2.0f);
  HostTensor l(DType::f32, {h, t}), lp(DType::f32, {h, t});
  float* oa = o.view.as<float>();
  float* ob = op.view.as<float>();
  float* la = l.view.as<float>();
  float* lb = lp.view.as<float>();
  // What an empty side's o holds must not matter: +inf, -inf and NaN in turn.
  const float junk[] = {inf, -inf, nan};
  for (int i = 0; i < t; ++i)
    for (int hh = 0; hh < h; ++hh) {
      const int li = hh * t + i;
      float* a = oa + (i * h + hh) * d;
      float* b = ob + (i * h + hh) * d;
      la[li] = u(rng);
      lb[li] = u(rng);
      if (i == both_empty || i == acc_empty) la[li] = -inf;
      if (i == both_empty || i == part_empty) lb[li] = -inf;
      if (i == far_apart) la[li] += 60.0f, lb[li] -= 60.0f;  // exp(-120) underflows float
      if (i == large_and_close) la[li] += 1e4f, lb[li] = la[li] + u(rng) * 0.25f;
      for (int x = 0; x < d; ++x) {
        if (la[li] == -inf) a[x] = junk[(x + hh) % 3];
        if (lb[li] == -inf) b[x] = junk[(x + hh + 1) % 3];
      }
    }
  const std::vector<float> oa0 = o.to_f32(), ob0 = op.to_f32(), la0 = l.to_f32(), lb0 = lp.to_f32();

  // Expected per row, in double: exact copies where one side is empty.
  auto check_row = [&](int i, int hh, float got_lse, const float* got_o, const char* how) {
    SCOPED_TRACE(testing::Message() << how << ", case " << i << ", head " << hh);
    const int li = hh * t + i;
    const double l1 = la0[static_cast<std::size_t>(li)], l2 = lb0[static_cast<std::size_t>(li)];
    const float* a = &oa0[static_cast<std::size_t>((i * h + hh) * d)];
    const float* b = &ob0[static_cast<std::size_t>((i * h + hh) * d)];
    if (i == both_empty) {
      EXPECT_EQ(got_lse, -inf);
      for (int x = 0; x < d; ++x) EXPECT_EQ(got_o[x], 0.0f);
      return;
    }
    if (i == acc_empty || i == part_empty) {
      const float* kept = i == acc_empty ? b : a;
      EXPECT_EQ(got_lse, static_cast<float>(i == acc_empty ? l2 : l1));
      for (int x = 0; x < d; ++x) EXPECT_EQ(got_o[x], kept[x]);
      return;
    }
    const double m = std::max(l1, l2), lse = m + std::log(std::exp(l1 - m) + std::exp(l2 - m));
    EXPECT_NEAR(got_lse, lse, 1e-6 * std::max(1.0, std::abs(lse)));
    for (int x = 0; x < d; ++x) {
      const double want = std::exp(l1 - lse) * a[x] + std::exp(l2 - lse) * b[x];
      EXPECT_TRUE(std::isfinite(got_o[x]));
      EXPECT_NEAR(got_o[x], want, 1e-5);
    }
  };

  make_backend("cpu")->merge_into(o.view, l.view, op.view, lp.view, nullptr);
  for (int i = 0; i < t; ++i)
    for (int hh = 0; hh < h; ++hh) check_row(i, hh, la[hh * t + i], oa + (i * h + hh) * d, "backend merge");

  // The same rows through SoftmaxState: online (merge) and two-pass (add), accumulating raw o.
  for (int i = 0; i < t; ++i)
    for (int hh = 0; hh < h; ++hh) {
      const std::size_t li = static_cast<std::size_t>(hh * t + i), base = static_cast<std::size_t>((i * h + hh) * d);
      using State = kernels::SoftmaxState<>;
      const State s1 = State::of_result(la0[li]), s2 = State::of_result(lb0[li]);
      State online = s1;
      const kernels::MergeFactors f = online.merge(s2);
      State two_pass{std::max(s1.max, s2.max), 0.0f};
      const float f1 = two_pass.add(s1), f2 = two_pass.add(s2);
      float o_online[d], o_two_pass[d];
      for (int x = 0; x < d; ++x) {
        o_online[x] = kernels::mix(f, oa0[base + x], ob0[base + x]) * online.normalizer();
        o_two_pass[x] = (kernels::weighted(f1, oa0[base + x]) + kernels::weighted(f2, ob0[base + x])) * two_pass.normalizer();
      }
      check_row(i, hh, online.lse(), o_online, "online state");
      check_row(i, hh, two_pass.lse(), o_two_pass, "two-pass state");
    }
}

// A NaN in a part that saw keys (a NaN input) is not hidden as an empty row.
TEST(Merge, NaNInAPartThatSawKeysPropagates) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937_64 rng(test::fresh_seed());
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  const kernels::ResultMerge m = kernels::merge_results(nan, u(rng));
  EXPECT_TRUE(std::isnan(m.lse));
  EXPECT_TRUE(std::isnan(kernels::mix(m.weights, u(rng), u(rng))));
  const kernels::ResultMerge m2 = kernels::merge_results(u(rng), u(rng));
  EXPECT_TRUE(std::isnan(kernels::mix(m2.weights, u(rng), nan)));
}

}  // namespace
}  // namespace longattn
