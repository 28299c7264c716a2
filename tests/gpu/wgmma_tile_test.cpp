// The wgmma forward's two tile products on their own (kernels/cuda/flash_fwd_wgmma.cu,
// wgmma_tile_products): S = Q K^T through the swizzled loads, shared-memory descriptors and the
// accumulator layout; O = P V through the register A fragments and the transposed V descriptor.
// Against double-precision products of the same 16-bit inputs. When the cuda_wgmma attention cases
// fail, these say which piece is wrong.
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

class WgmmaTile : public ::testing::TestWithParam<DType> {};

TEST_P(WgmmaTile, ProductsMatchDoublePrecision) {
  LONGATTN_SKIP_WITHOUT_GPU();
  int major = 0;
  GPU_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  if (major != 9) GTEST_SKIP() << "wgmma needs a Hopper GPU (sm_90a)";
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

INSTANTIATE_TEST_SUITE_P(Gpu, WgmmaTile, ::testing::Values(DType::bf16, DType::f16),
                         [](const auto& tp) { return std::string(to_string(tp.param)); });

}  // namespace
}  // namespace longattn
