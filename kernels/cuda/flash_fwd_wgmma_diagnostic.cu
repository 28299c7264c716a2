// A diagnostic for the GPU tests, not used by the library: the wgmma forward's two products on one
// tile (q [kBM][kD], k and v [kBN][kD], row-major) through the kernel's own loads, descriptors and
// fragment layouts; s = q k^T and o = bf16/fp16(s) v come back [kBM][kBN] and [kBM][kD] in fp32.
// When the attention test of the wgmma forward fails, this tells whether the first product, the
// second, or the softmax around them is wrong.
#include <cstdint>

#include "common/check.hpp"
#include "kernels/cuda/flash_fwd_wgmma_products.cuh"
#include "kernels/cuda/launch.cuh"

namespace longattn::kernels::cuda {
namespace {

using namespace wgmma_fwd;

template <class T>
struct TileProductsStorage {  // every buffer a multiple of 1024 bytes, so each keeps the swizzle's alignment
  T q[kBM * kD];
  T k[kBN * kD];
  T v[kBN * kD];
};
constexpr int kTileProductsSmemBytes = sizeof(TileProductsStorage<__half>) + 1024;  // + alignment slack

template <class T>
__global__ void __launch_bounds__(kThreads, 1) wgmma_tile_products_kernel(const T* q, const T* k, const T* v, float* s_out, float* o_out) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<TileProductsStorage<T>*>(wgmma::smem_aligned_1024(smem_raw));
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  wgmma::load_sw128<kBM, kThreads>(smem.q, q, kD, kBM, tid);
  wgmma::load_sw128<kBN, kThreads>(smem.k, k, kD, kBN, tid);
  wgmma::load_sw128<kBN, kThreads>(smem.v, v, kD, kBN, tid);
  cp_async_commit();
  cp_async_wait<0>();
  wgmma::fence_proxy_async();
  __syncthreads();
  float s[64];
  qk_product<T>(s, smem_addr(smem.q) + wg * 64 * 128, smem_addr(smem.k));
#pragma unroll
  for (int i = 0; i < 64; ++i) s_out[(wg * 64 + wgmma::acc_row(i, warp, lane)) * kBN + wgmma::acc_col(i, lane)] = s[i];
  std::uint32_t pa[kBN / 16][4];
  pack_probabilities<T>(s, pa);
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  pv_product<T>(o, pa, smem_addr(smem.v));
#pragma unroll
  for (int i = 0; i < 64; ++i) o_out[(wg * 64 + wgmma::acc_row(i, warp, lane)) * kD + wgmma::acc_col(i, lane)] = o[i];
#endif
}

template <class T>
void launch_tile_products(const void* q, const void* k, const void* v, float* s, float* o, cudaStream_t stream) {
  launch_with_smem(wgmma_tile_products_kernel<T>, dim3(1), kThreads, kTileProductsSmemBytes, stream, static_cast<const T*>(q),
                   static_cast<const T*>(k), static_cast<const T*>(v), s, o);
}

}  // namespace

void wgmma_tile_products(const void* q, const void* k, const void* v, float* s, float* o, DType dtype, cudaStream_t stream) {
  if (dtype == DType::bf16) launch_tile_products<__nv_bfloat16>(q, k, v, s, o, stream);
  else if (dtype == DType::f16) launch_tile_products<__half>(q, k, v, s, o, stream);
  else throw_unsupported("wgmma_tile_products: bf16 or fp16 only");
}

}  // namespace longattn::kernels::cuda
