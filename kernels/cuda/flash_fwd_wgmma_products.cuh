// The two tile products of the Hopper wgmma forward and the shape they work on, shared by the
// kernel (flash_fwd_wgmma.cu) and its tile diagnostic (flash_fwd_wgmma_diagnostic.cu), so the
// diagnostic checks exactly the loads, descriptors and fragment layouts the kernel runs.
#pragma once

#include <cstdint>

#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_wgmma.cuh"

namespace longattn::kernels::cuda::wgmma_fwd {

using wgmma::kD;             // head dim 128
constexpr int kBM = 128;     // query rows per block: 2 warpgroups x 64
constexpr int kBN = 128;     // keys per tile
constexpr int kThreads = 256;

// s = Q K^T for this warpgroup's 64 query rows (q_addr: their first row in column block 0 of the
// Q tile of kBM rows) against the kBN keys at k_addr: 8 steps of 16 along the head dim; step kk
// reads column block kk / 4 at byte offset 32 (kk % 4) inside the 128-byte swizzle rows (the
// hardware applies the XOR).
template <class T>
__device__ __forceinline__ void qk_issue(float (&s)[64], std::uint32_t q_addr, std::uint32_t k_addr) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const std::uint64_t da = wgmma::desc_sw128(q_addr + (kk / 4) * kBM * 128 + (kk % 4) * 32, 16, 1024);
    const std::uint64_t db = wgmma::desc_sw128(k_addr + (kk / 4) * kBN * 128 + (kk % 4) * 32, 16, 1024);
    wgmma::Mma64x128<T>::ss(s, da, db, kk > 0 ? 1 : 0);
  }
  wgmma::commit();
}
template <class T>
__device__ __forceinline__ void qk_product(float (&s)[64], std::uint32_t q_addr, std::uint32_t k_addr) {
  wgmma::fence();
  qk_issue<T>(s, q_addr, k_addr);
  wgmma::wait<0>();
  wgmma::fence_registers(s);
}

// Probabilities (in the accumulator layout) as the A fragments of the second product.
template <class T>
__device__ __forceinline__ void pack_probabilities(const float (&s)[64], std::uint32_t (&pa)[kBN / 16][4]) {
  wgmma::pack_a_fragments<T, kBN>(s, pa);
}

// o += P V with V at v_addr (kBN keys x kD): step kk takes keys 16 kk..16 kk + 15, two 8-row
// groups (stride 1024 bytes); the 128 output columns are V's two column blocks (leading offset
// kBN * 128 bytes), read transposed by the instruction.
template <class T>
__device__ __forceinline__ void pv_issue(float (&o)[64], const std::uint32_t (&pa)[kBN / 16][4], std::uint32_t v_addr) {
  wgmma::fence_registers(o);
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    const std::uint64_t db = wgmma::desc_sw128(v_addr + kk * 16 * 128, kBN * 128, 1024);
    wgmma::Mma64x128<T>::rs(o, pa[kk], db);
  }
  wgmma::commit();
}
template <class T>
__device__ __forceinline__ void pv_product(float (&o)[64], const std::uint32_t (&pa)[kBN / 16][4], std::uint32_t v_addr) {
  pv_issue<T>(o, pa, v_addr);
  wgmma::wait<0>();
  wgmma::fence_registers(o);
}

}  // namespace longattn::kernels::cuda::wgmma_fwd
