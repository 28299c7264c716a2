// The CPU decode kernel (see cpu_decode.hpp). One work item = (sequence, kv heads, chunk of KV
// tokens); it streams the chunk's K and V rows once for all query rows of the heads' GQA groups,
// with an online softmax in f32, and leaves unnormalized partials (acc, max, sum) that the merge
// step joins across chunks. Three implementations share the driver: AVX-512 and AVX2 ones in
// intrinsics with the same structure (namespaces a512 and a256; they read every page of an item
// front to back, see a512), and a portable template over the vector width written with GCC/Clang
// vector extensions, instantiated for SSE2 (4 lanes) and scalar code, which also take the head
// dims the wider paths do not divide (AVX-512 needs a multiple of 16, AVX2 of 8). The best path
// the CPU supports is picked at run time, so one binary runs on hosts with and without AVX-512.
#include "kernels/cpu_decode.hpp"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/check.hpp"
#include "longattn/config.hpp"
#include "longattn/dtype_convert.hpp"

// The vector types never cross a call boundary (everything below is inlined into the wrappers that
// carry the target attribute), so the ABI note about passing them is moot.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// GCC 12's AVX-512 headers start several intrinsics from _mm512_undefined_ps(), a self-initialized
// variable that -Wmaybe-uninitialized reports wherever they are inlined; nothing here is unset.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace longattn::kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int BT = kDecodeBlockTokens;
// How far ahead to prefetch: 4 blocks of 16 tokens = 16 KiB of K+V at head_dim 128 bf16, about
// the bytes in flight one core needs to cover DRAM latency (~100 ns x ~10 GB/s x 2 for safety).
constexpr int kPrefetchBlocks = 4;
// Query rows per register tile of the generic (SSE and scalar) path: 8 accumulators + a K/V slice +
// temporaries fit 16 vector registers.
constexpr int RB = 8;

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

// Shared, read-only facts of one call.
struct Problem {
  DecodeLayout lay;
  int group = 1;  // query heads per kv head
  float scale = 1;
  const DecodeSequence* seqs = nullptr;
  const float* q = nullptr;
  const std::int64_t* pos = nullptr;
  std::int64_t total_q = 0;
  bool bf16_dot = false;  // AVX-512 path: score bf16 K with vdpbf16ps (the CPU has AVX512_BF16)
};

// Query rows per item at most: bounds the per-thread scratch and the partials whatever a request
// asks for (a GQA group of many heads times several query tokens is cut into blocks of rows).
constexpr int kItemRows = 64;

// One work item: kv heads [h0, h0 + hn) of a sequence, rows [r0, r0 + rn) of each head's group
// (row r = qi * G + gh), stored tokens [t0, t1). hn > 1 only when a head's whole group fits, so
// then r0 = 0; hn * rn <= kItemRows. Its partial rows are head-major: off + hh * rn + r.
struct Item {
  int seq, h0, hn;
  int r0, rn;
  std::int64_t t0, t1;
  std::size_t off;
};

// One kv head's share of an item (the AVX2 / SSE / scalar path walks an item head by head).
struct HeadItem {
  int seq, head;
  int r0, rn;           // rows [r0, r0 + rn) of the (sequence, kv head) group; row r = qi * G + gh
  std::int64_t t0, t1;  // stored tokens [t0, t1)
  std::size_t off;      // first row of its partials
};

// The items that cover the same rows (one per KV chunk), merged together at the end; `head` is
// at position head - items[i].h0 of each of them.
struct Group {
  int seq, head, r0, rn;
  std::size_t first, last;  // items [first, last)
};

// Per-thread scratch, sized for kItemRows rows.
struct Scratch {
  std::vector<float> qs, s, p, kf, corr;
  std::vector<std::int64_t> vis;
};

// Partial results of the items, rows one after another: acc [rows][D] (unnormalized), m, l [rows].
struct Partials {
  std::vector<float> acc, m, l;
};

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

#if defined(__clang__)
#define LONGATTN_DECODE_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"
#else  // GCC tunes for 256-bit vectors on these CPUs unless told; the explicit 512-bit code wants 512
#define LONGATTN_DECODE_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"
#endif

// ---------------------------------------------------------------------------------------------
// The AVX-512 path. Written with intrinsics (every function carries the target attribute, so the
// file still builds for CPUs without AVX-512 and the path is picked at run time).
//
// Memory order: an item covers several kv heads (all of them unless a GQA group times the query
// tokens is too large), and for each block of up to kBlk tokens of one page it reads the K rows of
// every head of the item, then their V rows. With the page layout [K heads][tokens][D] then
// [V heads][tokens][D], a page is thus read front to back in one sweep: one long sequential stream
// per thread, which the hardware prefetchers follow, instead of two 16 KiB runs per head and page
// with jumps in between (on the 2-core EPYC development machine a plain sum over memory in the
// per-head order reads ~25 GB/s with both cores against ~31 GB/s in page order).
//
// Per block: scores for all rows (FMA on K widened to f32, 4 tokens at a time so each q slice
// loaded from L1 feeds 4 tokens; the 4x16 partial sums per row are folded with in-lane shuffles
// and every 16 tokens once across 128-bit lanes), then the online softmax of the block per row
// (one max and one rescale per 64 tokens instead of per 16), then the V pass, which folds the
// rescale of the accumulators into their loads.
// ---------------------------------------------------------------------------------------------
#define LONGATTN_A512 __attribute__((target(LONGATTN_DECODE_AVX512_TARGET), always_inline)) inline

namespace a512 {

constexpr int kBlk = 64;    // tokens per block (at most; blocks end at page and chunk ends)
constexpr int kScoreRows = 4;  // rows per score tile: 4 tokens x 4 rows accumulators + 8 q slices fit 32 registers
constexpr int kValueRows = 8;  // rows per value tile: 2 x 8 accumulators
// Prefetch distance in regions (a region = one head's K or V rows of a block: 16 KiB at 64 tokens x
// 128 bf16), into L2. Measured on the 2-core EPYC with both threads streaming DRAM: no software
// prefetch 15.7 GB/s, 1 region ahead into L1 17.5, 2 into L1 16.3, 1/2/3 into L2 ~20.5/20.6/21
// (same within noise), every second line only 17.2 (the hardware does not fill the gaps).
constexpr int kAheadRegions = 2;
// Element kinds: f32, bf16 (uint16_t) and f16 (int16_t, as in run_typed).
// load2: 32 consecutive elements as two f32 vectors. For bf16 the two are the even and the odd
// elements (one load, a shift and a mask: no conversion instruction), so q and the accumulators
// of a 32-element chunk are kept in that order; f16 uses the hardware conversion (exact, one
// instruction per 16); f32 is two plain loads.
LONGATTN_A512 void load2(const float* p, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(p);
  b = _mm512_loadu_ps(p + 16);
}
LONGATTN_A512 void load2(const std::uint16_t* p, __m512& a, __m512& b) {
  const __m512i x = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
LONGATTN_A512 void load2(const std::int16_t* p, __m512& a, __m512& b) {
  a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
}
// load1: 16 consecutive elements in natural order (the last slice when D is an odd multiple of 16).
LONGATTN_A512 __m512 load1(const float* p) { return _mm512_loadu_ps(p); }
LONGATTN_A512 __m512 load1(const std::uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
LONGATTN_A512 __m512 load1(const std::int16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Rows to prefetch while a kernel streams others: the region the item reads a few regions later,
// requested row by row as the current rows are consumed, so requests go out at the rate the data
// is used and never in bursts that fill the miss queues.
struct Ahead {
  const char* p = nullptr;
  int rows = 0;
  int row_bytes = 0;
};
// Into L2 (T1): the distance (kAheadRegions) is larger than L1.
LONGATTN_A512 void prefetch_row(const Ahead& pf, int j) {
  if (j >= pf.rows) return;  // also when there is nothing to prefetch (rows = 0)
  const char* r = pf.p + static_cast<std::size_t>(j) * static_cast<std::size_t>(pf.row_bytes);
  for (int o = 0; o < pf.row_bytes; o += 64) _mm_prefetch(r + o, _MM_HINT_T1);
}

// q rows and accumulators are kept in the order load2 produces: for bf16, per 32-element chunk the
// even elements then the odd ones (a trailing 16-element slice in natural order); else natural.
LONGATTN_A512 void to_slots(bool bf16, int D, const float* src, float scale, float* dst) {
  const int paired = bf16 ? D / 32 * 32 : 0;
  for (int c = 0; c < paired; c += 32)
    for (int w = 0; w < 16; ++w) {
      dst[c + w] = src[c + 2 * w] * scale;
      dst[c + 16 + w] = src[c + 2 * w + 1] * scale;
    }
  for (int d = paired; d < D; ++d) dst[d] = src[d] * scale;
}
LONGATTN_A512 void from_slots(bool bf16, int D, const float* src, float* dst) {
  const int paired = bf16 ? D / 32 * 32 : 0;
  for (int c = 0; c < paired; c += 32)
    for (int w = 0; w < 16; ++w) {
      dst[c + 2 * w] = src[c + w];
      dst[c + 2 * w + 1] = src[c + 16 + w];
    }
  for (int d = paired; d < D; ++d) dst[d] = src[d];
}

// Four vectors of partial dot products (tokens 0..3) -> one vector whose 128-bit lane Q holds,
// in lanes 4Q..4Q+3, each token's sum over that lane's 4 partials. In-lane shuffles only.
LONGATTN_A512 __m512 fold4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));  // a0 a1 a0 a1
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));  // a2 a3 a2 a3
  return _mm512_add_ps(_mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
}
// Four fold4 results (tokens 0..3, 4..7, 8..11, 12..15) -> the 16 token sums in natural order:
// two levels of "pair up 128-bit lanes and add".
LONGATTN_A512 __m512 fold16(__m512 y0, __m512 y1, __m512 y2, __m512 y3) {
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xdd));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(y2, y3, 0x88), _mm512_shuffle_f32x4(y2, y3, 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xdd));
}

// s[i][j] = q[i] . k[j] for RT rows (q stride D, in slot order; s stride kBlk) and tokens j < n,
// computed in groups of 16 (lanes of a group past n hold a copy of the last token's score; the
// softmax masks them). k: token stride D.
template <class T, int RT>
LONGATTN_A512 void scores(const float* q, int D, const T* k, int n, float* s, const Ahead& pf) {
  const int NC = D / 32;
  const bool odd = (D / 16) % 2 != 0;
  for (int g0 = 0; g0 < n; g0 += 16) {
    __m512 y[RT][4];
    for (int u4 = 0; u4 < 4; ++u4) {
      const int j0 = g0 + 4 * u4;
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) prefetch_row(pf, j0 + u);
      if (j0 >= n) {  // nothing left in this group: the lanes are masked anyway
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) y[i][u4] = _mm512_setzero_ps();
        continue;
      }
      const T* kr[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) kr[u] = k + static_cast<std::size_t>(std::min(j0 + u, n - 1)) * D;
      __m512 acc[4][RT];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) acc[u][i] = _mm512_setzero_ps();
      for (int c = 0; c < NC; ++c) {
        __m512 qa[RT], qb[RT];
#pragma GCC unroll 8
        for (int i = 0; i < RT; ++i) {
          qa[i] = _mm512_loadu_ps(q + static_cast<std::size_t>(i) * D + 32 * c);
          qb[i] = _mm512_loadu_ps(q + static_cast<std::size_t>(i) * D + 32 * c + 16);
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          __m512 ka, kb;
          load2(kr[u] + 32 * c, ka, kb);
#pragma GCC unroll 8
          for (int i = 0; i < RT; ++i) acc[u][i] = _mm512_fmadd_ps(qb[i], kb, _mm512_fmadd_ps(qa[i], ka, acc[u][i]));
        }
      }
      if (odd) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const __m512 ka = load1(kr[u] + 32 * NC);
#pragma GCC unroll 8
          for (int i = 0; i < RT; ++i)
            acc[u][i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + static_cast<std::size_t>(i) * D + 32 * NC), ka, acc[u][i]);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) y[i][u4] = fold4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) _mm512_storeu_ps(s + static_cast<std::size_t>(i) * kBlk + g0, fold16(y[i][0], y[i][1], y[i][2], y[i][3]));
  }
}

// a[i] = a[i] * corr[i] + sum_{j<n} p[i][j] * v[j] for RT rows (a stride D in slot order, p stride
// kBlk), CU 32-element chunks per pass so that even one row has 2 * CU independent FMA chains.
template <class T, int RT, int CU>
LONGATTN_A512 void values_chunks(float* a, int D, const T* v, int n, const float* p, const float* corr, int c0, const Ahead& pf) {
  __m512 acc[CU][2][RT];
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i) {
    const __m512 ci = _mm512_set1_ps(corr[i]);
#pragma GCC unroll 4
    for (int u = 0; u < CU; ++u) {
      acc[u][0][i] = _mm512_mul_ps(ci, _mm512_loadu_ps(a + static_cast<std::size_t>(i) * D + 32 * (c0 + u)));
      acc[u][1][i] = _mm512_mul_ps(ci, _mm512_loadu_ps(a + static_cast<std::size_t>(i) * D + 32 * (c0 + u) + 16));
    }
  }
  for (int j = 0; j < n; ++j) {
    prefetch_row(pf, j);
#pragma GCC unroll 4
    for (int u = 0; u < CU; ++u) {
      __m512 va, vb;
      load2(v + static_cast<std::size_t>(j) * D + 32 * (c0 + u), va, vb);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        const __m512 pj = _mm512_set1_ps(p[static_cast<std::size_t>(i) * kBlk + j]);
        acc[u][0][i] = _mm512_fmadd_ps(pj, va, acc[u][0][i]);
        acc[u][1][i] = _mm512_fmadd_ps(pj, vb, acc[u][1][i]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < CU; ++u) {
      _mm512_storeu_ps(a + static_cast<std::size_t>(i) * D + 32 * (c0 + u), acc[u][0][i]);
      _mm512_storeu_ps(a + static_cast<std::size_t>(i) * D + 32 * (c0 + u) + 16, acc[u][1][i]);
    }
}

template <class T, int RT>
LONGATTN_A512 void values(float* a, int D, const T* v, int n, const float* p, const float* corr, const Ahead& pf) {
  constexpr int CU = RT == 1 ? 4 : (RT <= 4 ? 2 : 1);
  const int NC = D / 32;
  int c = 0;
  const Ahead none;
  for (; c + CU <= NC; c += CU) values_chunks<T, RT, CU>(a, D, v, n, p, corr, c, c == 0 ? pf : none);
  for (; c < NC; ++c) values_chunks<T, RT, 1>(a, D, v, n, p, corr, c, c == 0 ? pf : none);
  if ((D / 16) % 2 != 0) {  // the last 16 elements, natural order
    __m512 acc[RT];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) acc[i] = _mm512_mul_ps(_mm512_set1_ps(corr[i]), _mm512_loadu_ps(a + static_cast<std::size_t>(i) * D + 32 * NC));
    for (int j = 0; j < n; ++j) {
      const __m512 va = load1(v + static_cast<std::size_t>(j) * D + 32 * NC);
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[static_cast<std::size_t>(i) * kBlk + j]), va, acc[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) _mm512_storeu_ps(a + static_cast<std::size_t>(i) * D + 32 * NC, acc[i]);
  }
}

// Row-count dispatch without lambdas (a lambda would not inherit the target attribute).
template <class T>
LONGATTN_A512 void scores_tile(int rows, const float* q, int D, const T* k, int n, float* s, const Ahead& pf) {
  switch (rows) {
    case 1: scores<T, 1>(q, D, k, n, s, pf); break;
    case 2: scores<T, 2>(q, D, k, n, s, pf); break;
    case 3: scores<T, 3>(q, D, k, n, s, pf); break;
    default: scores<T, 4>(q, D, k, n, s, pf); break;
  }
}
// bf16 K with AVX512_BF16: vdpbf16ps multiplies pairs of bf16 and adds both products to an f32
// lane, so K needs no widening. q is split into hi = bf16(q) and lo = bf16(q - hi), two dot
// products per K slice, which keeps the score as exact as with f32 q (hi alone would leave a
// relative error of 2^-9 per element, visible in lse). Not inlined: it needs a wider target than
// its caller. q: per row D/2 words of hi pairs then D/2 of lo pairs.
#define LONGATTN_A512BF __attribute__((target(LONGATTN_DECODE_AVX512_TARGET ",avx512bf16")))
template <int RT>
LONGATTN_A512BF void scores_dp(const float* q, int D, const std::uint16_t* k, int n, float* s, const Ahead& pf) {
  const int NC = D / 32;
  for (int g0 = 0; g0 < n; g0 += 16) {
    __m512 y[RT][4];
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
      __m512 acc[4][RT];
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
      for (int i = 0; i < RT; ++i) y[i][u4] = fold4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) _mm512_storeu_ps(s + static_cast<std::size_t>(i) * kBlk + g0, fold16(y[i][0], y[i][1], y[i][2], y[i][3]));
  }
}
__attribute__((noinline)) LONGATTN_A512BF void scores_dp_tile(int rows, const float* q, int D, const std::uint16_t* k, int n, float* s,
                                                               const Ahead& pf) {
  switch (rows) {
    case 1: scores_dp<1>(q, D, k, n, s, pf); break;
    case 2: scores_dp<2>(q, D, k, n, s, pf); break;
    case 3: scores_dp<3>(q, D, k, n, s, pf); break;
    default: scores_dp<4>(q, D, k, n, s, pf); break;
  }
}
// q row (scaled) as hi pairs then lo pairs for scores_dp.
inline void to_dp(int D, const float* src, float scale, float* dst) {
  auto* w = reinterpret_cast<std::uint16_t*>(dst);
  for (int d = 0; d < D; ++d) {
    const float x = src[d] * scale;
    const std::uint16_t hi = f32_to_bf16(x);
    w[d] = hi;
    w[D + d] = f32_to_bf16(x - bf16_to_f32(hi));
  }
}

template <class T>
LONGATTN_A512 void values_tile(int rows, float* a, int D, const T* v, int n, const float* p, const float* corr, const Ahead& pf) {
  switch (rows) {
    case 1: values<T, 1>(a, D, v, n, p, corr, pf); break;
    case 2: values<T, 2>(a, D, v, n, p, corr, pf); break;
    case 3: values<T, 3>(a, D, v, n, p, corr, pf); break;
    case 4: values<T, 4>(a, D, v, n, p, corr, pf); break;
    case 5: values<T, 5>(a, D, v, n, p, corr, pf); break;
    case 6: values<T, 6>(a, D, v, n, p, corr, pf); break;
    case 7: values<T, 7>(a, D, v, n, p, corr, pf); break;
    default: values<T, 8>(a, D, v, n, p, corr, pf); break;
  }
}

LONGATTN_A512 float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
LONGATTN_A512 float hadd(__m512 v) { return _mm512_reduce_add_ps(v); }

// exp of 16 lanes (the same Cephes-style polynomial as vexp above; relative error ~2 ulp).
LONGATTN_A512 __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-87.3f));
  const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, nf);  // p * 2^n
}

template <class T>
LONGATTN_A512 void run_item(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) {
  const auto& sq = pb.seqs[it.seq];
  const int D = pb.lay.head_dim, G = pb.group, P = pb.lay.page_tokens, Hkv = pb.lay.kv_heads;
  const int RN = it.rn, R = it.hn * it.rn;  // rows per head, rows of the item (head-major)
  constexpr bool kBf16 = std::is_same_v<T, std::uint16_t>;
  float* acc = &parts.acc[it.off * D];
  float* m = &parts.m[it.off];
  float* l = &parts.l[it.off];
  float* s = sc.s.data();       // [R][kBlk]: scores, then probabilities in place
  float* corr = sc.corr.data();  // [R]

  // Scaled query rows in slot order, and how many stored tokens each row may see.
  std::int64_t vis_max = 0;
  for (int hh = 0; hh < it.hn; ++hh)
    for (int r = 0; r < RN; ++r) {
      const int x = hh * RN + r, qi = (it.r0 + r) / G, gh = (it.r0 + r) % G;
      const std::int64_t row = sq.q_begin + qi;
      std::int64_t vis = sq.length;
      if (pb.pos) vis = std::clamp<std::int64_t>(pb.pos[row] - sq.kv_start + 1, 0, sq.length);
      sc.vis[x] = vis;
      vis_max = std::max(vis_max, vis);
      const float* src = pb.q + (static_cast<std::size_t>(row) * pb.lay.q_heads + (it.h0 + hh) * G + gh) * D;
      float* dst = &sc.qs[static_cast<std::size_t>(x) * D];
      if (kBf16 && pb.bf16_dot && D % 32 == 0) {
        to_dp(D, src, pb.scale, dst);
      } else {
        to_slots(kBf16, D, src, pb.scale, dst);
      }
      m[x] = kNegInf;
      l[x] = 0;
    }
  std::fill(acc, acc + static_cast<std::size_t>(R) * D, 0.0f);
  const std::int64_t t_end = std::min(it.t1, vis_max);
  const std::size_t head_elems = static_cast<std::size_t>(P) * D;  // one head's rows in a page

  // The regions of a block in reading order: K rows of each head of the item, then V rows.
  // Region i of the block at t, or past its end the regions of the next block (nothing past t_end).
  const std::size_t row_bytes = static_cast<std::size_t>(D) * sizeof(T);
  auto region = [&](std::int64_t tb, int i) {
    while (i >= 2 * it.hn && tb < t_end) {
      i -= 2 * it.hn;
      tb += std::min<std::int64_t>({kBlk, t_end - tb, P - tb % P});
    }
    Ahead r;
    if (tb >= t_end) return r;
    const int nb = static_cast<int>(std::min<std::int64_t>({kBlk, t_end - tb, P - tb % P}));
    const int h = it.h0 + i % it.hn + (i >= it.hn ? Hkv : 0);  // V heads follow the K heads in a page
    r.p = reinterpret_cast<const char*>(sq.pages[tb / P]) + (static_cast<std::size_t>(h) * P + tb % P) * row_bytes;
    r.rows = nb;
    r.row_bytes = static_cast<int>(row_bytes);
    return r;
  };

  for (std::int64_t t = it.t0; t < t_end;) {
    const int row0 = static_cast<int>(t % P);
    const int n = static_cast<int>(std::min<std::int64_t>({kBlk, t_end - t, P - row0}));
    const T* kbase = reinterpret_cast<const T*>(sq.pages[t / P]) + static_cast<std::size_t>(row0) * D;
    const T* vbase = kbase + static_cast<std::size_t>(Hkv) * head_elems;

    for (int hh = 0; hh < it.hn; ++hh) {
      const T* k = kbase + static_cast<std::size_t>(it.h0 + hh) * head_elems;
      const Ahead pf = region(t, hh + kAheadRegions);
      for (int r0 = 0; r0 < RN; r0 += kScoreRows) {
        const int x = hh * RN + r0;
        if constexpr (kBf16) {
          if (pb.bf16_dot && D % 32 == 0) {
            scores_dp_tile(std::min(kScoreRows, RN - r0), &sc.qs[static_cast<std::size_t>(x) * D], D, k, n,
                           s + static_cast<std::size_t>(x) * kBlk, r0 == 0 ? pf : Ahead{});
            continue;
          }
        }
        scores_tile<T>(std::min(kScoreRows, RN - r0), &sc.qs[static_cast<std::size_t>(x) * D], D, k, n,
                       s + static_cast<std::size_t>(x) * kBlk, r0 == 0 ? pf : Ahead{});
      }
    }

    // Online softmax of the block, per row: mask what the row may not see, new max, the factor
    // for what was accumulated (applied in the V pass), probabilities in place of the scores.
    for (int x = 0; x < R; ++x) {
      float* sx = s + static_cast<std::size_t>(x) * kBlk;
      const int nv = static_cast<int>(std::clamp<std::int64_t>(sc.vis[x] - t, 0, n));
      if (nv == 0) {
        corr[x] = 1.0f;
        for (int j = 0; j < n; j += 16) _mm512_storeu_ps(sx + j, _mm512_setzero_ps());
        continue;
      }
      __m512 bm = _mm512_set1_ps(kNegInf);
      for (int j = 0; j < nv; j += 16) {
        const __mmask16 keep = static_cast<__mmask16>(nv - j >= 16 ? 0xffffu : (1u << (nv - j)) - 1u);
        bm = _mm512_mask_max_ps(bm, keep, bm, _mm512_loadu_ps(sx + j));
      }
      const float m_new = std::max(m[x], hmax(bm));
      corr[x] = m[x] == kNegInf ? 0.0f : std::exp(m[x] - m_new);
      m[x] = m_new;
      __m512 sum = _mm512_setzero_ps();
      const __m512 mv = _mm512_set1_ps(m_new);
      for (int j = 0; j < n; j += 16) {
        const int left = nv - j;
        const __mmask16 keep = static_cast<__mmask16>(left >= 16 ? 0xffffu : (left <= 0 ? 0u : (1u << left) - 1u));
        const __m512 pv = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(_mm512_loadu_ps(sx + j), mv)));
        _mm512_storeu_ps(sx + j, pv);
        sum = _mm512_add_ps(sum, pv);
      }
      l[x] = l[x] * corr[x] + hadd(sum);
    }

    for (int hh = 0; hh < it.hn; ++hh) {
      const T* v = vbase + static_cast<std::size_t>(it.h0 + hh) * head_elems;
      const Ahead pf = region(t, it.hn + hh + kAheadRegions);
      for (int r0 = 0; r0 < RN; r0 += kValueRows) {
        const int x = hh * RN + r0;
        values_tile<T>(std::min(kValueRows, RN - r0), acc + static_cast<std::size_t>(x) * D, D, v, n,
                       s + static_cast<std::size_t>(x) * kBlk, corr + x, r0 == 0 ? pf : Ahead{});
      }
    }
    t += n;
  }
  if (kBf16) {  // back to the natural order of the head dimension
    float* tmp = sc.kf.data();
    for (int x = 0; x < R; ++x) {
      float* ax = acc + static_cast<std::size_t>(x) * D;
      std::memcpy(tmp, ax, static_cast<std::size_t>(D) * sizeof(float));
      from_slots(true, D, tmp, ax);
    }
  }
}

}  // namespace a512

// ---------------------------------------------------------------------------------------------
// The AVX2 path: the AVX-512 path's structure (items of all kv heads of a chunk, pages read front
// to back, L2 prefetch of the region read kAheadRegions later, blocks of kBlk tokens with one
// online-softmax step each, rescale folded into the V pass) with 8-wide vectors. AVX2 has 16
// vector registers instead of 32, which sets the tile sizes: 2 query rows x 4 tokens of score
// accumulators (8) + 2 x 2 q slices + the K slices, and 4 value rows x 2 accumulators (16 elements
// of the head dim per pass over the block's V rows). With that narrow a pass the V rows are read
// in 8 passes (AVX-512: 2), so the first pass also pulls whole rows into L1 (kL1Ahead).
// Kept as twins of the AVX-512 helpers rather than templates over the width so that the AVX-512
// code stays exactly as it was measured. Measured on the 2-core Zen 4 (bf16, 4 x 32k tokens,
// 32/8 heads, d128, both threads) with this file built without AVX-512 in the baseline (so the
// AVX2 code gets 16 registers and VEX encodings, as on an AVX2-only host): ~19 GB/s against ~22
// for the AVX-512 path in the same run, ~10 for the generic template at width 8 it replaces;
// 8 tokens of L1 look-ahead gave ~11.4 GB/s on one thread against ~10.4 without (4 and 16: no
// better), 3 regions of L2 look-ahead instead of 2 made no difference.
// ---------------------------------------------------------------------------------------------
#define LONGATTN_A256 __attribute__((target("avx2,fma,f16c"), always_inline)) inline

namespace a256 {

constexpr int kBlk = a512::kBlk;  // same block (and scratch size) as the AVX-512 path
constexpr int kScoreRows = 2;
constexpr int kValueRows = 4;
constexpr int kL1Ahead = 8;  // V rows of L1 look-ahead in the first value pass (see above)
constexpr int kAheadRegions = a512::kAheadRegions;
// Rows to prefetch while a kernel streams others (as a512::Ahead; a type of its own so that calls
// with it do not also find the AVX-512 overloads by argument-dependent lookup).
struct Ahead {
  const char* p = nullptr;
  int rows = 0;
  int row_bytes = 0;
};

// load2: 16 consecutive elements as two f32 vectors; for bf16 the even and the odd elements (one
// load, a shift and a mask), so q rows and accumulators are kept in that order per 16-element
// chunk (to_slots / from_slots); f16 through vcvtph2ps (exact); f32 two plain loads.
LONGATTN_A256 void load2(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}
LONGATTN_A256 void load2(const std::uint16_t* p, __m256& a, __m256& b) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
LONGATTN_A256 void load2(const std::int16_t* p, __m256& a, __m256& b) {
  a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}
// load1: 8 consecutive elements in natural order (the last slice when D is an odd multiple of 8).
LONGATTN_A256 __m256 load1(const float* p) { return _mm256_loadu_ps(p); }
LONGATTN_A256 __m256 load1(const std::uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
LONGATTN_A256 __m256 load1(const std::int16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// As a512::prefetch_row (which could not be inlined here: it carries the AVX-512 target).
LONGATTN_A256 void prefetch_row(const Ahead& pf, int j) {
  if (j >= pf.rows) return;
  const char* r = pf.p + static_cast<std::size_t>(j) * static_cast<std::size_t>(pf.row_bytes);
  for (int o = 0; o < pf.row_bytes; o += 64) _mm_prefetch(r + o, _MM_HINT_T1);
}

// Slot order of load2 for bf16: per 16-element chunk the 8 even elements then the 8 odd ones (a
// trailing 8-element slice in natural order); natural order for f32 and f16.
LONGATTN_A256 void to_slots(bool bf16, int D, const float* src, float scale, float* dst) {
  const int paired = bf16 ? D / 16 * 16 : 0;
  for (int c = 0; c < paired; c += 16)
    for (int w = 0; w < 8; ++w) {
      dst[c + w] = src[c + 2 * w] * scale;
      dst[c + 8 + w] = src[c + 2 * w + 1] * scale;
    }
  for (int d = paired; d < D; ++d) dst[d] = src[d] * scale;
}
LONGATTN_A256 void from_slots(bool bf16, int D, const float* src, float* dst) {
  const int paired = bf16 ? D / 16 * 16 : 0;
  for (int c = 0; c < paired; c += 16)
    for (int w = 0; w < 8; ++w) {
      dst[c + 2 * w] = src[c + w];
      dst[c + 2 * w + 1] = src[c + 8 + w];
    }
  for (int d = paired; d < D; ++d) dst[d] = src[d];
}

// Four vectors of partial dot products (tokens 0..3) -> each 128-bit lane holds the 4 tokens' sums
// over that lane's partials (in-lane shuffles only, as a512::fold4).
LONGATTN_A256 __m256 fold4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 x01 = _mm256_add_ps(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));  // a0 a1 a0 a1
  const __m256 x23 = _mm256_add_ps(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));  // a2 a3 a2 a3
  return _mm256_add_ps(_mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
}
// Two fold4 results (tokens 0..3, 4..7) -> the 8 token sums in natural order.
LONGATTN_A256 __m256 fold8(__m256 y0, __m256 y1) {
  return _mm256_add_ps(_mm256_permute2f128_ps(y0, y1, 0x20), _mm256_permute2f128_ps(y0, y1, 0x31));
}

// s[i][j] = q[i] . k[j] for RT rows (q stride D, slot order; s stride kBlk), tokens j < n in
// groups of 8 (lanes past n hold a copy of the last token's score; the softmax masks them).
template <class T, int RT>
LONGATTN_A256 void scores(const float* q, int D, const T* k, int n, float* s, const Ahead& pf) {
  const int NC = D / 16;
  const bool odd = (D / 8) % 2 != 0;
  for (int g0 = 0; g0 < n; g0 += 8) {
    __m256 y[RT][2];
    for (int u4 = 0; u4 < 2; ++u4) {
      const int j0 = g0 + 4 * u4;
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) prefetch_row(pf, j0 + u);
      if (j0 >= n) {
#pragma GCC unroll 4
        for (int i = 0; i < RT; ++i) y[i][u4] = _mm256_setzero_ps();
        continue;
      }
      const T* kr[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) kr[u] = k + static_cast<std::size_t>(std::min(j0 + u, n - 1)) * D;
      __m256 acc[4][RT];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
#pragma GCC unroll 4
        for (int i = 0; i < RT; ++i) acc[u][i] = _mm256_setzero_ps();
      for (int c = 0; c < NC; ++c) {
        __m256 qa[RT], qb[RT];
#pragma GCC unroll 4
        for (int i = 0; i < RT; ++i) {
          qa[i] = _mm256_loadu_ps(q + static_cast<std::size_t>(i) * D + 16 * c);
          qb[i] = _mm256_loadu_ps(q + static_cast<std::size_t>(i) * D + 16 * c + 8);
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          __m256 ka, kb;
          load2(kr[u] + 16 * c, ka, kb);
#pragma GCC unroll 4
          for (int i = 0; i < RT; ++i) acc[u][i] = _mm256_fmadd_ps(qb[i], kb, _mm256_fmadd_ps(qa[i], ka, acc[u][i]));
        }
      }
      if (odd) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const __m256 ka = load1(kr[u] + 16 * NC);
#pragma GCC unroll 4
          for (int i = 0; i < RT; ++i)
            acc[u][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + static_cast<std::size_t>(i) * D + 16 * NC), ka, acc[u][i]);
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < RT; ++i) y[i][u4] = fold4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < RT; ++i) _mm256_storeu_ps(s + static_cast<std::size_t>(i) * kBlk + g0, fold8(y[i][0], y[i][1]));
  }
}

// a[i] = a[i] * corr[i] + sum_{j<n} p[i][j] * v[j] for RT rows (a stride D in slot order, p stride
// kBlk), CU 16-element chunks per pass so that even one row has 2 * CU independent FMA chains.
template <class T, int RT, int CU>
LONGATTN_A256 void values_chunks(float* a, int D, const T* v, int n, const float* p, const float* corr, int c0, const Ahead& pf) {
  __m256 acc[CU][2][RT];
#pragma GCC unroll 4
  for (int i = 0; i < RT; ++i) {
    const __m256 ci = _mm256_set1_ps(corr[i]);
#pragma GCC unroll 4
    for (int u = 0; u < CU; ++u) {
      acc[u][0][i] = _mm256_mul_ps(ci, _mm256_loadu_ps(a + static_cast<std::size_t>(i) * D + 16 * (c0 + u)));
      acc[u][1][i] = _mm256_mul_ps(ci, _mm256_loadu_ps(a + static_cast<std::size_t>(i) * D + 16 * (c0 + u) + 8));
    }
  }
  for (int j = 0; j < n; ++j) {
    prefetch_row(pf, j);
    // The first pass also pulls the whole row a few tokens ahead into L1: the later passes read
    // the other 16-element chunks of the same rows, which then need not come from L2 again.
    if (c0 == 0 && j + kL1Ahead < n) {
      const char* r = reinterpret_cast<const char*>(v + static_cast<std::size_t>(j + kL1Ahead) * D);
      for (int o = 0; o < D * static_cast<int>(sizeof(T)); o += 64) _mm_prefetch(r + o, _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int u = 0; u < CU; ++u) {
      __m256 va, vb;
      load2(v + static_cast<std::size_t>(j) * D + 16 * (c0 + u), va, vb);
#pragma GCC unroll 4
      for (int i = 0; i < RT; ++i) {
        const __m256 pj = _mm256_broadcast_ss(p + static_cast<std::size_t>(i) * kBlk + j);
        acc[u][0][i] = _mm256_fmadd_ps(pj, va, acc[u][0][i]);
        acc[u][1][i] = _mm256_fmadd_ps(pj, vb, acc[u][1][i]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < CU; ++u) {
      _mm256_storeu_ps(a + static_cast<std::size_t>(i) * D + 16 * (c0 + u), acc[u][0][i]);
      _mm256_storeu_ps(a + static_cast<std::size_t>(i) * D + 16 * (c0 + u) + 8, acc[u][1][i]);
    }
}

template <class T, int RT>
LONGATTN_A256 void values(float* a, int D, const T* v, int n, const float* p, const float* corr, const Ahead& pf) {
  constexpr int CU = RT == 1 ? 4 : (RT == 2 ? 2 : 1);  // 2 * CU * RT <= 8 accumulators
  const int NC = D / 16;
  int c = 0;
  const Ahead none;
  for (; c + CU <= NC; c += CU) values_chunks<T, RT, CU>(a, D, v, n, p, corr, c, c == 0 ? pf : none);
  for (; c < NC; ++c) values_chunks<T, RT, 1>(a, D, v, n, p, corr, c, c == 0 ? pf : none);
  if ((D / 8) % 2 != 0) {  // the last 8 elements, natural order
    __m256 acc[RT];
#pragma GCC unroll 4
    for (int i = 0; i < RT; ++i)
      acc[i] = _mm256_mul_ps(_mm256_set1_ps(corr[i]), _mm256_loadu_ps(a + static_cast<std::size_t>(i) * D + 16 * NC));
    for (int j = 0; j < n; ++j) {
      const __m256 va = load1(v + static_cast<std::size_t>(j) * D + 16 * NC);
#pragma GCC unroll 4
      for (int i = 0; i < RT; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + static_cast<std::size_t>(i) * kBlk + j), va, acc[i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < RT; ++i) _mm256_storeu_ps(a + static_cast<std::size_t>(i) * D + 16 * NC, acc[i]);
  }
}

// Row-count dispatch without lambdas (a lambda would not inherit the target attribute).
template <class T>
LONGATTN_A256 void scores_tile(int rows, const float* q, int D, const T* k, int n, float* s, const Ahead& pf) {
  if (rows == 1) {
    scores<T, 1>(q, D, k, n, s, pf);
  } else {
    scores<T, 2>(q, D, k, n, s, pf);
  }
}
template <class T>
LONGATTN_A256 void values_tile(int rows, float* a, int D, const T* v, int n, const float* p, const float* corr, const Ahead& pf) {
  switch (rows) {
    case 1: values<T, 1>(a, D, v, n, p, corr, pf); break;
    case 2: values<T, 2>(a, D, v, n, p, corr, pf); break;
    case 3: values<T, 3>(a, D, v, n, p, corr, pf); break;
    default: values<T, 4>(a, D, v, n, p, corr, pf); break;
  }
}

LONGATTN_A256 float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
LONGATTN_A256 float hadd(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// exp of 8 lanes (the polynomial of vexp / a512::exp16). The scale 2^n is built in the exponent
// bits (AVX2 has no vscalefps); the upper clamp keeps n <= 127 so it stays finite.
LONGATTN_A256 __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
  const __m256 nf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lanes j < left all ones, the others zero.
LONGATTN_A256 __m256 lanes_below(int left) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

template <class T>
LONGATTN_A256 void run_item(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) {
  const auto& sq = pb.seqs[it.seq];
  const int D = pb.lay.head_dim, G = pb.group, P = pb.lay.page_tokens, Hkv = pb.lay.kv_heads;
  const int RN = it.rn, R = it.hn * it.rn;  // rows per head, rows of the item (head-major)
  constexpr bool kBf16 = std::is_same_v<T, std::uint16_t>;
  float* acc = &parts.acc[it.off * D];
  float* m = &parts.m[it.off];
  float* l = &parts.l[it.off];
  float* s = sc.s.data();        // [R][kBlk]: scores, then probabilities in place
  float* corr = sc.corr.data();  // [R]

  // Scaled query rows in slot order, and how many stored tokens each row may see.
  std::int64_t vis_max = 0;
  for (int hh = 0; hh < it.hn; ++hh)
    for (int r = 0; r < RN; ++r) {
      const int x = hh * RN + r, qi = (it.r0 + r) / G, gh = (it.r0 + r) % G;
      const std::int64_t row = sq.q_begin + qi;
      std::int64_t vis = sq.length;
      if (pb.pos) vis = std::clamp<std::int64_t>(pb.pos[row] - sq.kv_start + 1, 0, sq.length);
      sc.vis[x] = vis;
      vis_max = std::max(vis_max, vis);
      const float* src = pb.q + (static_cast<std::size_t>(row) * pb.lay.q_heads + (it.h0 + hh) * G + gh) * D;
      to_slots(kBf16, D, src, pb.scale, &sc.qs[static_cast<std::size_t>(x) * D]);
      m[x] = kNegInf;
      l[x] = 0;
    }
  std::fill(acc, acc + static_cast<std::size_t>(R) * D, 0.0f);
  const std::int64_t t_end = std::min(it.t1, vis_max);
  const std::size_t head_elems = static_cast<std::size_t>(P) * D;  // one head's rows in a page

  // The regions of a block in reading order (K rows of each head, then V rows), as in a512::run_item.
  const std::size_t row_bytes = static_cast<std::size_t>(D) * sizeof(T);
  auto region = [&](std::int64_t tb, int i) {
    while (i >= 2 * it.hn && tb < t_end) {
      i -= 2 * it.hn;
      tb += std::min<std::int64_t>({kBlk, t_end - tb, P - tb % P});
    }
    Ahead r;
    if (tb >= t_end) return r;
    const int nb = static_cast<int>(std::min<std::int64_t>({kBlk, t_end - tb, P - tb % P}));
    const int h = it.h0 + i % it.hn + (i >= it.hn ? Hkv : 0);  // V heads follow the K heads in a page
    r.p = reinterpret_cast<const char*>(sq.pages[tb / P]) + (static_cast<std::size_t>(h) * P + tb % P) * row_bytes;
    r.rows = nb;
    r.row_bytes = static_cast<int>(row_bytes);
    return r;
  };

  for (std::int64_t t = it.t0; t < t_end;) {
    const int row0 = static_cast<int>(t % P);
    const int n = static_cast<int>(std::min<std::int64_t>({kBlk, t_end - t, P - row0}));
    const T* kbase = reinterpret_cast<const T*>(sq.pages[t / P]) + static_cast<std::size_t>(row0) * D;
    const T* vbase = kbase + static_cast<std::size_t>(Hkv) * head_elems;

    for (int hh = 0; hh < it.hn; ++hh) {
      const T* k = kbase + static_cast<std::size_t>(it.h0 + hh) * head_elems;
      const Ahead pf = region(t, hh + kAheadRegions);
      for (int r0 = 0; r0 < RN; r0 += kScoreRows) {
        const int x = hh * RN + r0;
        scores_tile<T>(std::min(kScoreRows, RN - r0), &sc.qs[static_cast<std::size_t>(x) * D], D, k, n,
                       s + static_cast<std::size_t>(x) * kBlk, r0 == 0 ? pf : Ahead{});
      }
    }

    // Online softmax of the block, per row: mask what the row may not see, new max, the factor
    // for what was accumulated (applied in the V pass), probabilities in place of the scores.
    for (int x = 0; x < R; ++x) {
      float* sx = s + static_cast<std::size_t>(x) * kBlk;
      const int nv = static_cast<int>(std::clamp<std::int64_t>(sc.vis[x] - t, 0, n));
      if (nv == 0) {
        corr[x] = 1.0f;
        for (int j = 0; j < n; j += 8) _mm256_storeu_ps(sx + j, _mm256_setzero_ps());
        continue;
      }
      const __m256 ninf = _mm256_set1_ps(kNegInf);
      __m256 bm = ninf;
      for (int j = 0; j < nv; j += 8)
        bm = _mm256_max_ps(bm, _mm256_blendv_ps(ninf, _mm256_loadu_ps(sx + j), lanes_below(nv - j)));
      const float m_new = std::max(m[x], hmax(bm));
      corr[x] = m[x] == kNegInf ? 0.0f : std::exp(m[x] - m_new);
      m[x] = m_new;
      __m256 sum = _mm256_setzero_ps();
      const __m256 mv = _mm256_set1_ps(m_new);
      for (int j = 0; j < n; j += 8) {
        const __m256 pv = _mm256_and_ps(lanes_below(nv - j), exp8(_mm256_sub_ps(_mm256_loadu_ps(sx + j), mv)));
        _mm256_storeu_ps(sx + j, pv);
        sum = _mm256_add_ps(sum, pv);
      }
      l[x] = l[x] * corr[x] + hadd(sum);
    }

    for (int hh = 0; hh < it.hn; ++hh) {
      const T* v = vbase + static_cast<std::size_t>(it.h0 + hh) * head_elems;
      const Ahead pf = region(t, it.hn + hh + kAheadRegions);
      for (int r0 = 0; r0 < RN; r0 += kValueRows) {
        const int x = hh * RN + r0;
        values_tile<T>(std::min(kValueRows, RN - r0), acc + static_cast<std::size_t>(x) * D, D, v, n,
                       s + static_cast<std::size_t>(x) * kBlk, corr + x, r0 == 0 ? pf : Ahead{});
      }
    }
    t += n;
  }
  if (kBf16) {  // back to the natural order of the head dimension
    float* tmp = sc.kf.data();
    for (int x = 0; x < R; ++x) {
      float* ax = acc + static_cast<std::size_t>(x) * D;
      std::memcpy(tmp, ax, static_cast<std::size_t>(D) * sizeof(float));
      from_slots(true, D, tmp, ax);
    }
  }
}

}  // namespace a256

// One item per call: the target attribute must sit on the function that holds the inlined body
// (OpenMP outlines parallel regions into functions of their own, which need not inherit it).
using ItemFn = void (*)(const Problem&, const Item&, Scratch&, Partials&);
__attribute__((target(LONGATTN_DECODE_AVX512_TARGET))) void item_avx512(const Problem& pb, const Item& it,
                                                                                      Scratch& sc, Partials& parts) {
  switch (pb.lay.kv_dtype) {
    case DType::f32: a512::run_item<float>(pb, it, sc, parts); break;
    case DType::bf16: a512::run_item<std::uint16_t>(pb, it, sc, parts); break;
    case DType::f16: a512::run_item<std::int16_t>(pb, it, sc, parts); break;  // f16 bits
  }
}
__attribute__((target("avx2,fma,f16c"))) void item_avx2(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) {
  switch (pb.lay.kv_dtype) {
    case DType::f32: a256::run_item<float>(pb, it, sc, parts); break;
    case DType::bf16: a256::run_item<std::uint16_t>(pb, it, sc, parts); break;
    case DType::f16: a256::run_item<std::int16_t>(pb, it, sc, parts); break;  // f16 bits
  }
}
void item_sse(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) { run_typed<4>(pb, it, sc, parts); }
void item_scalar(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) { run_typed<1>(pb, it, sc, parts); }

void validate(const DecodeArgs& a) {
  const auto& L = a.layout;
  LONGATTN_INVALID(L.kv_heads > 0 && L.q_heads > 0 && L.q_heads % L.kv_heads == 0,
                   "decode: q_heads ({}) must be a positive multiple of kv_heads ({})", L.q_heads, L.kv_heads);
  LONGATTN_INVALID(L.head_dim > 0 && L.head_dim <= kDecodeMaxHeadDim, "decode: head_dim {} outside [1, {}]", L.head_dim,
                   kDecodeMaxHeadDim);
  LONGATTN_INVALID(L.page_tokens > 0 && L.page_tokens % BT == 0, "decode: page_tokens {} must be a positive multiple of {}",
                   L.page_tokens, BT);
  LONGATTN_INVALID(a.num_seqs >= 0 && (a.num_seqs == 0 || a.seqs), "decode: no sequences given");
  LONGATTN_INVALID(a.total_q >= 0 && (a.total_q == 0 || (a.q && a.o && a.lse)), "decode: q, o and lse are required");
  LONGATTN_INVALID(a.chunk_tokens >= 0 && a.chunk_tokens % BT == 0, "decode: chunk_tokens {} must be a multiple of {}",
                   a.chunk_tokens, BT);
  std::int64_t next = 0;
  for (int b = 0; b < a.num_seqs; ++b) {
    const auto& s = a.seqs[b];
    LONGATTN_INVALID(s.length >= 0 && s.q_count >= 0 && s.q_begin == next, "decode: sequence {} has bad length/query rows", b);
    LONGATTN_INVALID(s.length == 0 || s.pages, "decode: sequence {} has {} tokens but no pages", b, s.length);
    next += s.q_count;
  }
  LONGATTN_INVALID(next == a.total_q, "decode: the sequences' query rows add up to {}, not total_q {}", next, a.total_q);
}

}  // namespace

const char* to_string(DecodeIsa isa) noexcept {
  switch (isa) {
    case DecodeIsa::generic: return "generic";
    case DecodeIsa::avx2: return "avx2";
    case DecodeIsa::avx512: return "avx512";
    case DecodeIsa::avx512_bf16: return "avx512_bf16";
  }
  return "?";
}

DecodeIsa best_decode_isa() noexcept {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? DecodeIsa::avx512_bf16 : DecodeIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return DecodeIsa::avx2;
  return DecodeIsa::generic;
}

std::size_t decode_kv_bytes(const DecodeArgs& a) noexcept {
  std::size_t tokens = 0;
  for (int b = 0; b < a.num_seqs; ++b) {
    if (a.seqs[b].q_count > 0) tokens += static_cast<std::size_t>(a.seqs[b].length);
  }
  return tokens * 2 * a.layout.kv_heads * a.layout.head_dim * dtype_size(a.layout.kv_dtype);
}

// LONGATTN_DECODE_ISA caps the instruction set (to compare paths on one machine); read once.
DecodeIsa configured_decode_isa() {
  static const DecodeIsa isa = [] {
    const std::string want = env_string("LONGATTN_DECODE_ISA");
    if (want.empty() || want == "auto") return best_decode_isa();
    for (DecodeIsa c : {DecodeIsa::generic, DecodeIsa::avx2, DecodeIsa::avx512, DecodeIsa::avx512_bf16})
      if (want == to_string(c)) return std::min(c, best_decode_isa());
    throw Error(ErrorCode::invalid_argument,
                fmt::format("LONGATTN_DECODE_ISA={} is not one of auto, generic, avx2, avx512, avx512_bf16", want));
  }();
  return isa;
}

void cpu_decode(const DecodeArgs& a) { cpu_decode(a, configured_decode_isa()); }

void cpu_decode(const DecodeArgs& a, DecodeIsa isa) {
  validate(a);
  if (isa > best_decode_isa()) isa = best_decode_isa();
  const auto& L = a.layout;
  const int D = L.head_dim, G = L.q_heads / L.kv_heads;
  const int threads = a.threads > 0 ? a.threads : omp_get_max_threads();

  Problem pb{L, G, a.scale > 0 ? a.scale : 1.0f / std::sqrt(static_cast<float>(D)), a.seqs, a.q, a.q_positions, a.total_q};
  pb.bf16_dot = isa == DecodeIsa::avx512_bf16;

  // Heads per item: every kv head of the sequence where their groups' rows fit kItemRows, so an
  // item streams its pages front to back (see the AVX-512 path); otherwise one head per item and
  // its group cut into blocks of kItemRows rows.
  auto heads_per_item = [&](int R) { return R > kItemRows ? 1 : std::min(L.kv_heads, kItemRows / R); };
  // Chunk size: enough items to keep every thread busy (x8 for dynamic balance on a shared machine),
  // but chunks long enough (>= 256 tokens) that the per-item setup and the merge stay small next
  // to the streaming; a multiple of the page where that is larger, so items start on a page.
  std::int64_t total = 0;
  for (int b = 0; b < a.num_seqs; ++b)
    if (a.seqs[b].q_count > 0) total += a.seqs[b].length * L.kv_heads / heads_per_item(a.seqs[b].q_count * G);
  std::int64_t chunk = a.chunk_tokens;
  if (chunk == 0) {
    chunk = std::max<std::int64_t>(256, (total / std::max(1, 8 * threads) + BT - 1) / BT * BT);
    if (chunk >= L.page_tokens) chunk = (chunk + L.page_tokens - 1) / L.page_tokens * L.page_tokens;
  }

  std::vector<Item> items;
  std::vector<Group> groups;
  std::size_t rows = 0;
  for (int b = 0; b < a.num_seqs; ++b) {
    const std::int64_t len = a.seqs[b].length;
    const int R = a.seqs[b].q_count * G;
    if (R == 0) continue;
    const int hb = heads_per_item(R);
    for (int h0 = 0; h0 < L.kv_heads; h0 += hb) {
      const int hn = std::min(hb, L.kv_heads - h0);
      for (int r0 = 0; r0 < R; r0 += kItemRows) {
        const int rn = std::min(kItemRows, R - r0);
        const std::size_t first = items.size();
        for (std::int64_t t0 = 0; t0 < std::max<std::int64_t>(len, 1); t0 += chunk) {  // one empty item if len == 0
          items.push_back({b, h0, hn, r0, rn, t0, std::min(len, t0 + chunk), rows});
          rows += static_cast<std::size_t>(hn) * static_cast<std::size_t>(rn);
        }
        for (int h = h0; h < h0 + hn; ++h) groups.push_back({b, h, r0, rn, first, items.size()});
      }
    }
  }

  Partials parts;
  parts.acc.resize(rows * D);
  parts.m.resize(rows);
  parts.l.resize(rows);

  ItemFn fn = item_scalar;
  if (isa >= DecodeIsa::avx512 && D % 16 == 0) {
    fn = item_avx512;
  } else if (isa >= DecodeIsa::avx2 && D % 8 == 0) {
    fn = item_avx2;
  } else if (D % 4 == 0) {
    fn = item_sse;
  }
  if (!items.empty()) {
#pragma omp parallel num_threads(threads)
    {
      Scratch sc;
      sc.qs.resize(static_cast<std::size_t>(kItemRows) * D);
      sc.p.resize(static_cast<std::size_t>(kItemRows) * BT);
      sc.kf.resize(static_cast<std::size_t>(BT) * D);
      sc.s.resize(static_cast<std::size_t>(kItemRows) * std::max(BT, a512::kBlk));
      sc.corr.resize(kItemRows);
      sc.vis.resize(kItemRows);
#pragma omp for schedule(dynamic, 1)
      for (std::size_t i = 0; i < items.size(); ++i) fn(pb, items[i], sc, parts);
    }
  }

  // LSE merge of the chunk partials of each group of rows into o and lse.
  const std::int64_t ngroups = static_cast<std::int64_t>(groups.size());
#pragma omp parallel for num_threads(threads) schedule(static)
  for (std::int64_t gi = 0; gi < ngroups; ++gi) {
    const Group& g = groups[static_cast<std::size_t>(gi)];
    const auto& sq = a.seqs[g.seq];
    // Partial row of row r of this group in item i (items are head-major inside).
    auto prow = [&](std::size_t i, int r) {
      return items[i].off + static_cast<std::size_t>(g.head - items[i].h0) * static_cast<std::size_t>(items[i].rn) +
             static_cast<std::size_t>(r);
    };
    for (int r = 0; r < g.rn; ++r) {
      const int qi = (g.r0 + r) / G, gh = (g.r0 + r) % G;
      const std::int64_t row = sq.q_begin + qi;
      const int head = g.head * G + gh;
      float M = kNegInf;
      for (std::size_t i = g.first; i < g.last; ++i) M = std::max(M, parts.m[prow(i, r)]);
      float* out = a.o + (static_cast<std::size_t>(row) * L.q_heads + head) * D;
      float& lse = a.lse[static_cast<std::size_t>(head) * a.total_q + row];
      std::fill(out, out + D, 0.0f);
      if (M == kNegInf) {
        lse = kNegInf;
        continue;
      }
      float Lsum = 0;
      for (std::size_t i = g.first; i < g.last; ++i) {
        const float mi = parts.m[prow(i, r)];
        if (mi != kNegInf) Lsum += parts.l[prow(i, r)] * std::exp(mi - M);
      }
      for (std::size_t i = g.first; i < g.last; ++i) {
        const float mi = parts.m[prow(i, r)];
        if (mi == kNegInf) continue;
        const float w = std::exp(mi - M) / Lsum;
        const float* acc = &parts.acc[prow(i, r) * D];
        for (int d = 0; d < D; ++d) out[d] += w * acc[d];
      }
      lse = M + std::log(Lsum);
    }
  }
}

}  // namespace longattn::kernels
