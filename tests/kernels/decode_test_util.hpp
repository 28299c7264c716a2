// Helpers of the CPU decode kernel's tests: a paged KV cache laid out as the KV store writes it,
// built from random values exact in the KV dtype (with dense f32 copies for the reference), the
// kernel's arguments, and the check of ISA paths against the double-precision reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/cpu_decode.hpp"
#include "kernels/cpu_kernels.hpp"
#include "longattn/dtype_convert.hpp"
#include "support/test_util.hpp"

namespace longattn::test {

// One decode batch over a paged cache.
struct DecodeCase {
  int page_tokens, hq, hkv, d;
  DType dtype;
  std::vector<std::int64_t> lengths;  // tokens stored per sequence
  int q_per_seq;                      // query tokens per sequence
  bool causal;
  std::int64_t chunk = 0;  // 0 = the kernel's choice
  int queryless_seq = -1;  // this sequence (if any) gets no query token
  // Causal cases: sequence s stores the token range that starts at s * kv_start_stride (token-range
  // shards), and the queries are the last q_per_seq positions, on odd sequences odd_q_shift earlier,
  // so their rows see fewer tokens (the earliest sometimes none).
  std::int64_t kv_start_stride = 5;
  std::int64_t odd_q_shift = 2;
};

inline std::string describe(const DecodeCase& c) {
  return fmt::format("P{} h{}x{} d{} {} lengths {} q{} causal {} chunk {}", c.page_tokens, c.hq, c.hkv, c.d, to_string(c.dtype),
                     fmt::join(c.lengths, ","), c.q_per_seq, c.causal, c.chunk);
}

// Paged KV as the KV store writes it: per page [K heads][page_tokens][d] then [V heads][...][d].
// Page rows past a sequence's length are all-ones bytes (NaN in f32, bf16 and f16), so reading a
// row that is not stored (rather than merely loading it and masking) poisons the output.
struct PagedKv {
  kernels::DecodeLayout lay;
  std::vector<std::vector<std::byte>> mem;
  std::vector<std::vector<const std::byte*>> ptrs;
  std::vector<kernels::DecodeSequence> seqs;
  std::vector<float> q, k, v;  // dense reference inputs, [tokens, heads, d], values exact in the dtype
  std::vector<std::int32_t> cu_q{0}, cu_k{0}, pos_q, pos_k;
  std::vector<std::int64_t> pos_q64;
};

inline PagedKv build_paged_kv(std::mt19937_64& rng, const DecodeCase& c) {
  PagedKv b;
  b.lay = {c.hq, c.hkv, c.d, c.dtype, c.page_tokens};
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  const std::size_t es = dtype_size(c.dtype);
  const int P = c.page_tokens;
  for (std::size_t s = 0; s < c.lengths.size(); ++s) {
    const std::int64_t len = c.lengths[s];
    const std::int64_t kv_start = c.causal ? static_cast<std::int64_t>(s) * c.kv_start_stride : 0;
    std::vector<const std::byte*> ptrs;
    for (std::int64_t p = 0; p < (len + P - 1) / P; ++p) {
      b.mem.emplace_back(b.lay.page_bytes(), std::byte{0xff});
      ptrs.push_back(b.mem.back().data());
    }
    for (std::int64_t t = 0; t < len; ++t) {
      for (int kv = 0; kv < 2; ++kv)
        for (int h = 0; h < c.hkv; ++h)
          for (int x = 0; x < c.d; ++x) {
            std::byte tmp[4];
            store_from_f32(tmp, c.dtype, 0, val(rng));
            (kv == 0 ? b.k : b.v).push_back(load_as_f32(tmp, c.dtype, 0));
            auto* page = const_cast<std::byte*>(ptrs[static_cast<std::size_t>(t / P)]);
            const std::size_t off = ((static_cast<std::size_t>(kv) * c.hkv + h) * P + static_cast<std::size_t>(t % P)) * c.d + x;
            std::memcpy(page + off * es, tmp, es);
          }
      b.pos_k.push_back(static_cast<std::int32_t>(kv_start + t));
    }
    b.ptrs.push_back(std::move(ptrs));
    kernels::DecodeSequence sq;
    sq.length = len;
    sq.kv_start = kv_start;
    sq.q_begin = b.cu_q.back();
    sq.q_count = static_cast<int>(s) == c.queryless_seq ? 0 : c.q_per_seq;
    for (int i = 0; i < sq.q_count; ++i) {
      const std::int64_t pos = kv_start + len - sq.q_count + i - (s % 2 ? c.odd_q_shift : 0);
      b.pos_q64.push_back(pos);
      b.pos_q.push_back(static_cast<std::int32_t>(pos));
    }
    b.seqs.push_back(sq);
    b.cu_q.push_back(b.cu_q.back() + sq.q_count);
    b.cu_k.push_back(static_cast<std::int32_t>(b.cu_k.back() + len));
  }
  for (std::size_t i = 0; i < b.seqs.size(); ++i) b.seqs[i].pages = b.ptrs[i].data();
  b.q.resize(static_cast<std::size_t>(b.cu_q.back()) * c.hq * c.d);
  for (auto& x : b.q) x = val(rng);
  return b;
}

// The kernel's arguments for the query rows q [total_q, q_heads, head_dim] over `seqs`, writing o
// and lse (sized by the caller); scale, threads, chunk and positions are left at their defaults.
inline kernels::DecodeArgs decode_args(const kernels::DecodeLayout& lay, std::span<const kernels::DecodeSequence> seqs,
                                       const std::vector<float>& q, std::vector<float>& o, std::vector<float>& lse) {
  kernels::DecodeArgs a;
  a.layout = lay;
  a.seqs = seqs.data();
  a.num_seqs = static_cast<int>(seqs.size());
  a.total_q = static_cast<std::int64_t>(q.size()) / (static_cast<std::int64_t>(lay.q_heads) * lay.head_dim);
  a.q = q.data();
  a.o = o.data();
  a.lse = lse.data();
  return a;
}

// Generic, then every faster path this CPU has (the kernel would run a higher one as the best).
inline std::vector<kernels::DecodeIsa> decode_isas() {
  std::vector<kernels::DecodeIsa> v{kernels::DecodeIsa::generic};
  for (auto isa : {kernels::DecodeIsa::avx2, kernels::DecodeIsa::avx512, kernels::DecodeIsa::avx512_bf16})
    if (kernels::best_decode_isa() >= isa) v.push_back(isa);
  return v;
}

// Builds the case's cache from `rng` (the caller traces the seed), then runs each of `isas` on it
// (2 threads) against the double-precision reference: o within 2e-4 and lse within 1e-4, relative
// to the largest reference magnitude where that exceeds 1; o never NaN.
inline void check_decode(const DecodeCase& c, const std::vector<kernels::DecodeIsa>& isas, std::mt19937_64& rng) {
  PagedKv b = build_paged_kv(rng, c);
  const std::int64_t tq = b.cu_q.back(), tk = b.cu_k.back();

  std::vector<float> o_ref(static_cast<std::size_t>(tq) * c.hq * c.d), lse_ref(static_cast<std::size_t>(tq) * c.hq);
  AttentionArgs r;
  r.q = TensorView(b.q.data(), DType::f32, {tq, c.hq, c.d});
  r.k = TensorView(b.k.data(), DType::f32, {tk, c.hkv, c.d});
  r.v = TensorView(b.v.data(), DType::f32, {tk, c.hkv, c.d});
  r.cu_seqlens_q = b.cu_q.data();
  r.cu_seqlens_k = b.cu_k.data();
  r.batch = static_cast<int>(c.lengths.size());
  r.causal = c.causal;
  if (c.causal) {
    r.q_positions = b.pos_q.data();
    r.k_positions = b.pos_k.data();
  }
  kernels::reference_forward(r, {TensorView(o_ref.data(), DType::f32, {tq, c.hq, c.d}), TensorView(lse_ref.data(), DType::f32, {c.hq, tq})});

  for (auto isa : isas) {
    SCOPED_TRACE(fmt::format("isa {} {}", kernels::to_string(isa), describe(c)));
    std::vector<float> o(o_ref.size(), std::nanf("")), lse(lse_ref.size(), std::nanf(""));
    kernels::DecodeArgs a = decode_args(b.lay, b.seqs, b.q, o, lse);
    a.q_positions = c.causal ? b.pos_q64.data() : nullptr;
    a.chunk_tokens = c.chunk;
    a.threads = 2;
    kernels::cpu_decode(a, isa);
    const auto d_o = compare(o, o_ref);
    const auto d_l = compare(lse, lse_ref);
    EXPECT_LT(d_o.max_abs, 2e-4 * std::max(1.0, d_o.max_ref)) << "o";
    EXPECT_LT(d_l.max_abs, 1e-4 * std::max(1.0, d_l.max_ref)) << "lse";
    for (float x : o) ASSERT_FALSE(std::isnan(x));
  }
}

// The same with a fresh seed (traced), on every ISA path this CPU has unless told which.
inline void check_decode(const DecodeCase& c, const std::vector<kernels::DecodeIsa>& isas = decode_isas()) {
  const auto seed = fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  check_decode(c, isas, rng);
}

}  // namespace longattn::test
