// GPU merge, delta, fill/add/convert/copy and the split-KV decode kernel against their CPU twins.
#include <cmath>
#include <limits>
#include <string>

#include <fmt/format.h>

#include "gpu/gpu_test_util.hpp"
#include "kernels/cpu_kernels.hpp"
#include "kernels/cuda/decode.hpp"
#include "longattn/backend.hpp"
#include "longattn/error.hpp"

namespace longattn {
namespace {

using test::DeviceInts;
using test::DeviceTensor;
using test::HostTensor;
constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(GpuHelpers, MergeMatchesCpuIncludingEmptyRows) {
  LONGATTN_SKIP_WITHOUT_GPU();
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int t = 77, h = 5, d = 96;
  for (DType pt : {DType::f32, DType::bf16}) {
    auto oa = test::random_tensor(rng, DType::f32, {t, h, d});
    auto la = test::random_tensor(rng, DType::f32, {h, t}, 4.0f);
    auto op = test::random_tensor(rng, pt, {t, h, d});
    auto lp = test::random_tensor(rng, DType::f32, {h, t}, 4.0f);
    // Some rows empty on one side, some on both; an empty side may hold garbage (NaN) in o.
    for (int i = 0; i < t; i += 7) la.view.as<float>()[i] = -kInf;
    for (int i = 0; i < t; i += 5) lp.view.as<float>()[i] = -kInf;
    for (int x = 0; x < d; ++x) oa.view.as<float>()[x] = std::numeric_limits<float>::quiet_NaN();  // row (0,0): lse -inf
    DeviceTensor doa(oa), dla(la), dop(op), dlp(lp);
    auto backend = make_backend("cuda", DeviceKind::cuda);
    backend->merge_into(doa.view, dla.view, dop.view, dlp.view, nullptr);
    backend->device_ops().synchronize(nullptr);
    // DESIGN.md: a row that is empty on both sides ends with o = 0 (the CPU merge leaves o_acc as it was).
    std::vector<bool> both_empty(static_cast<std::size_t>(t) * h);
    for (int i = 0; i < t; ++i)
      for (int hh = 0; hh < h; ++hh)
        both_empty[static_cast<std::size_t>(i) * h + hh] = la.view.as<float>()[hh * t + i] == -kInf && lp.view.as<float>()[hh * t + i] == -kInf;
    kernels::cpu_merge_into(oa.view, la.view, op.view, lp.view);
    for (std::size_t r = 0; r < both_empty.size(); ++r)
      if (both_empty[r])
        for (int x = 0; x < d; ++x) oa.view.as<float>()[r * d + x] = 0.0f;
    EXPECT_LE(test::compare(doa.to_host().to_f32(), oa.to_f32()).max_abs, 1e-5);
    EXPECT_LE(test::compare(dla.to_host().to_f32(), la.to_f32()).max_abs, 1e-5);
    for (int x = 0; x < d; ++x) ASSERT_FALSE(std::isnan(doa.to_host().view.as<float>()[x])) << "NaN leaked from an empty side";
  }
}

// A GPU allocation larger than the card is the problem's size, not a bug: out_of_capacity, with
// CUDA's own words for it (callers such as examples/torch_train.py tell "too long" from a failure).
TEST(GpuHelpers, AnAllocationTheCardCannotHoldIsOutOfCapacity) {
  LONGATTN_SKIP_WITHOUT_GPU();
  auto backend = make_backend("cuda", DeviceKind::cuda);
  try {
    auto buffer = backend->device_ops().allocate(std::size_t{1} << 50);  // 1 PiB
    ADD_FAILURE() << "a 1 PiB allocation succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_capacity) << e.what();
    EXPECT_NE(std::string(e.what()).find("out of memory"), std::string::npos) << e.what();
  }
  // The device is still usable afterwards.
  auto small = backend->device_ops().allocate(1 << 20);
  EXPECT_NE(small->data(), nullptr);
}

TEST(GpuHelpers, DeltaFillAddConvertCopy) {
  LONGATTN_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  auto backend = make_backend("cuda", DeviceKind::cuda);
  const int t = 301, h = 3, d = 128;
  auto o = test::random_tensor(rng, DType::bf16, {t, h, d});
  auto g = test::random_tensor(rng, DType::bf16, {t, h, d});
  HostTensor delta_ref(DType::f32, {h, t});
  kernels::cpu_compute_delta(o.view, g.view, delta_ref.view);
  DeviceTensor dO(o), dG(g);
  auto delta = DeviceTensor::poisoned(DType::f32, {h, t});
  backend->compute_delta(dO.view, dG.view, delta.view, nullptr);
  EXPECT_LE(test::compare(delta.to_host().to_f32(), delta_ref.to_f32()).max_abs, 1e-3);

  auto f = DeviceTensor::poisoned(DType::f16, {t, h, d});
  backend->device_ops().fill(f.view, 0.5f, nullptr);
  for (float x : f.to_host().to_f32()) ASSERT_EQ(x, 0.5f);

  auto acc = test::random_tensor(rng, DType::f32, {t, h, d});
  DeviceTensor dacc(acc);
  backend->device_ops().add_into(dacc.view, dO.view, nullptr);
  auto want = acc.to_f32();
  const auto ov = o.to_f32();
  for (std::size_t i = 0; i < want.size(); ++i) want[i] += ov[i];
  EXPECT_LE(test::compare(dacc.to_host().to_f32(), want).max_abs, 1e-6);

  auto c32 = DeviceTensor::poisoned(DType::f32, {t, h, d});
  backend->device_ops().convert(c32.view, dO.view, nullptr);
  EXPECT_EQ(test::compare(c32.to_host().to_f32(), ov).max_abs, 0.0);
  auto c16 = DeviceTensor::poisoned(DType::bf16, {t, h, d});
  backend->device_ops().convert(c16.view, c32.view, nullptr);
  EXPECT_EQ(test::compare(c16.to_host().to_f32(), ov).max_abs, 0.0);

  auto buf = backend->device_ops().allocate(dO.view.bytes());
  backend->device_ops().copy_bytes(buf->data(), dO.ptr, dO.view.bytes(), nullptr);
  HostTensor back(DType::bf16, {t, h, d});
  backend->device_ops().copy_bytes(back.view.data, buf->data(), dO.view.bytes(), nullptr);
  backend->device_ops().synchronize(nullptr);
  EXPECT_EQ(test::compare(back.to_f32(), ov).max_abs, 0.0);
}

struct DecodeCase {
  int tq, hq, hkv, d, tk;
  bool causal;
  DType dtype;
};

class GpuDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(GpuDecode, MatchesReference) {
  LONGATTN_SKIP_WITHOUT_GPU();
  const auto c = GetParam();
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  auto q = test::random_tensor(rng, c.dtype, {c.tq, c.hq, c.d});
  auto k = test::random_tensor(rng, c.dtype, {c.tk, c.hkv, c.d});
  auto v = test::random_tensor(rng, c.dtype, {c.tk, c.hkv, c.d});
  // The new tokens sit at the end of the sequence; with causal, token i sees keys up to tk - tq + i
  // (the earlier query rows miss the last keys).
  std::vector<std::int32_t> pq, pk;
  for (int i = 0; i < c.tq; ++i) pq.push_back(c.tk - c.tq + i);
  for (int j = 0; j < c.tk; ++j) pk.push_back(j);
  AttentionArgs a;
  a.q = q.view;
  a.k = k.view;
  a.v = v.view;
  a.causal = c.causal;
  a.q_positions = pq.data();
  a.k_positions = pk.data();
  HostTensor o_ref(DType::f32, {c.tq, c.hq, c.d}), lse_ref(DType::f32, {c.hq, c.tq});
  kernels::reference_forward(a, {o_ref.view, lse_ref.view});

  DeviceTensor dq(q), dk(k), dv(v);
  DeviceInts dpq(pq), dpk(pk);
  a.q = dq.view;
  a.k = dk.view;
  a.v = dv.view;
  a.q_positions = dpq.ptr;
  a.k_positions = dpk.ptr;
  ASSERT_EQ(kernels::cuda::decode_unsupported_reason(a), "");
  for (DType odt : {c.dtype, DType::f32}) {
    auto o = DeviceTensor::poisoned(odt, {c.tq, c.hq, c.d});
    auto lse = DeviceTensor::poisoned(DType::f32, {c.hq, c.tq});
    kernels::cuda::cuda_decode_attention(a, {o.view, lse.view});
    GPU_OK(cudaDeviceSynchronize());
    EXPECT_LE(test::compare(o.to_host().to_f32(), o_ref.to_f32()).max_abs, c.dtype == DType::bf16 ? 1e-2 : 2e-3);
    EXPECT_LE(test::compare(lse.to_host().to_f32(), lse_ref.to_f32()).max_abs, 1e-3);
  }
  // The backend's forward takes the decode path for these shapes and must agree too.
  auto o = DeviceTensor::poisoned(c.dtype, {c.tq, c.hq, c.d});
  auto lse = DeviceTensor::poisoned(DType::f32, {c.hq, c.tq});
  make_backend("cuda", DeviceKind::cuda)->forward(a, {o.view, lse.view});
  GPU_OK(cudaDeviceSynchronize());
  EXPECT_LE(test::compare(o.to_host().to_f32(), o_ref.to_f32()).max_abs, c.dtype == DType::bf16 ? 1e-2 : 2e-3);
}

INSTANTIATE_TEST_SUITE_P(Gpu, GpuDecode,
                         ::testing::Values(DecodeCase{1, 32, 8, 128, 20011, false, DType::bf16},
                                           DecodeCase{2, 8, 2, 128, 5003, true, DType::bf16},
                                           DecodeCase{1, 4, 4, 64, 4099, true, DType::f16},
                                           DecodeCase{3, 4, 2, 64, 7777, true, DType::bf16},
                                           DecodeCase{1, 8, 1, 128, 4500, false, DType::f16}),
                         [](const auto& tp) {
                           const auto& c = tp.param;
                           return fmt::format("q{}_h{}x{}_d{}_k{}_{}_{}", c.tq, c.hq, c.hkv, c.d, c.tk,
                                              c.causal ? "causal" : "full", to_string(c.dtype));
                         });

}  // namespace
}  // namespace longattn
