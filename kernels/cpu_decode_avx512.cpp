// The AVX-512 path of the CPU decode kernel: the vector operations for 16 f32 lanes and 32
// registers, the width-generic body (cpu_decode_simd.inc) built for them, and the bf16 scoring
// with vdpbf16ps where the CPU has AVX512_BF16. Everything after the target push is built for
// AVX-512; the file still builds for CPUs without it, and the driver picks this path at run time.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/cpu_decode_internal.hpp"
#include "longattn/dtype_convert.hpp"

// The vector types never cross a non-inlined call boundary, so the ABI note about passing them is moot.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// GCC 12's AVX-512 headers start several intrinsics from _mm512_undefined_ps(), a self-initialized
// variable that -Wmaybe-uninitialized reports wherever they are inlined; nothing here is unset.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#define LONGATTN_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"
#pragma clang attribute push(__attribute__((target(LONGATTN_AVX512_TARGET))), apply_to = function)
#else  // GCC tunes for 256-bit vectors on these CPUs unless told; the explicit 512-bit code wants 512
#define LONGATTN_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")  // = LONGATTN_AVX512_TARGET
#endif

namespace longattn::kernels::decode_detail {
namespace {

#define LONGATTN_OP [[gnu::always_inline]] static inline

// 4 tokens' partial dot products -> 128-bit lane Q holds, in lanes 4Q..4Q+3, each token's sum
// over that lane's partials (in-lane shuffles only).
[[gnu::always_inline]] inline __m512 fold4_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));  // a0 a1 a0 a1
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));  // a2 a3 a2 a3
  return _mm512_add_ps(_mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
}
// Four fold4 results (tokens 0..3, ..., 12..15) -> the 16 sums in natural order: two levels of
// "pair up 128-bit lanes and add".
[[gnu::always_inline]] inline __m512 fold16(const __m512* y) {
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xdd));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xdd));
}

// bf16 K with AVX512_BF16: vdpbf16ps multiplies pairs of bf16 and adds both products to an f32
// lane, so K needs no widening. q is split into hi = bf16(q) and lo = bf16(q - hi), two dot
// products per K slice, which keeps the score as exact as with f32 q (hi alone would leave a
// relative error of 2^-9 per element, visible in lse). Not inlined: it needs a wider target than
// its caller. q: per row D/2 words of hi pairs then D/2 of lo pairs (to_dp); s stride kSimdBlockTokens, as in
// the body's scores loop, with the q slices held as bf16 pairs and K taken as it is stored, 32
// elements per vdpbf16ps.
#define LONGATTN_AVX512_BF16 __attribute__((target(LONGATTN_AVX512_TARGET ",avx512bf16")))

template <int RT>
LONGATTN_AVX512_BF16 void scores_bf16_dot(const float* q, int D, const std::uint16_t* k, int n, float* s,
                                                                         const Ahead& pf) {
  using V = __m512;
  const int NC = D / 32;
  for (int g0 = 0; g0 < n; g0 += 16) {
    V y[RT][4];
    for (int u4 = 0; u4 < 4; ++u4) {
      const int j0 = g0 + 4 * u4;
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) prefetch_row(pf, j0 + u);
      if (j0 >= n) {
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) y[i][u4] = _mm512_setzero_ps();
        continue;
      }
      const std::uint16_t* kr[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) kr[u] = k + static_cast<std::size_t>(std::min(j0 + u, n - 1)) * D;
      V acc[4][RT];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) acc[u][i] = _mm512_setzero_ps();
      for (int c = 0; c < NC; ++c) {
        __m512bh qh[RT], ql[RT];
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) {
          qh[i] = (__m512bh)_mm512_loadu_si512(q + static_cast<std::size_t>(i) * D + 16 * c);
          ql[i] = (__m512bh)_mm512_loadu_si512(q + static_cast<std::size_t>(i) * D + D / 2 + 16 * c);
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const __m512bh kb = (__m512bh)_mm512_loadu_si512(kr[u] + 32 * c);
#pragma GCC unroll 8
          for (int i = 0; i < RT; ++i) acc[u][i] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[u][i], qh[i], kb), ql[i], kb);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) y[i][u4] = fold4_512(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) _mm512_storeu_ps(s + static_cast<std::size_t>(i) * kSimdBlockTokens + g0, fold16(y[i]));
  }
}

__attribute__((noinline)) LONGATTN_AVX512_BF16 void scores_bf16_dot_tile(int rows, const float* q, int D, const std::uint16_t* k, int n,
                                                                          float* s, const Ahead& pf) {
  switch (rows) {
    case 1: scores_bf16_dot<1>(q, D, k, n, s, pf); break;
    case 2: scores_bf16_dot<2>(q, D, k, n, s, pf); break;
    case 3: scores_bf16_dot<3>(q, D, k, n, s, pf); break;
    default: scores_bf16_dot<4>(q, D, k, n, s, pf); break;
  }
}

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16;
  // 4 tokens x 4 rows of score accumulators + 2 x 4 q slices fit 32 registers; value tiles of 8
  // rows x 2 accumulators.
  static constexpr int kScoreRows = 4, kValueRows = 8;
  static constexpr int value_units(int rt) { return rt == 1 ? 4 : (rt <= 4 ? 2 : 1); }
  static constexpr int kL1Ahead = 0;  // two passes over a block's V rows: L2 serves the second
  static constexpr bool kBf16Dot = true;

  LONGATTN_OP V zero() { return _mm512_setzero_ps(); }
  LONGATTN_OP V set1(float x) { return _mm512_set1_ps(x); }
  LONGATTN_OP V bcast(const float* p) { return _mm512_set1_ps(*p); }
  LONGATTN_OP V loadu(const float* p) { return _mm512_loadu_ps(p); }
  LONGATTN_OP void storeu(float* p, V x) { _mm512_storeu_ps(p, x); }
  LONGATTN_OP V add(V a, V b) { return _mm512_add_ps(a, b); }
  LONGATTN_OP V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  LONGATTN_OP V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  LONGATTN_OP V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }

  // bf16: one load, a shift and a mask; f16: the exact hardware conversion; f32: two loads.
  LONGATTN_OP void load2(const float* p, V& a, V& b) {
    a = _mm512_loadu_ps(p);
    b = _mm512_loadu_ps(p + 16);
  }
  LONGATTN_OP void load2(const std::uint16_t* p, V& a, V& b) {
    const __m512i x = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  LONGATTN_OP void load2(const std::int16_t* p, V& a, V& b) {
    a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  }
  LONGATTN_OP V load1(const float* p) { return _mm512_loadu_ps(p); }
  LONGATTN_OP V load1(const std::uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  LONGATTN_OP V load1(const std::int16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

  LONGATTN_OP V fold4(V a0, V a1, V a2, V a3) { return fold4_512(a0, a1, a2, a3); }
  LONGATTN_OP V fold_tokens(const V* y) { return fold16(y); }

  LONGATTN_OP float hmax(V v) { return _mm512_reduce_max_ps(v); }
  LONGATTN_OP float hadd(V v) { return _mm512_reduce_add_ps(v); }
  // For exp_lanes (the body's exp): 2^n by vscalefps.
  static constexpr float kExpHi = 88.7f;
  LONGATTN_OP V min(V a, V b) { return _mm512_min_ps(a, b); }
  LONGATTN_OP V max(V a, V b) { return _mm512_max_ps(a, b); }
  LONGATTN_OP V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  LONGATTN_OP V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  LONGATTN_OP V scale2n(V p, V nf) { return _mm512_scalef_ps(p, nf); }
  LONGATTN_OP __mmask16 lanes_below(int left) {
    return static_cast<__mmask16>(left >= 16 ? 0xffffu : (left <= 0 ? 0u : (1u << left) - 1u));
  }
  LONGATTN_OP V max_below(V m, V x, int left) { return _mm512_mask_max_ps(m, lanes_below(left), m, x); }
  LONGATTN_OP V keep_below(V x, int left) { return _mm512_maskz_mov_ps(lanes_below(left), x); }

  // q row (scaled) as bf16 hi pairs then lo pairs, for scores_bf16_dot.
  LONGATTN_OP void to_dp(int D, const float* src, float scale, float* dst) {
    auto* w = reinterpret_cast<std::uint16_t*>(dst);
    for (int d = 0; d < D; ++d) {
      const float x = src[d] * scale;
      const std::uint16_t hi = f32_to_bf16(x);
      w[d] = hi;
      w[D + d] = f32_to_bf16(x - bf16_to_f32(hi));
    }
  }
  LONGATTN_OP void scores_bf16_dot(int rows, const float* q, int D, const std::uint16_t* k, int n, float* s, const Ahead& pf) {
    scores_bf16_dot_tile(rows, q, D, k, n, s, pf);
  }
};

#undef LONGATTN_OP

#include "kernels/cpu_decode_simd.inc"

}  // namespace

void item_avx512(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) { run_item_typed<Avx512>(pb, it, sc, parts); }

}  // namespace longattn::kernels::decode_detail

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
