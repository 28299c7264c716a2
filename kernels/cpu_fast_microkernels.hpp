// Register-blocked fp32 tile products and the vectorized exp2 of the fast CPU attention kernel.
// Every tile product of forward and backward (S = Q K^T, O += P V, dP = dO V^T, dV += P^T dO,
// dK += dS^T Q, dQ += dS K) is one call of tile_gemm with the right strides, so tuning happens here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace longattn::kernels::fast {

// Register block: kMr rows of C times kNv vectors of 16 columns. 6 x 4 = 24 zmm accumulators, plus
// 4 B vectors and one broadcast A value: 29 of the 32 zmm registers. Each k step does 4 loads and
// 6 broadcasts for 24 FMAs, so the two FMA ports, not the load ports, are the limit.
inline constexpr int kMr = 6;
inline constexpr int kNv = 4;
inline constexpr int kLanes = 16;

// C[m][n] (+)= sum_k A(m, k) * B[k][n] for m < M, n < N, k < K, where A(m, k) = A[m * a_ms + k * a_ks]
// (any strides: the same kernel reads row-major and transposed tiles), B rows ldb apart, C rows ldc
// apart. N must be a multiple of 16 (packed tiles are padded to it).
template <int MR, int NV>
inline void gemm_block(int K, const float* __restrict A, std::ptrdiff_t a_ms, std::ptrdiff_t a_ks,
                       const float* __restrict B, std::ptrdiff_t ldb, float* __restrict C, std::ptrdiff_t ldc,
                       bool accumulate) {
#if defined(__AVX512F__)
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[m][v] = accumulate ? _mm512_loadu_ps(C + m * ldc + v * kLanes) : _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 b[NV];
    const float* bk = B + k * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(bk + v * kLanes);
    const float* ak = A + k * a_ks;
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(ak[m * a_ms]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] = _mm512_fmadd_ps(a, b[v], c[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + v * kLanes, c[m][v]);
#else
  // Portable fallback: the same blocking, written so the compiler vectorizes the n loop.
  float c[MR][NV * kLanes];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV * kLanes; ++n) c[m][n] = accumulate ? C[m * ldc + n] : 0.0f;
  for (int k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    for (int m = 0; m < MR; ++m) {
      const float a = A[m * a_ms + k * a_ks];
#pragma omp simd
      for (int n = 0; n < NV * kLanes; ++n) c[m][n] += a * bk[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NV * kLanes; ++n) C[m * ldc + n] = c[m][n];
#endif
}

template <int NV>
inline void gemm_rows(int mr, int K, const float* A, std::ptrdiff_t a_ms, std::ptrdiff_t a_ks, const float* B,
                      std::ptrdiff_t ldb, float* C, std::ptrdiff_t ldc, bool acc) {
  switch (mr) {
    case 6: gemm_block<6, NV>(K, A, a_ms, a_ks, B, ldb, C, ldc, acc); break;
    case 5: gemm_block<5, NV>(K, A, a_ms, a_ks, B, ldb, C, ldc, acc); break;
    case 4: gemm_block<4, NV>(K, A, a_ms, a_ks, B, ldb, C, ldc, acc); break;
    case 3: gemm_block<3, NV>(K, A, a_ms, a_ks, B, ldb, C, ldc, acc); break;
    case 2: gemm_block<2, NV>(K, A, a_ms, a_ks, B, ldb, C, ldc, acc); break;
    default: gemm_block<1, NV>(K, A, a_ms, a_ks, B, ldb, C, ldc, acc); break;
  }
}

// The whole tile product: column panels of 64 (B panel of K x 64 stays in L1 across row blocks),
// row blocks of 6, tails by smaller instantiations.
inline void tile_gemm(int M, int N, int K, const float* A, std::ptrdiff_t a_ms, std::ptrdiff_t a_ks, const float* B,
                      std::ptrdiff_t ldb, float* C, std::ptrdiff_t ldc, bool accumulate) {
  for (int n0 = 0; n0 < N; n0 += kNv * kLanes) {
    const int nv = std::min(kNv, (N - n0) / kLanes);
    for (int m0 = 0; m0 < M; m0 += kMr) {
      const int mr = std::min(kMr, M - m0);
      const float* a = A + m0 * a_ms;
      const float* b = B + n0;
      float* c = C + m0 * ldc + n0;
      switch (nv) {
        case 4: gemm_rows<4>(mr, K, a, a_ms, a_ks, b, ldb, c, ldc, accumulate); break;
        case 3: gemm_rows<3>(mr, K, a, a_ms, a_ks, b, ldb, c, ldc, accumulate); break;
        case 2: gemm_rows<2>(mr, K, a, a_ms, a_ks, b, ldb, c, ldc, accumulate); break;
        default: gemm_rows<1>(mr, K, a, a_ms, a_ks, b, ldb, c, ldc, accumulate); break;
      }
    }
  }
}

// 2^x for x in [-inf, 128]: round-to-nearest split x = n + f, |f| <= 1/2, degree-7 Taylor series of
// 2^f (truncation error 5e-9 relative, so ~1 ulp after rounding), then scalef by n. Inputs below
// -200 (the -inf of masked scores) give exactly 0.
#if defined(__AVX512F__)
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(128.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

// x[i] = 2^(x[i] - sub[i]) for i < n (n a multiple of 16).
inline void exp2_sub(float* __restrict x, const float* __restrict sub, int n) {
#if defined(__AVX512F__)
  for (int i = 0; i < n; i += kLanes)
    _mm512_storeu_ps(x + i, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(sub + i))));
#else
  for (int i = 0; i < n; ++i) x[i] = std::exp2(x[i] - sub[i]);
#endif
}

inline float exp2_scalar(float x) { return std::exp2(x); }

}  // namespace longattn::kernels::fast
