// Internal to the CPU decode kernel (cpu_decode*.cpp): the facts of one call, its work items and
// per-thread scratch, shared by the driver (cpu_decode.cpp) and the instruction-set paths, each in
// a file of its own: cpu_decode_avx512.cpp and cpu_decode_avx2.cpp (one width-generic body,
// cpu_decode_simd.inc, built twice under different target options) and cpu_decode_portable.cpp
// (GCC/Clang vector extensions, for SSE and scalar code and for head dims the others do not take).
#pragma once

#include <xmmintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/cpu_decode.hpp"

namespace longattn::kernels::decode_detail {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query rows per item at most: bounds the per-thread scratch and the partials whatever a request
// asks for (a GQA group of many heads times several query tokens is cut into blocks of rows).
inline constexpr int kItemRows = 64;

// Tokens per block of the AVX-512 and AVX2 paths (at most; blocks end at page and chunk ends).
inline constexpr int kSimdBlockTokens = 64;

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

// One work item: kv heads [h0, h0 + hn) of a sequence, rows [r0, r0 + rn) of each head's group
// (row r = qi * G + gh), stored tokens [t0, t1). hn > 1 only when a head's whole group fits, so
// then r0 = 0; hn * rn <= kItemRows. Its partial rows are head-major: off + hh * rn + r.
struct Item {
  int seq, h0, hn;
  int r0, rn;
  std::int64_t t0, t1;
  std::size_t off;
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

// One item per call. The SIMD paths carry their target attribute on this function, which holds
// the inlined body (OpenMP outlines parallel regions into functions of their own, which need not
// inherit it).
using ItemFn = void (*)(const Problem&, const Item&, Scratch&, Partials&);
void item_avx512(const Problem& pb, const Item& it, Scratch& sc, Partials& parts);
void item_avx2(const Problem& pb, const Item& it, Scratch& sc, Partials& parts);
void item_sse(const Problem& pb, const Item& it, Scratch& sc, Partials& parts);
void item_scalar(const Problem& pb, const Item& it, Scratch& sc, Partials& parts);

// Rows to prefetch while a kernel streams others: the region the item reads a few regions later,
// requested row by row as the current rows are consumed, so requests go out at the rate the data
// is used and never in bursts that fill the miss queues.
struct Ahead {
  const char* p = nullptr;
  int rows = 0;
  int row_bytes = 0;
};

// Row j of the region into L2 (T1: the look-ahead distance is larger than L1). Plain SSE, so it
// inlines into every path.
[[gnu::always_inline]] inline void prefetch_row(const Ahead& pf, int j) {
  if (j >= pf.rows) return;  // also when there is nothing to prefetch (rows = 0)
  const char* r = pf.p + static_cast<std::size_t>(j) * static_cast<std::size_t>(pf.row_bytes);
  for (int o = 0; o < pf.row_bytes; o += 64) _mm_prefetch(r + o, _MM_HINT_T1);
}

// The regions of an item's block in reading order, for the SIMD paths: the K rows of each head of
// the item, then their V rows (a page is [K heads][tokens][D] then [V heads][tokens][D], so this
// reads it front to back). Region i of the block starting at stored token tb, counting on into
// the next blocks past its end; nothing past t_end.
inline Ahead region_ahead(const Problem& pb, const Item& it, std::int64_t t_end, std::int64_t tb, int i, int row_bytes) {
  const int P = pb.lay.page_tokens;
  auto block_tokens = [&](std::int64_t t) { return std::min<std::int64_t>({kSimdBlockTokens, t_end - t, P - t % P}); };
  while (i >= 2 * it.hn && tb < t_end) {
    i -= 2 * it.hn;
    tb += block_tokens(tb);
  }
  Ahead r;
  if (tb >= t_end) return r;
  const int h = it.h0 + i % it.hn + (i >= it.hn ? pb.lay.kv_heads : 0);  // V heads follow the K heads
  r.p = reinterpret_cast<const char*>(pb.seqs[it.seq].pages[tb / P]) +
        (static_cast<std::size_t>(h) * P + static_cast<std::size_t>(tb % P)) * static_cast<std::size_t>(row_bytes);
  r.rows = static_cast<int>(block_tokens(tb));
  r.row_bytes = row_bytes;
  return r;
}

// The SIMD paths keep q rows and accumulators in the order their bf16 loads produce: per chunk of
// 2 * lanes elements the even elements, then the odd ones (a trailing slice of `lanes` elements
// in natural order); f32 and f16 in natural order. to_slots also applies the softmax scale.
[[gnu::always_inline]] inline void to_slots(int lanes, bool bf16, int D, const float* src, float scale, float* dst) {
  const int chunk = 2 * lanes, paired = bf16 ? D / chunk * chunk : 0;
  for (int c = 0; c < paired; c += chunk)
    for (int w = 0; w < lanes; ++w) {
      dst[c + w] = src[c + 2 * w] * scale;
      dst[c + lanes + w] = src[c + 2 * w + 1] * scale;
    }
  for (int d = paired; d < D; ++d) dst[d] = src[d] * scale;
}
[[gnu::always_inline]] inline void from_slots(int lanes, bool bf16, int D, const float* src, float* dst) {
  const int chunk = 2 * lanes, paired = bf16 ? D / chunk * chunk : 0;
  for (int c = 0; c < paired; c += chunk)
    for (int w = 0; w < lanes; ++w) {
      dst[c + 2 * w] = src[c + w];
      dst[c + 2 * w + 1] = src[c + lanes + w];
    }
  for (int d = paired; d < D; ++d) dst[d] = src[d];
}

}  // namespace longattn::kernels::decode_detail
