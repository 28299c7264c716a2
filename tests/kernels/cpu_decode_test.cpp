// The CPU decode kernel's paths against the double-precision reference, aimed at what the AVX-512
// path does differently: items that span several kv heads and stream whole pages, blocks that end
// at page and chunk ends (lengths that do not fill a page, a single token), the bf16 even/odd
// element order and its trailing 16-element slice (head dims 16, 48), vdpbf16ps scoring with q split
// into hi + lo (avx512_bf16), GQA 1/4/8 and groups too large for one item, several causal query
// tokens. Unused page rows are filled with NaN bit patterns, so reading a row that is not stored
// (rather than merely loading it and masking) poisons the output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "kernels/cpu_decode.hpp"
#include "kernels/cpu_kernels.hpp"
#include "longattn/dtype_convert.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using kernels::DecodeIsa;

struct Case {
  int page_tokens, hq, hkv, d;
  DType dtype;
  std::vector<std::int64_t> lengths;
  int q_per_seq;
  bool causal;
  std::int64_t chunk;  // 0 = the kernel's choice
};

std::string describe(const Case& c) {
  return fmt::format("P{} h{}x{} d{} {} lengths {} q{} causal {} chunk {}", c.page_tokens, c.hq, c.hkv, c.d, to_string(c.dtype),
                     fmt::join(c.lengths, ","), c.q_per_seq, c.causal, c.chunk);
}

// Paged KV as the KV store writes it: per page [K heads][page_tokens][d] then [V heads][...][d].
struct Paged {
  kernels::DecodeLayout lay;
  std::vector<std::vector<std::byte>> mem;
  std::vector<std::vector<const std::byte*>> ptrs;
  std::vector<kernels::DecodeSequence> seqs;
  std::vector<float> q, k, v;  // dense reference inputs, values exact in the dtype
  std::vector<std::int32_t> cu_q{0}, cu_k{0}, pos_q, pos_k;
  std::vector<std::int64_t> pos_q64;
};

Paged build(std::mt19937_64& rng, const Case& c) {
  Paged b;
  b.lay = {c.hq, c.hkv, c.d, c.dtype, c.page_tokens};
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  const std::size_t es = dtype_size(c.dtype);
  const int P = c.page_tokens;
  for (std::size_t s = 0; s < c.lengths.size(); ++s) {
    const std::int64_t len = c.lengths[s];
    const std::int64_t kv_start = c.causal ? static_cast<std::int64_t>(s) * 5 : 0;
    std::vector<const std::byte*> ptrs;
    for (std::int64_t p = 0; p < (len + P - 1) / P; ++p) {
      b.mem.emplace_back(b.lay.page_bytes(), std::byte{0xff});  // all-ones: NaN in f32, bf16 and f16
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
    sq.q_count = c.q_per_seq;
    for (int i = 0; i < sq.q_count; ++i) {
      // The last q_per_seq positions; on odd sequences shifted 2 back, so rows see fewer tokens.
      const std::int64_t pos = kv_start + len - sq.q_count + i - (s % 2 ? 2 : 0);
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

std::vector<DecodeIsa> isas() {
  std::vector<DecodeIsa> v{DecodeIsa::generic};
  for (auto isa : {DecodeIsa::avx2, DecodeIsa::avx512, DecodeIsa::avx512_bf16})
    if (kernels::best_decode_isa() >= isa) v.push_back(isa);
  return v;
}

void check(const Case& c) {
  const auto seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  Paged b = build(rng, c);
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

  for (auto isa : isas()) {
    SCOPED_TRACE(fmt::format("seed {} isa {} {}", seed, kernels::to_string(isa), describe(c)));
    std::vector<float> o(o_ref.size(), std::nanf("")), lse(lse_ref.size(), std::nanf(""));
    kernels::DecodeArgs a;
    a.layout = b.lay;
    a.seqs = b.seqs.data();
    a.num_seqs = static_cast<int>(b.seqs.size());
    a.total_q = tq;
    a.q = b.q.data();
    a.q_positions = c.causal ? b.pos_q64.data() : nullptr;
    a.chunk_tokens = c.chunk;
    a.threads = 2;
    a.o = o.data();
    a.lse = lse.data();
    kernels::cpu_decode(a, isa);
    const auto d_o = test::compare(o, o_ref);
    const auto d_l = test::compare(lse, lse_ref);
    EXPECT_LT(d_o.max_abs, 2e-4 * std::max(1.0, d_o.max_ref)) << "o";
    EXPECT_LT(d_l.max_abs, 1e-4 * std::max(1.0, d_l.max_ref)) << "lse";
  }
}

TEST(CpuDecode, PartialPagesAndSingleTokens) {
  // GQA 4, head dim 128, the benchmark's shape: 1 token, a page minus one, a page, a page plus one.
  for (DType t : {DType::bf16, DType::f16, DType::f32})
    check({64, 32, 8, 128, t, {1, 63, 64, 65, 200, 0}, 1, false, 0});
  check({64, 4, 1, 128, DType::bf16, {1}, 1, false, 0});  // one token, MQA
  check({16, 4, 1, 64, DType::bf16, {1}, 1, true, 0});
}

TEST(CpuDecode, GqaRatiosAndHeadDims) {
  for (int d : {64, 128}) {
    check({16, 8, 8, d, DType::bf16, {1, 17, 33, 100}, 1, false, 0});          // GQA 1 (MHA)
    check({32, 16, 4, d, DType::f16, {5, 77, 130}, 1, false, 0});              // GQA 4
    check({32, 64, 8, d, DType::bf16, {5, 77, 130}, 2, true, 0});              // GQA 8, 2 tokens: 16 rows per head
    check({64, 8, 1, d, DType::f32, {1, 95, 300}, 3, true, 48});               // MQA (GQA 8), chunks inside pages
    check({64, 12, 4, d, DType::bf16, {31, 129, 257}, 5, true, 32});           // 15 rows per head: 4 heads per item
  }
}

TEST(CpuDecode, HeadDimsWithATrailingSlice) {
  // Head dims that are odd multiples of 16: the bf16 path's last 16 elements stay in natural order
  // and scores use the FMA loop even with AVX512_BF16.
  for (DType t : {DType::bf16, DType::f16, DType::f32}) {
    check({128, 16, 4, 48, t, {3, 129, 250}, 1, false, 0});
    check({64, 4, 2, 16, t, {1, 64, 90}, 2, true, 0});
    check({32, 8, 2, 80, t, {40, 70}, 1, false, 16});
  }
}

TEST(CpuDecode, HeadDimsOddMultiplesOfEight) {
  // The AVX2 path's 8-element trailing slice (head dims 24, 40, 56), GQA 1/3/8, causal and not.
  for (DType t : {DType::bf16, DType::f16, DType::f32}) {
    check({64, 6, 2, 24, t, {1, 65, 130}, 1, false, 0});
    check({32, 8, 8, 40, t, {17, 90}, 2, true, 0});
    check({64, 8, 1, 56, t, {63, 200}, 1, true, 32});
  }
}

TEST(CpuDecode, LargeGroupsSplitIntoRowBlocks) {
  // 80 and 3 x 40 rows per kv head: more than one item's rows, so one head per item and row blocks.
  check({32, 80, 1, 128, DType::bf16, {1, 45, 100}, 1, false, 0});
  check({64, 40, 2, 64, DType::f16, {20, 70}, 3, true, 0});
}

TEST(CpuDecode, LongerContextsMergeManyChunks) {
  // The kernel's own chunking over several pages per item, and the LSE merge of many chunks.
  check({64, 32, 8, 128, DType::bf16, {3000, 2500, 1}, 1, false, 0});
  check({64, 32, 8, 128, DType::f16, {1500, 777}, 2, true, 0});
  check({128, 8, 2, 128, DType::bf16, {2049}, 1, false, 256});
}

TEST(CpuDecode, IsaNames) {
  EXPECT_STREQ(kernels::to_string(DecodeIsa::avx512_bf16), "avx512_bf16");
  EXPECT_STREQ(kernels::to_string(DecodeIsa::avx512), "avx512");
}

}  // namespace
}  // namespace longattn
