// The CPU decode kernel (see cpu_decode.hpp). One work item = (sequence, kv head, chunk of KV
// tokens); it streams the chunk's K and V rows once for all query rows of the GQA group, with an
// online softmax in f32, and leaves an unnormalized partial (acc, max, sum) that the merge step
// joins across chunks. The body is one template over the vector width, written with GCC/Clang
// vector extensions; three wrappers compile it for AVX-512, AVX2 and plain SSE2 through target
// attributes, and the best one the CPU supports is picked at run time, so one binary runs on hosts
// with and without AVX-512.
#include "kernels/cpu_decode.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/check.hpp"
#include "longattn/dtype_convert.hpp"

// The vector types never cross a call boundary (everything below is inlined into the wrappers that
// carry the target attribute), so the ABI note about passing them is moot.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace longattn::kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int BT = kDecodeBlockTokens;
// How far ahead to prefetch: 4 blocks of 16 tokens = 16 KiB of K+V at head_dim 128 bf16, about
// the bytes in flight one core needs to cover DRAM latency (~100 ns x ~10 GB/s x 2 for safety).
constexpr int kPrefetchBlocks = 4;
// Query rows per register tile: 8 accumulators + a K/V slice + temporaries fit AVX2's 16 registers.
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
};

// Query rows per item at most: bounds the per-thread scratch and the partials whatever a request
// asks for (a GQA group of many heads times several query tokens is cut into blocks of rows).
constexpr int kItemRows = 64;

struct Item {
  int seq, head;
  int r0, rn;           // rows [r0, r0 + rn) of the (sequence, kv head) group; row r = qi * G + gh
  std::int64_t t0, t1;  // stored tokens [t0, t1)
  std::size_t off;      // first row of its partials
};

// The items that cover the same rows (one per KV chunk), merged together at the end.
struct Group {
  int seq, head, r0, rn;
  std::size_t first, last;  // items [first, last)
};

// Per-thread scratch, sized for kItemRows rows.
struct Scratch {
  std::vector<float> qs, s, p, kf;
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
[[gnu::always_inline]] inline void run_item(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) {
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
[[gnu::always_inline]] inline void run_typed(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) {
  switch (pb.lay.kv_dtype) {
    case DType::f32: run_item<W, float>(pb, it, sc, parts); break;
    case DType::bf16: run_item<W, std::uint16_t>(pb, it, sc, parts); break;
    case DType::f16: run_item<W, std::int16_t>(pb, it, sc, parts); break;  // f16 bits
  }
}

// One item per call: the target attribute must sit on the function that holds the inlined body
// (OpenMP outlines parallel regions into functions of their own, which need not inherit it).
using ItemFn = void (*)(const Problem&, const Item&, Scratch&, Partials&);
#if defined(__clang__)
#define LONGATTN_DECODE_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"
#else  // GCC tunes for 256-bit vectors on these CPUs unless told; the explicit 512-bit code wants 512
#define LONGATTN_DECODE_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"
#endif
__attribute__((target(LONGATTN_DECODE_AVX512_TARGET))) void item_avx512(const Problem& pb, const Item& it,
                                                                                      Scratch& sc, Partials& parts) {
  run_typed<16>(pb, it, sc, parts);
}
__attribute__((target("avx2,fma,f16c"))) void item_avx2(const Problem& pb, const Item& it, Scratch& sc, Partials& parts) {
  run_typed<8>(pb, it, sc, parts);
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
  }
  return "?";
}

DecodeIsa best_decode_isa() noexcept {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return DecodeIsa::avx512;
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

void cpu_decode(const DecodeArgs& a) { cpu_decode(a, best_decode_isa()); }

void cpu_decode(const DecodeArgs& a, DecodeIsa isa) {
  validate(a);
  if (isa > best_decode_isa()) isa = best_decode_isa();
  const auto& L = a.layout;
  const int D = L.head_dim, G = L.q_heads / L.kv_heads;
  const int threads = a.threads > 0 ? a.threads : omp_get_max_threads();

  Problem pb{L, G, a.scale > 0 ? a.scale : 1.0f / std::sqrt(static_cast<float>(D)), a.seqs, a.q, a.q_positions, a.total_q};

  // Chunk size: enough items to keep every thread busy (x4 for dynamic balance), but chunks long
  // enough (>= 256 tokens) that the per-item setup and the merge stay small next to the streaming.
  std::int64_t total = 0;
  for (int b = 0; b < a.num_seqs; ++b)
    if (a.seqs[b].q_count > 0) total += a.seqs[b].length * L.kv_heads;
  std::int64_t chunk = a.chunk_tokens;
  if (chunk == 0) {
    chunk = std::max<std::int64_t>(256, (total / std::max(1, 4 * threads) + BT - 1) / BT * BT);
  }

  std::vector<Item> items;
  std::vector<Group> groups;
  std::size_t rows = 0;
  for (int b = 0; b < a.num_seqs; ++b) {
    const std::int64_t len = a.seqs[b].length;
    const int R = a.seqs[b].q_count * G;
    for (int h = 0; h < L.kv_heads; ++h) {
      for (int r0 = 0; r0 < R; r0 += kItemRows) {
        const int rn = std::min(kItemRows, R - r0);
        Group g{b, h, r0, rn, items.size(), 0};
        if (len == 0) {
          items.push_back({b, h, r0, rn, 0, 0, rows});
          rows += static_cast<std::size_t>(rn);
        }
        for (std::int64_t t0 = 0; t0 < len; t0 += chunk) {
          items.push_back({b, h, r0, rn, t0, std::min(len, t0 + chunk), rows});
          rows += static_cast<std::size_t>(rn);
        }
        g.last = items.size();
        groups.push_back(g);
      }
    }
  }

  Partials parts;
  parts.acc.resize(rows * D);
  parts.m.resize(rows);
  parts.l.resize(rows);

  ItemFn fn = item_scalar;
  if (isa == DecodeIsa::avx512 && D % 16 == 0) {
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
      sc.s.resize(static_cast<std::size_t>(kItemRows) * BT);
      sc.p.resize(static_cast<std::size_t>(kItemRows) * BT);
      sc.kf.resize(static_cast<std::size_t>(BT) * D);
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
    for (int r = 0; r < g.rn; ++r) {
      const int qi = (g.r0 + r) / G, gh = (g.r0 + r) % G;
      const std::int64_t row = sq.q_begin + qi;
      const int head = g.head * G + gh;
      float M = kNegInf;
      for (std::size_t i = g.first; i < g.last; ++i) M = std::max(M, parts.m[items[i].off + r]);
      float* out = a.o + (static_cast<std::size_t>(row) * L.q_heads + head) * D;
      float& lse = a.lse[static_cast<std::size_t>(head) * a.total_q + row];
      std::fill(out, out + D, 0.0f);
      if (M == kNegInf) {
        lse = kNegInf;
        continue;
      }
      float Lsum = 0;
      for (std::size_t i = g.first; i < g.last; ++i) {
        const float mi = parts.m[items[i].off + r];
        if (mi != kNegInf) Lsum += parts.l[items[i].off + r] * std::exp(mi - M);
      }
      for (std::size_t i = g.first; i < g.last; ++i) {
        const float mi = parts.m[items[i].off + r];
        if (mi == kNegInf) continue;
        const float w = std::exp(mi - M) / Lsum;
        const float* acc = &parts.acc[(items[i].off + r) * D];
        for (int d = 0; d < D; ++d) out[d] += w * acc[d];
      }
      lse = M + std::log(Lsum);
    }
  }
}

}  // namespace longattn::kernels
