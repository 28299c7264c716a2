// The CPU decode kernel's driver (see cpu_decode.hpp): checks the arguments, cuts the work into
// items (sequence, kv heads, chunk of KV tokens; see cpu_decode_internal.hpp), runs them on an
// OpenMP team through the best instruction-set path the CPU has (cpu_decode_avx512.cpp,
// cpu_decode_avx2.cpp, cpu_decode_portable.cpp; picked at run time, so one binary runs on hosts
// with and without AVX-512), and joins each row's chunk partials with the LSE merge.
#include "kernels/cpu_decode.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/check.hpp"
#include "kernels/attention_state.hpp"
#include "kernels/cpu_decode_internal.hpp"
#include "longattn/config.hpp"

namespace longattn::kernels {
namespace {

using namespace decode_detail;
constexpr int BT = kDecodeBlockTokens;

// The items that cover the same rows (one per KV chunk), merged together at the end; `head` is
// at position head - items[i].h0 of each of them.
struct Group {
  int seq, head, r0, rn;
  std::size_t first, last;  // items [first, last)
};

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
      sc.s.resize(static_cast<std::size_t>(kItemRows) * std::max(BT, kSimdBlockTokens));
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
      float* out = a.o + (static_cast<std::size_t>(row) * L.q_heads + head) * D;
      // Two passes: the largest max of the chunks first, then each chunk at its scale under it.
      SoftmaxState<> merged;
      for (std::size_t i = g.first; i < g.last; ++i) merged.max = std::max(merged.max, parts.m[prow(i, r)]);
      std::fill(out, out + D, 0.0f);
      for (std::size_t i = g.first; i < g.last; ++i) {
        const float factor = merged.add({parts.m[prow(i, r)], parts.l[prow(i, r)]});
        const float* acc = &parts.acc[prow(i, r) * D];
        for (int d = 0; d < D; ++d) out[d] += weighted(factor, acc[d]);
      }
      const float normalizer = merged.normalizer();
      for (int d = 0; d < D; ++d) out[d] *= normalizer;
      a.lse[static_cast<std::size_t>(head) * a.total_q + row] = merged.lse();
    }
  }
}

}  // namespace longattn::kernels
