// The portable path of the CPU decode kernel: a template over the vector width written with
// GCC/Clang vector extensions, instantiated for SSE2 (4 lanes, part of every x86-64 CPU) and for
// scalar code. It serves CPUs without AVX2 and the head dims the AVX paths do not divide (AVX-512
// needs a multiple of 16, AVX2 of 8). It walks an item head by head in blocks of
// kDecodeBlockTokens tokens with software prefetch of the blocks ahead.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/cpu_decode_internal.hpp"

namespace longattn::kernels::decode_detail {
namespace {

constexpr int BT = kDecodeBlockTokens;
// How far ahead to prefetch: 4 blocks of 16 tokens = 16 KiB of K+V at head_dim 128 bf16, about
// the bytes in flight one core needs to cover DRAM latency (~100 ns x ~10 GB/s x 2 for safety).
constexpr int kPrefetchBlocks = 4;
// Query rows per register tile: 8 accumulators + a K/V slice + temporaries fit 16 vector registers.
constexpr int RB = 8;

// One kv head's share of an item (this path walks an item head by head).
struct HeadItem {
  int seq, head;
  int r0, rn;           // rows [r0, r0 + rn) of the (sequence, kv head) group; row r = qi * G + gh
  std::int64_t t0, t1;  // stored tokens [t0, t1)
  std::size_t off;      // first row of its partials
};

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef std::int32_t i __attribute__((vector_size(4 * W)));
  typedef std::uint32_t u __attribute__((vector_size(4 * W)));
  typedef std::uint16_t h __attribute__((vector_size(2 * W)));
};

template <int W>
[[gnu::always_inline]] inline typename Vec<W>::f splat(float x) {
  // vector + scalar broadcasts the scalar; adding it to -0.0 (the identity of +, unlike +0.0)
  // lets the compiler drop the add and keep a single vbroadcastss.
  const typename Vec<W>::f negzero = -typename Vec<W>::f{};
  return negzero + x;
}

// Software prefetch of `bytes` starting at p. Rows of one kv head are contiguous only within a
// page (and K and V are two streams), so the hardware prefetchers, which stop at 4 KiB boundaries,
// leave the loads waiting on DRAM; asking for the next block ahead keeps the memory busy.
[[gnu::always_inline]] inline void prefetch(const void* p, std::size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (std::size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// W consecutive elements of type T as f32.
template <int W, class T>
[[gnu::always_inline]] inline typename Vec<W>::f load(const T* p) {
  using V = Vec<W>;
  typename V::f out;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&out, p, sizeof(out));
  } else if constexpr (std::is_same_v<T, std::uint16_t>) {  // bf16: the high half of an f32
    typename V::h x;
    std::memcpy(&x, p, sizeof(x));
    typename V::u w = __builtin_convertvector(x, typename V::u) << 16;
    std::memcpy(&out, &w, sizeof(out));
  } else {  // T = f16 (stored as 16-bit integers): widen with integer ops, which every compiler
            // vectorizes (a _Float16 conversion is scalarized by some). Exponent and mantissa
            // shifted into f32 position and scaled by 2^112 give normals and subnormals exactly;
            // infinities and NaNs (exponent 31) are patched; the sign goes back last.
    typename V::h x;
    std::memcpy(&x, p, sizeof(x));
    const typename V::u h = __builtin_convertvector(x, typename V::u);
    const typename V::u em = (h & 0x7fffu) << 13;
    typename V::f mag;
    std::memcpy(&mag, &em, sizeof(mag));
    mag = mag * 5.192296858534828e33f;  // 2^112
    typename V::u bits;
    std::memcpy(&bits, &mag, sizeof(bits));
    const typename V::u special = (typename V::u)((h & 0x7c00u) == 0x7c00u);  // all ones where exponent is 31
    bits = (bits & ~special) | ((em | 0x7f800000u) & special);
    bits |= (h & 0x8000u) << 16;
    std::memcpy(&out, &bits, sizeof(out));
  }
  return out;
}

template <int W>
[[gnu::always_inline]] inline float hsum(typename Vec<W>::f v) {
  if constexpr (W >= 16) {
    typename Vec<8>::f lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return hsum<8>(lo + hi);
  } else if constexpr (W >= 8) {
    typename Vec<4>::f lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return hsum<4>(lo + hi);
  } else {
    float s = 0;
    for (int l = 0; l < W; ++l) s += v[l];
    return s;
  }
}

// exp for a vector of f32 (Cephes-style: 2^n * polynomial on [-ln2/2, ln2/2]); relative error
// ~2 ulp, exp(-inf) handled by the caller's mask.
template <int W>
[[gnu::always_inline]] inline typename Vec<W>::f vexp(typename Vec<W>::f x) {
  using V = Vec<W>;
  const auto lo = splat<W>(-87.3f), hi = splat<W>(88.7f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const auto t = x * splat<W>(1.44269504088896341f) + splat<W>(128.5f);
  const typename V::i n = __builtin_convertvector(t, typename V::i) - 128;  // floor(x*log2e + 0.5)
  const auto nf = __builtin_convertvector(n, typename V::f);
  auto r = x - nf * splat<W>(0.693359375f);
  r = r - nf * splat<W>(-2.12194440e-4f);
  auto p = splat<W>(1.9875691500e-4f);
  p = p * r + splat<W>(1.3981999507e-3f);
  p = p * r + splat<W>(8.3334519073e-3f);
  p = p * r + splat<W>(4.1665795894e-2f);
  p = p * r + splat<W>(1.6666665459e-1f);
  p = p * r + splat<W>(5.0000001201e-1f);
  p = p * r * r + r + splat<W>(1.0f);
  const typename V::i bits = (n + 127) << 23;
  typename V::f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Row tiles with the row count as a template argument, so accumulators live in registers.
template <class F>
[[gnu::always_inline]] inline void tile_dispatch(int rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Horizontal sums of W vectors at once (one per token) into one vector of W sums: log2(W) levels
// of "pair up halves and add" (2 shuffles + 1 add per pair), 3 instructions per token-row instead
// of a full horizontal sum each. Inputs in bit-reversed token order come out in natural order.
template <int W>
constexpr int bitrev(int x) {
  int r = 0;
  for (int b = 1; b < W; b <<= 1) {
    r = (r << 1) | (x & 1);
    x >>= 1;
  }
  return r;
}

template <int W, int G>
constexpr int pair_lane(int lane) {  // the "first half" source lane of output lane `lane`
  const int m = lane / (G / 2), o = lane % (G / 2);
  return (m % 2 ? W : 0) + (m / 2) * G + o;
}

template <int W, int G, std::size_t... L>
[[gnu::always_inline]] inline typename Vec<W>::f combine(typename Vec<W>::f x, typename Vec<W>::f y, std::index_sequence<L...>) {
  const typename Vec<W>::f a = __builtin_shufflevector(x, y, pair_lane<W, G>(static_cast<int>(L))...);
  const typename Vec<W>::f b = __builtin_shufflevector(x, y, (pair_lane<W, G>(static_cast<int>(L)) + G / 2)...);
  return a + b;
}

template <int W, int G>
[[gnu::always_inline]] inline void reduce_level(typename Vec<W>::f* v, int count) {
#pragma GCC unroll 16
  for (int k = 0; k < count / 2; ++k) v[k] = combine<W, G>(v[2 * k], v[2 * k + 1], std::make_index_sequence<W>{});
  if constexpr (G > 2) reduce_level<W, G / 2>(v, count / 2);
}

// v[W] (bit-reversed token order) -> lane j = sum of token j's vector.
template <int W>
[[gnu::always_inline]] inline typename Vec<W>::f reduce_tokens(typename Vec<W>::f* v) {
  if constexpr (W > 1) reduce_level<W, W>(v, W);
  return v[0];
}

// After the scores of a block are stored: -inf for tokens past the block or past a row's end.
[[gnu::always_inline]] inline void mask_scores(float* s, int rows, int n, const std::int64_t* vis, std::int64_t t) {
  for (int i = 0; i < rows; ++i) {
    const std::int64_t v = std::clamp<std::int64_t>(vis[i] - t, 0, n);
    for (std::int64_t j = v; j < BT; ++j) s[static_cast<std::size_t>(i) * BT + j] = kNegInf;
  }
}

// s[i][j] = q[i] . k[j] for RT query rows (stride D) and n keys; -inf beyond each row's visible end.
template <int W, class T, int RT>
[[gnu::always_inline]] inline void score_tile(const float* q0, int D, int NS, const T* kbase, int n, float* s,
                                              const std::int64_t* vis, std::int64_t t) {
  using F = typename Vec<W>::f;
  for (int g0 = 0; g0 < n; g0 += W) {
    F stash[RT][W];
    for (int jj = 0; jj < W; ++jj) {
      const int slot = bitrev<W>(jj);
      if (g0 + jj >= n) {
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) stash[i][slot] = splat<W>(0.0f);
        continue;
      }
      const T* kj = kbase + static_cast<std::size_t>(g0 + jj) * D;
      // Two accumulators per row (even and odd slices) halve the FMA dependency chains.
      F sa[RT], sb[RT];
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) sa[i] = sb[i] = splat<W>(0.0f);
      int x = 0;
      for (; x + 1 < NS; x += 2) {
        const F k0 = load<W>(kj + x * W), k1 = load<W>(kj + (x + 1) * W);
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) {
          sa[i] += load<W>(q0 + static_cast<std::size_t>(i) * D + x * W) * k0;
          sb[i] += load<W>(q0 + static_cast<std::size_t>(i) * D + (x + 1) * W) * k1;
        }
      }
      if (x < NS) {
        const F k0 = load<W>(kj + x * W);
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) sa[i] += load<W>(q0 + static_cast<std::size_t>(i) * D + x * W) * k0;
      }
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) stash[i][slot] = sa[i] + sb[i];
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      const F sum = reduce_tokens<W>(stash[i]);
      std::memcpy(s + static_cast<std::size_t>(i) * BT + g0, &sum, sizeof(F));
    }
  }
  mask_scores(s, RT, n, vis, t);
}

// a[i] += sum_j p[i][j] * v[j] for RT rows (a stride D, p stride BT). Two slices per pass give
// 2 * RT independent FMA chains, enough to hide the FMA latency even for one row.
template <int W, class T, int RT>
[[gnu::always_inline]] inline void value_tile(float* a0, int D, int NS, const T* vbase, int n, const float* p0) {
  using F = typename Vec<W>::f;
  int x = 0;
  for (; x + 1 < NS; x += 2) {
    F av[RT], aw[RT];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      av[i] = load<W>(a0 + static_cast<std::size_t>(i) * D + x * W);
      aw[i] = load<W>(a0 + static_cast<std::size_t>(i) * D + (x + 1) * W);
    }
    for (int j = 0; j < n; ++j) {
      const F vv = load<W>(vbase + static_cast<std::size_t>(j) * D + x * W);
      const F vw = load<W>(vbase + static_cast<std::size_t>(j) * D + (x + 1) * W);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        const F pj = splat<W>(p0[static_cast<std::size_t>(i) * BT + j]);
        av[i] += pj * vv;
        aw[i] += pj * vw;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      std::memcpy(a0 + static_cast<std::size_t>(i) * D + x * W, &av[i], sizeof(F));
      std::memcpy(a0 + static_cast<std::size_t>(i) * D + (x + 1) * W, &aw[i], sizeof(F));
    }
  }
  for (; x < NS; ++x) {
    F av[RT];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) av[i] = load<W>(a0 + static_cast<std::size_t>(i) * D + x * W);
    for (int j = 0; j < n; ++j) {
      const F vv = load<W>(vbase + static_cast<std::size_t>(j) * D + x * W);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) av[i] += splat<W>(p0[static_cast<std::size_t>(i) * BT + j]) * vv;
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) std::memcpy(a0 + static_cast<std::size_t>(i) * D + x * W, &av[i], sizeof(F));
  }
}

// bf16 pairs: one 2W-element load as W u32 lanes gives the even elements (lane << 16) and the odd
// ones (lane & 0xffff0000) as f32 in two instructions, instead of a widening conversion. Dot
// products and the V accumulation do not care about the order of the head dimension, so q and the
// accumulators are kept in the same "evens then odds per 2W chunk" order and restored at the end.
template <int W>
[[gnu::always_inline]] inline void load_bf16_pair(const std::uint16_t* p, typename Vec<W>::f& even, typename Vec<W>::f& odd) {
  typename Vec<W>::u w;
  std::memcpy(&w, p, sizeof(w));
  const typename Vec<W>::u e = w << 16, o = w & 0xffff0000u;
  std::memcpy(&even, &e, sizeof(even));
  std::memcpy(&odd, &o, sizeof(odd));
}

template <int W, int RT>
[[gnu::always_inline]] inline void score_tile_pair(const float* q0, int D, const std::uint16_t* kbase, int n, float* s,
                                                   const std::int64_t* vis, std::int64_t t) {
  using F = typename Vec<W>::f;
  const int NC = D / (2 * W);
  // Two tokens per pass when the accumulators fit the registers: each q slice loaded from L1 then
  // feeds two tokens, halving the loads that otherwise bound this loop.
  constexpr int TU = (RT <= 4 && W >= 16) ? 2 : 1;
  for (int g0 = 0; g0 < n; g0 += W) {
    F stash[RT][W];
    const int gn = std::min(W, n - g0);
    int jj = 0;
    for (; jj + TU <= gn; jj += TU) {
      F sa[TU][RT], sb[TU][RT];
#pragma GCC unroll 8
      for (int u = 0; u < TU; ++u)
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) sa[u][i] = sb[u][i] = splat<W>(0.0f);
      for (int c = 0; c < NC; ++c) {
        F ke[TU], ko[TU];
#pragma GCC unroll 8
        for (int u = 0; u < TU; ++u) load_bf16_pair<W>(kbase + static_cast<std::size_t>(g0 + jj + u) * D + c * 2 * W, ke[u], ko[u]);
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) {
          const F qe = load<W>(q0 + static_cast<std::size_t>(i) * D + c * 2 * W);
          const F qo = load<W>(q0 + static_cast<std::size_t>(i) * D + c * 2 * W + W);
#pragma GCC unroll 8
          for (int u = 0; u < TU; ++u) {
            sa[u][i] += qe * ke[u];
            sb[u][i] += qo * ko[u];
          }
        }
      }
#pragma GCC unroll 8
      for (int u = 0; u < TU; ++u)
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) stash[i][bitrev<W>(jj + u)] = sa[u][i] + sb[u][i];
    }
    for (; jj < W; ++jj) {
      const int slot = bitrev<W>(jj);
      if (jj >= gn) {
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) stash[i][slot] = splat<W>(0.0f);
        continue;
      }
      const std::uint16_t* kj = kbase + static_cast<std::size_t>(g0 + jj) * D;
      F sa[RT], sb[RT];
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) sa[i] = sb[i] = splat<W>(0.0f);
      for (int c = 0; c < NC; ++c) {
        F ke, ko;
        load_bf16_pair<W>(kj + c * 2 * W, ke, ko);
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) {
          sa[i] += load<W>(q0 + static_cast<std::size_t>(i) * D + c * 2 * W) * ke;
          sb[i] += load<W>(q0 + static_cast<std::size_t>(i) * D + c * 2 * W + W) * ko;
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) stash[i][slot] = sa[i] + sb[i];
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      const F sum = reduce_tokens<W>(stash[i]);
      std::memcpy(s + static_cast<std::size_t>(i) * BT + g0, &sum, sizeof(F));
    }
  }
  mask_scores(s, RT, n, vis, t);
}

template <int W, int RT>
[[gnu::always_inline]] inline void value_tile_pair(float* a0, int D, const std::uint16_t* vbase, int n, const float* p0) {
  using F = typename Vec<W>::f;
  const int NC = D / (2 * W);
  for (int c = 0; c < NC; ++c) {
    F ae[RT], ao[RT];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      ae[i] = load<W>(a0 + static_cast<std::size_t>(i) * D + c * 2 * W);
      ao[i] = load<W>(a0 + static_cast<std::size_t>(i) * D + c * 2 * W + W);
    }
    for (int j = 0; j < n; ++j) {
      F ve, vo;
      load_bf16_pair<W>(vbase + static_cast<std::size_t>(j) * D + c * 2 * W, ve, vo);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        const F pj = splat<W>(p0[static_cast<std::size_t>(i) * BT + j]);
        ae[i] += pj * ve;
        ao[i] += pj * vo;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      std::memcpy(a0 + static_cast<std::size_t>(i) * D + c * 2 * W, &ae[i], sizeof(F));
      std::memcpy(a0 + static_cast<std::size_t>(i) * D + c * 2 * W + W, &ao[i], sizeof(F));
    }
  }
}

template <int W, class T>
[[gnu::always_inline]] inline void run_item(const Problem& pb, const HeadItem& it, Scratch& sc, Partials& parts) {
  using F = typename Vec<W>::f;
  const auto& sq = pb.seqs[it.seq];
  const int D = pb.lay.head_dim, G = pb.group, P = pb.lay.page_tokens, Hkv = pb.lay.kv_heads;
  const int R = it.rn;
  const int NS = D / W;  // vector slices per row
  float* acc = &parts.acc[it.off * D];
  float* m = &parts.m[it.off];
  float* l = &parts.l[it.off];

  const bool pair = std::is_same_v<T, std::uint16_t> && W > 1 && D % (2 * W) == 0;
  // Scaled query rows (row r of the item = group row it.r0 + r = qi * G + gh) and the number of
  // stored tokens each may see.
  std::int64_t vis_max = 0;
  for (int r = 0; r < R; ++r) {
    const int qi = (it.r0 + r) / G, gh = (it.r0 + r) % G;
    const std::int64_t row = sq.q_begin + qi;
    std::int64_t vis = sq.length;
    if (pb.pos) vis = std::clamp<std::int64_t>(pb.pos[row] - sq.kv_start + 1, 0, sq.length);
    sc.vis[r] = vis;
    vis_max = std::max(vis_max, vis);
    const float* src = pb.q + (static_cast<std::size_t>(row) * pb.lay.q_heads + it.head * G + gh) * D;
    float* dst = &sc.qs[static_cast<std::size_t>(r) * D];
    if (pair) {
      for (int c = 0; c < D; c += 2 * W)
        for (int ln = 0; ln < W; ++ln) {
          dst[c + ln] = src[c + 2 * ln] * pb.scale;
          dst[c + W + ln] = src[c + 2 * ln + 1] * pb.scale;
        }
    } else {
      for (int d = 0; d < D; ++d) dst[d] = src[d] * pb.scale;
    }
  }
  for (int r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0;
  }
  std::fill(acc, acc + static_cast<std::size_t>(R) * D, 0.0f);
  const std::int64_t t_end = std::min(it.t1, vis_max);

  for (std::int64_t t = it.t0; t < t_end;) {
    const std::int64_t page = t / P;
    const int row0 = static_cast<int>(t % P);
    const int n = static_cast<int>(std::min<std::int64_t>({BT, t_end - t, P - row0}));
    const T* kbase = reinterpret_cast<const T*>(sq.pages[page]) + (static_cast<std::size_t>(it.head) * P + row0) * D;
    const T* vbase = kbase + static_cast<std::size_t>(Hkv) * P * D;
    {
      // The block kPrefetchBlocks ahead (same page, or the head's rows in a later page).
      const std::int64_t ta = t + static_cast<std::int64_t>(kPrefetchBlocks) * BT;
      if (kPrefetchBlocks > 0 && ta < t_end) {
        const int na = static_cast<int>(std::min<std::int64_t>({BT, t_end - ta, P - ta % P}));
        const T* ka = reinterpret_cast<const T*>(sq.pages[ta / P]) + (static_cast<std::size_t>(it.head) * P + ta % P) * D;
        prefetch(ka, static_cast<std::size_t>(na) * D * sizeof(T));
        prefetch(ka + static_cast<std::size_t>(Hkv) * P * D, static_cast<std::size_t>(na) * D * sizeof(T));
      }
    }

    // Scores: each K row is loaded (and widened to f32) once per tile of up to RB query rows, whose
    // accumulators stay in registers; the query rows come from L1.
    for (int r0 = 0; r0 < R; r0 += RB) {
      const int rows = std::min(RB, R - r0);
      tile_dispatch(rows, [&](auto rt) {
        if constexpr (std::is_same_v<T, std::uint16_t>) {
          if (pair) {
            score_tile_pair<W, decltype(rt)::value>(&sc.qs[static_cast<std::size_t>(r0) * D], D, kbase, n,
                                                    &sc.s[static_cast<std::size_t>(r0) * BT], &sc.vis[r0], t);
            return;
          }
        }
        score_tile<W, T, decltype(rt)::value>(&sc.qs[static_cast<std::size_t>(r0) * D], D, NS, kbase, n,
                                              &sc.s[static_cast<std::size_t>(r0) * BT], &sc.vis[r0], t);
      });
    }

    // Online softmax per row: new max, rescale what was accumulated, probabilities of this block.
    for (int r = 0; r < R; ++r) {
      float* sr = &sc.s[static_cast<std::size_t>(r) * BT];
      float* pr = &sc.p[static_cast<std::size_t>(r) * BT];
      float bmax = kNegInf;
      for (int j = 0; j < n; ++j) bmax = std::max(bmax, sr[j]);
      if (bmax == kNegInf) {
        for (int j = 0; j < BT; ++j) pr[j] = 0;
        continue;
      }
      const float m_new = std::max(m[r], bmax);
      if (m_new != m[r]) {
        const float corr = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
        l[r] *= corr;
        float* ar = acc + static_cast<std::size_t>(r) * D;
        for (int d = 0; d < D; ++d) ar[d] *= corr;
        m[r] = m_new;
      }
      float sum = 0;
      for (int j = 0; j < BT; j += W) {
        const F sv = load<W>(sr + j);
        F pv = vexp<W>(sv - splat<W>(m_new));
        const auto keep = sv != splat<W>(kNegInf);  // masked keys weigh exactly 0
        pv = keep ? pv : splat<W>(0.0f);
        std::memcpy(pr + j, &pv, sizeof(pv));
        sum += hsum<W>(pv);
      }
      l[r] += sum;
    }

    // acc[r] += sum_j p[r][j] * v[j]: each V slice is loaded once per row tile and feeds the
    // tile's register accumulators (p broadcast from L1).
    for (int r0 = 0; r0 < R; r0 += RB) {
      const int rows = std::min(RB, R - r0);
      tile_dispatch(rows, [&](auto rt) {
        if constexpr (std::is_same_v<T, std::uint16_t>) {
          if (pair) {
            value_tile_pair<W, decltype(rt)::value>(acc + static_cast<std::size_t>(r0) * D, D, vbase, n,
                                                    &sc.p[static_cast<std::size_t>(r0) * BT]);
            return;
          }
        }
        value_tile<W, T, decltype(rt)::value>(acc + static_cast<std::size_t>(r0) * D, D, NS, vbase, n,
                                              &sc.p[static_cast<std::size_t>(r0) * BT]);
      });
    }
    t += n;
  }
  if (pair) {  // back to the natural order of the head dimension
    float* tmp = sc.kf.data();
    for (int r = 0; r < R; ++r) {
      float* ar = acc + static_cast<std::size_t>(r) * D;
      std::memcpy(tmp, ar, static_cast<std::size_t>(D) * sizeof(float));
      for (int c = 0; c < D; c += 2 * W)
        for (int ln = 0; ln < W; ++ln) {
          ar[c + 2 * ln] = tmp[c + ln];
          ar[c + 2 * ln + 1] = tmp[c + W + ln];
        }
    }
  }
}

template <int W>
[[gnu::always_inline]] inline void run_typed(const Problem& pb, const Item& item, Scratch& sc, Partials& parts) {
  for (int hh = 0; hh < item.hn; ++hh) {
    const HeadItem it{item.seq, item.h0 + hh, item.r0, item.rn, item.t0, item.t1,
                      item.off + static_cast<std::size_t>(hh) * static_cast<std::size_t>(item.rn)};
    switch (pb.lay.kv_dtype) {
      case DType::f32: run_item<W, float>(pb, it, sc, parts); break;
      case DType::bf16: run_item<W, std::uint16_t>(pb, it, sc, parts); break;
      case DType::f16: run_item<W, std::int16_t>(pb, it, sc, parts); break;  // f16 bits
    }
  }
}

}  // namespace

void item_sse(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) { run_typed<4>(pb, it, sc, parts); }
void item_scalar(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) { run_typed<1>(pb, it, sc, parts); }

}  // namespace longattn::kernels::decode_detail
