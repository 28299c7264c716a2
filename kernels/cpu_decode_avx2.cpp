// The AVX2 path of the CPU decode kernel: the vector operations for 8 f32 lanes and 16 registers,
// and the width-generic body (cpu_decode_simd.inc) built for them. AVX2 has half the registers of
// AVX-512, which sets the tile sizes: 2 query rows x 4 tokens of score accumulators (8) + 2 x 2 q
// slices + the K slices, and 4 value rows x 2 accumulators (16 elements of the head dim per pass
// over the block's V rows). With that narrow a pass the V rows are read in 8 passes at head dim
// 128 (AVX-512: 2), so the first pass also pulls whole rows into L1 (kL1Ahead); 8 tokens ahead
// was the best look-ahead tried. Its speed against the AVX-512 and portable paths, built as on an
// AVX2-only host: bench/results/offload_cpu_2core_2026-11-23.md.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/cpu_decode_internal.hpp"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types never cross a non-inlined call
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace longattn::kernels::decode_detail {
namespace {

#define LONGATTN_OP [[gnu::always_inline]] static inline

struct Avx2 {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kScoreRows = 2, kValueRows = 4;
  static constexpr int value_units(int rt) { return rt == 1 ? 4 : (rt == 2 ? 2 : 1); }  // 2 * units * rt <= 8
  static constexpr int kL1Ahead = 8;
  static constexpr bool kBf16Dot = false;

  LONGATTN_OP V zero() { return _mm256_setzero_ps(); }
  LONGATTN_OP V set1(float x) { return _mm256_set1_ps(x); }
  LONGATTN_OP V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  LONGATTN_OP V loadu(const float* p) { return _mm256_loadu_ps(p); }
  LONGATTN_OP void storeu(float* p, V x) { _mm256_storeu_ps(p, x); }
  LONGATTN_OP V add(V a, V b) { return _mm256_add_ps(a, b); }
  LONGATTN_OP V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  LONGATTN_OP V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  LONGATTN_OP V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

  // bf16: one load, a shift and a mask; f16: the exact hardware conversion; f32: two loads.
  LONGATTN_OP void load2(const float* p, V& a, V& b) {
    a = _mm256_loadu_ps(p);
    b = _mm256_loadu_ps(p + 8);
  }
  LONGATTN_OP void load2(const std::uint16_t* p, V& a, V& b) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  LONGATTN_OP void load2(const std::int16_t* p, V& a, V& b) {
    a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
  LONGATTN_OP V load1(const float* p) { return _mm256_loadu_ps(p); }
  LONGATTN_OP V load1(const std::uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  LONGATTN_OP V load1(const std::int16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

  LONGATTN_OP V fold4(V a0, V a1, V a2, V a3) {
    const V x01 = _mm256_add_ps(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));  // a0 a1 a0 a1
    const V x23 = _mm256_add_ps(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));  // a2 a3 a2 a3
    return _mm256_add_ps(_mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  LONGATTN_OP V fold_tokens(const V* y) {
    return _mm256_add_ps(_mm256_permute2f128_ps(y[0], y[1], 0x20), _mm256_permute2f128_ps(y[0], y[1], 0x31));
  }

  LONGATTN_OP float hmax(V v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
  }
  LONGATTN_OP float hadd(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
  }
  // For exp_lanes (the body's exp): 2^n built in the exponent bits (AVX2 has no vscalefps), so
  // the upper clamp keeps n <= 127 and the result finite.
  static constexpr float kExpHi = 88.3f;
  LONGATTN_OP V min(V a, V b) { return _mm256_min_ps(a, b); }
  LONGATTN_OP V max(V a, V b) { return _mm256_max_ps(a, b); }
  LONGATTN_OP V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  LONGATTN_OP V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  LONGATTN_OP V scale2n(V p, V nf) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  // Lanes j < left all ones, the others zero.
  LONGATTN_OP V lanes_below(int left) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  LONGATTN_OP V max_below(V m, V x, int left) { return _mm256_max_ps(m, _mm256_blendv_ps(m, x, lanes_below(left))); }
  LONGATTN_OP V keep_below(V x, int left) { return _mm256_and_ps(lanes_below(left), x); }
};

#undef LONGATTN_OP

#include "kernels/cpu_decode_simd.inc"

}  // namespace

void item_avx2(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) { run_item_typed<Avx2>(pb, it, sc, parts); }

}  // namespace longattn::kernels::decode_detail

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
