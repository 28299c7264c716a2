// The wgmma forward's two tile products on their own (kernels/cuda/flash_fwd_wgmma_diagnostic.cu,
// wgmma_tile_products): S = Q K^T through the swizzled loads, shared-memory descriptors and the
// accumulator layout; O = P V through the register A fragments and the transposed V descriptor.
// Against double-precision products of the same 16-bit inputs. When the cuda_wgmma attention cases
// fail, these say which piece is wrong. WgmmaBwdTile does the same for the wgmma
// backward's three product forms (wgmma_bwd_tile_products); it runs with the cuda_wgmma_bwd cases.
#include <cmath>
#include <vector>

#include <fmt/format.h>

#include "gpu/gpu_test_util.hpp"
#include "kernels/cuda/flash_params.hpp"
#include "longattn/dtype_convert.hpp"

namespace longattn {
namespace {

using test::DeviceTensor;
using test::HostTensor;

#define SKIP_WITHOUT_HOPPER()                                                       \
  do {                                                                              \
    LONGATTN_SKIP_WITHOUT_GPU();                                                    \
    int major_ = 0;                                                                 \
    GPU_OK(cudaDeviceGetAttribute(&major_, cudaDevAttrComputeCapabilityMajor, 0));  \
    if (major_ != 9) GTEST_SKIP() << "wgmma needs a Hopper GPU (sm_90a)";           \
  } while (0)

class WgmmaTile : public ::testing::TestWithParam<DType> {};

TEST_P(WgmmaTile, ProductsMatchDoublePrecision) {
  SKIP_WITHOUT_HOPPER();
  const DType t = GetParam();
  constexpr int N = 128;  // queries, keys and head dim of one tile
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  const HostTensor q = test::random_tensor(rng, t, {N, N}), k = test::random_tensor(rng, t, {N, N}),
                   v = test::random_tensor(rng, t, {N, N});
  DeviceTensor dq(q), dk(k), dv(v);
  auto s = DeviceTensor::poisoned(DType::f32, {N, N});
  auto o = DeviceTensor::poisoned(DType::f32, {N, N});
  kernels::cuda::wgmma_tile_products(dq.ptr, dk.ptr, dv.ptr, static_cast<float*>(s.ptr), static_cast<float*>(o.ptr), t, nullptr);
  GPU_OK(cudaDeviceSynchronize());
  const auto s_got = s.to_host().to_f32(), o_got = o.to_host().to_f32();

  std::vector<float> s_want(N * N), o_want(N * N);
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      double acc = 0;
      for (int d = 0; d < N; ++d) acc += static_cast<double>(q.at(i * N + d)) * k.at(j * N + d);
      s_want[i * N + j] = static_cast<float>(acc);
    }
  // The second product takes the kernel's own S rounded to the input type, as the kernel does.
  std::vector<float> p(N * N);
  for (std::size_t i = 0; i < p.size(); ++i)
    p[i] = t == DType::bf16 ? bf16_to_f32(f32_to_bf16(s_got[i])) : f16_to_f32(f32_to_f16(s_got[i]));
  for (int i = 0; i < N; ++i)
    for (int d = 0; d < N; ++d) {
      double acc = 0;
      for (int j = 0; j < N; ++j) acc += static_cast<double>(p[i * N + j]) * v.at(j * N + d);
      o_want[i * N + d] = static_cast<float>(acc);
    }
  const auto ds = test::compare(s_got, s_want), dout = test::compare(o_got, o_want);
  // fp32 accumulation of 128 exact 16-bit products: errors of a few fp32 ulps of the sums.
  EXPECT_LE(ds.max_abs, 1e-4 * std::max(1.0, ds.max_ref)) << "S = Q K^T: loads, descriptors or accumulator layout";
  EXPECT_LE(dout.max_abs, 1e-4 * std::max(1.0, dout.max_ref)) << "O = P V: A fragments or the transposed V descriptor";
}

class WgmmaBwdTile : public ::testing::TestWithParam<DType> {};

TEST_P(WgmmaBwdTile, ProductsMatchDoublePrecision) {
  SKIP_WITHOUT_HOPPER();
  const DType t = GetParam();
  constexpr int KN = 128, QM = 64, D = 128;  // keys, queries, head dim of one step
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  const HostTensor k = test::random_tensor(rng, t, {KN, D}), q = test::random_tensor(rng, t, {QM, D}),
                   ds_t = test::random_tensor(rng, t, {KN, QM});
  DeviceTensor dk(k), dq_in(q), dds(ds_t);
  auto st = DeviceTensor::poisoned(DType::f32, {KN, QM});
  auto dv = DeviceTensor::poisoned(DType::f32, {KN, D});
  auto dq = DeviceTensor::poisoned(DType::f32, {QM, D});
  kernels::cuda::wgmma_bwd_tile_products(dk.ptr, dq_in.ptr, dds.ptr, static_cast<float*>(st.ptr), static_cast<float*>(dv.ptr),
                                         static_cast<float*>(dq.ptr), t, nullptr);
  GPU_OK(cudaDeviceSynchronize());
  const auto st_got = st.to_host().to_f32(), dv_got = dv.to_host().to_f32(), dq_got = dq.to_host().to_f32();

  std::vector<float> st_want(KN * QM), dv_want(KN * D), dq_want(QM * D);
  for (int j = 0; j < KN; ++j)
    for (int i = 0; i < QM; ++i) {
      double acc = 0;
      for (int d = 0; d < D; ++d) acc += static_cast<double>(k.at(j * D + d)) * q.at(i * D + d);
      st_want[j * QM + i] = static_cast<float>(acc);
    }
  // dV = P^T Q takes the kernel's own S^T rounded to the input type, as the kernel does.
  for (int j = 0; j < KN; ++j)
    for (int d = 0; d < D; ++d) {
      double acc = 0;
      for (int i = 0; i < QM; ++i) {
        const float p = t == DType::bf16 ? bf16_to_f32(f32_to_bf16(st_got[j * QM + i])) : f16_to_f32(f32_to_f16(st_got[j * QM + i]));
        acc += static_cast<double>(p) * q.at(i * D + d);
      }
      dv_want[j * D + d] = static_cast<float>(acc);
    }
  for (int i = 0; i < QM; ++i)
    for (int d = 0; d < D; ++d) {
      double acc = 0;
      for (int j = 0; j < KN; ++j) acc += static_cast<double>(ds_t.at(j * QM + i)) * k.at(j * D + d);
      dq_want[i * D + d] = static_cast<float>(acc);
    }
  const auto e1 = test::compare(st_got, st_want), e2 = test::compare(dv_got, dv_want), e3 = test::compare(dq_got, dq_want);
  EXPECT_LE(e1.max_abs, 1e-4 * std::max(1.0, e1.max_ref)) << "S^T = K Q^T (m64n64, K-major operands)";
  EXPECT_LE(e2.max_abs, 1e-4 * std::max(1.0, e2.max_ref)) << "dV = P^T Q (A from registers, Q transposed)";
  EXPECT_LE(e3.max_abs, 1e-4 * std::max(1.0, e3.max_ref)) << "dQ = dS K (m64n64, both operands transposed)";
}

INSTANTIATE_TEST_SUITE_P(Gpu, WgmmaBwdTile, ::testing::Values(DType::bf16, DType::f16),
                         [](const auto& tp) { return std::string(to_string(tp.param)); });

INSTANTIATE_TEST_SUITE_P(Gpu, WgmmaTile, ::testing::Values(DType::bf16, DType::f16),
                         [](const auto& tp) { return std::string(to_string(tp.param)); });

}  // namespace
}  // namespace longattn
