// A backend that implements only the attention math (forward, backward, merge, delta) and no
// device operations runs the distributed ring: memory, copies and conversions come from the
// device's own operations (device_ops_for), which is what lets a new backend skip a device runtime.
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "kernels/cpu_kernels.hpp"
#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/layout.hpp"
#include "longattn/ring.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

class MathOnlyBackend final : public AttentionBackend {
 public:
  std::string name() const override { return "math-only"; }
  Device device() const override { return {DeviceKind::cpu, 0}; }
  std::string unsupported_reason(const AttentionArgs&) const override { return {}; }
  void forward(const AttentionArgs& a, const ForwardOutputs& out) override { kernels::reference_forward(a, out); }
  void backward(const AttentionArgs& a, const BackwardArgs& g) override { kernels::reference_backward(a, g); }
  void merge_into(TensorView oa, TensorView la, TensorView op, TensorView lp, void*) override {
    kernels::cpu_merge_into(oa, la, op, lp);
  }
  void compute_delta(TensorView o, TensorView d_o, TensorView delta, void*) override {
    kernels::cpu_compute_delta(o, d_o, delta);
  }
};

TEST(MathOnlyBackend, RunsTheRingOnTheDevicesOwnOperations) {
  constexpr int kRanks = 2;
  constexpr std::int64_t n = 37, hq = 4, hkv = 2, d = 16;  // tokens per rank
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {kRanks * n, hq, d});
  auto k = test::random_tensor(rng, DType::f32, {kRanks * n, hkv, d});
  auto v = test::random_tensor(rng, DType::f32, {kRanks * n, hkv, d});
  test::HostTensor o_ref(DType::f32, {kRanks * n, hq, d}), lse_ref(DType::f32, {hq, kRanks * n});
  AttentionArgs whole;
  whole.q = q.view;
  whole.k = k.view;
  whole.v = v.view;
  kernels::reference_forward(whole, {o_ref.view, lse_ref.view});

  // Contiguous shards: rank r holds tokens [r n, (r + 1) n).
  const auto plan = ShardPlan::single_sequence(kRanks * n, Layout::contiguous, kRanks);
  auto rows = [](const test::HostTensor& t, int rank) {
    const auto row = static_cast<std::size_t>(t.view.dim(1) * t.view.dim(2));
    return TensorView(t.view.as<float>() + static_cast<std::size_t>(rank * n) * row, DType::f32, {n, t.view.dim(1), t.view.dim(2)});
  };
  test::HostTensor o(DType::f32, {kRanks * n, hq, d});
  std::vector<test::HostTensor> lse;
  for (int r = 0; r < kRanks; ++r) lse.emplace_back(DType::f32, std::initializer_list<std::int64_t>{hq, n});
  auto comms = make_local_communicators(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      RingAttention ring(*comms[static_cast<std::size_t>(r)], plan, {}, std::make_unique<MathOnlyBackend>());
      ring.forward(rows(q, r), rows(k, r), rows(v, r), rows(o, r), lse[static_cast<std::size_t>(r)].view);
    });
  for (auto& t : threads) t.join();

  EXPECT_LE(test::compare(o.to_f32(), o_ref.to_f32()).max_abs, 1e-5);
  const auto lse_want = lse_ref.to_f32();
  for (int r = 0; r < kRanks; ++r) {
    const auto got = lse[static_cast<std::size_t>(r)].to_f32();
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t i = 0; i < n; ++i)
        EXPECT_NEAR(got[static_cast<std::size_t>(h * n + i)], lse_want[static_cast<std::size_t>(h * kRanks * n + r * n + i)], 1e-5)
            << "rank " << r << ", head " << h << ", row " << i;
  }
}

}  // namespace
}  // namespace longattn
