// The CPU decode kernel against the double-precision reference: every ISA path this CPU has,
// bf16/fp16/fp32 KV, GQA ratios, odd lengths, empty sequences, several query tokens with causal
// positions, token-range shards (kv_start), small chunks that force the LSE merge.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "kernels/cpu_decode.hpp"
#include "kernels/cpu_kernels.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using kernels::DecodeIsa;

struct Case {
  int batch, max_len, hq, hkv, d, q_per_seq;
  DType dtype;
  bool causal;
  std::int64_t chunk;
};

// A paged KV cache built from dense per-sequence K/V, plus the dense copies for the reference.
struct Built {
  kernels::DecodeLayout lay;
  std::vector<std::vector<std::byte>> page_mem;
  std::vector<std::vector<const std::byte*>> page_ptrs;
  std::vector<kernels::DecodeSequence> seqs;
  std::vector<float> q, k_dense, v_dense;  // reference inputs (f32, values exact in dtype)
  std::vector<std::int32_t> cu_q, cu_k, pos_q, pos_k;
  std::vector<std::int64_t> pos_q64;
};

Built build(std::mt19937_64& rng, const Case& c) {
  Built b;
  b.lay = {c.hq, c.hkv, c.d, c.dtype, 32};
  std::uniform_int_distribution<int> len_dist(0, c.max_len);
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  const std::size_t es = dtype_size(c.dtype);
  b.cu_q = {0};
  b.cu_k = {0};
  for (int s = 0; s < c.batch; ++s) {
    std::int64_t len = s == 0 ? 0 : (s == 1 ? 1 : len_dist(rng));
    if (s == 2) len = c.max_len;
    const std::int64_t kv_start = c.causal ? s * 7 : 0;
    const std::int64_t npages = (len + b.lay.page_tokens - 1) / b.lay.page_tokens;
    std::vector<const std::byte*> ptrs;
    for (std::int64_t p = 0; p < npages; ++p) {
      b.page_mem.emplace_back(b.lay.page_bytes());
      ptrs.push_back(b.page_mem.back().data());
    }
    for (std::int64_t t = 0; t < len; ++t) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int h = 0; h < c.hkv; ++h) {
          for (int x = 0; x < c.d; ++x) {
            std::byte tmp[4];
            store_from_f32(tmp, c.dtype, 0, val(rng));
            const float exact = load_as_f32(tmp, c.dtype, 0);
            (kv == 0 ? b.k_dense : b.v_dense).push_back(exact);
            std::byte* page = const_cast<std::byte*>(ptrs[static_cast<std::size_t>(t / b.lay.page_tokens)]);
            const std::size_t off =
                ((static_cast<std::size_t>(kv) * c.hkv + h) * b.lay.page_tokens + t % b.lay.page_tokens) * c.d + x;
            std::memcpy(page + off * es, tmp, es);
          }
        }
      }
      b.pos_k.push_back(static_cast<std::int32_t>(kv_start + t));
    }
    // K and V of each token were pushed interleaved per token; the reference wants [T, Hkv, D]
    // each, which is exactly what the two vectors hold.
    b.page_ptrs.push_back(std::move(ptrs));
    kernels::DecodeSequence sq;
    sq.length = len;
    sq.kv_start = kv_start;
    sq.q_begin = b.cu_q.back();
    sq.q_count = (s == 3) ? 0 : c.q_per_seq;
    b.seqs.push_back(sq);
    for (int i = 0; i < sq.q_count; ++i) {
      // Decode positions: the last q_count tokens, the earliest sometimes before kv_start.
      const std::int64_t pos = kv_start + len - sq.q_count + i + (s % 2 == 0 ? 0 : -3);
      b.pos_q64.push_back(pos);
      b.pos_q.push_back(static_cast<std::int32_t>(pos));
    }
    b.cu_q.push_back(b.cu_q.back() + sq.q_count);
    b.cu_k.push_back(static_cast<std::int32_t>(b.cu_k.back() + len));
  }
  for (std::size_t i = 0; i < b.seqs.size(); ++i) b.seqs[i].pages = b.page_ptrs[i].data();
  b.q.resize(static_cast<std::size_t>(b.cu_q.back()) * c.hq * c.d);
  for (auto& x : b.q) x = val(rng);
  return b;
}

void run_case(const Case& c, DecodeIsa isa) {
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {} isa {} b{} L{} h{}x{} d{} q{} {} causal {} chunk {}", seed, kernels::to_string(isa),
                           c.batch, c.max_len, c.hq, c.hkv, c.d, c.q_per_seq, to_string(c.dtype), c.causal, c.chunk));
  std::mt19937_64 rng(seed);
  Built b = build(rng, c);
  const std::int64_t tq = b.cu_q.back(), tk = b.cu_k.back();

  std::vector<float> o(static_cast<std::size_t>(tq) * c.hq * c.d, std::nanf("")), lse(static_cast<std::size_t>(tq) * c.hq, std::nanf(""));
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

  std::vector<float> o_ref(o.size()), lse_ref(lse.size());
  AttentionArgs r;
  r.q = TensorView(b.q.data(), DType::f32, {tq, c.hq, c.d});
  r.k = TensorView(b.k_dense.data(), DType::f32, {tk, c.hkv, c.d});
  r.v = TensorView(b.v_dense.data(), DType::f32, {tk, c.hkv, c.d});
  r.cu_seqlens_q = b.cu_q.data();
  r.cu_seqlens_k = b.cu_k.data();
  r.batch = c.batch;
  r.causal = c.causal;
  if (c.causal) {
    r.q_positions = b.pos_q.data();
    r.k_positions = b.pos_k.data();
  }
  ForwardOutputs out{TensorView(o_ref.data(), DType::f32, {tq, c.hq, c.d}), TensorView(lse_ref.data(), DType::f32, {c.hq, tq})};
  kernels::reference_forward(r, out);

  const auto d_o = test::compare(o, o_ref);
  const auto d_l = test::compare(lse, lse_ref);
  EXPECT_LT(d_o.max_abs, 2e-5 * std::max(1.0, d_o.max_ref) * 10) << "o";
  EXPECT_LT(d_l.max_abs, 1e-4 * std::max(1.0, d_l.max_ref)) << "lse";
  for (float x : o) ASSERT_FALSE(std::isnan(x));
}

std::vector<DecodeIsa> isas() {
  std::vector<DecodeIsa> v{DecodeIsa::generic};
  if (kernels::best_decode_isa() >= DecodeIsa::avx2) v.push_back(DecodeIsa::avx2);
  if (kernels::best_decode_isa() >= DecodeIsa::avx512) v.push_back(DecodeIsa::avx512);
  return v;
}

TEST(DecodeKernel, MatchesReferenceAllPaths) {
  const std::vector<Case> cases = {
      {5, 200, 8, 2, 64, 1, DType::bf16, false, 0},    // GQA 4, odd lengths, an empty sequence
      {5, 333, 4, 4, 128, 1, DType::f16, false, 64},   // MHA, chunks force the merge
      {4, 150, 8, 1, 32, 1, DType::f32, false, 32},    // MQA, tiny chunks
      {5, 97, 6, 2, 40, 3, DType::bf16, true, 48},     // head dim 40 (no full vector), 3 tokens, causal
      {4, 130, 16, 4, 128, 2, DType::f16, true, 0},    // two decode tokens, causal, shifted shards
      {3, 64, 2, 1, 8, 1, DType::f32, true, 16},       // small everything
      {3, 90, 64, 1, 32, 3, DType::bf16, true, 32},    // 192 rows per kv head: several row blocks per item
  };
  for (auto isa : isas())
    for (const auto& c : cases) run_case(c, isa);
}

TEST(DecodeKernel, EmptyAndQueryless) {
  // A sequence with no stored token: lse = -inf and o = 0, never NaN.
  kernels::DecodeLayout lay{4, 2, 64, DType::bf16, 32};
  kernels::DecodeSequence sq;
  sq.q_count = 1;
  std::vector<float> q(4 * 64, 1.0f), o(4 * 64, 7.0f), lse(4, 7.0f);
  kernels::DecodeArgs a;
  a.layout = lay;
  a.seqs = &sq;
  a.num_seqs = 1;
  a.total_q = 1;
  a.q = q.data();
  a.o = o.data();
  a.lse = lse.data();
  kernels::cpu_decode(a);
  for (float x : o) EXPECT_EQ(x, 0.0f);
  for (float x : lse) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
}

TEST(DecodeKernel, Fp16SpecialValuesWidenExactly) {
  // q = 0: every key weighs the same, so o is the plain mean of the V rows, exactly representable
  // here; V holds zeros, a subnormal, the largest half and negative values.
  const float vals[4] = {0.0f, 5.9604645e-8f /* smallest subnormal */, 65504.0f, -2.5f};
  kernels::DecodeLayout lay{1, 1, 16, DType::f16, 16};
  std::vector<std::uint16_t> page(lay.page_bytes() / 2, 0);
  for (int t = 0; t < 4; ++t)
    for (int x = 0; x < 16; ++x) {
      page[static_cast<std::size_t>(t) * 16 + x] = f32_to_f16(0.0f);                                // K
      page[(16 + static_cast<std::size_t>(t)) * 16 + x] = f32_to_f16(x % 2 ? vals[t] : -vals[t]);  // V
    }
  const std::byte* pages[1] = {reinterpret_cast<const std::byte*>(page.data())};
  kernels::DecodeSequence sq;
  sq.pages = pages;
  sq.length = 4;
  sq.q_count = 1;
  std::vector<float> q(16, 0.0f), o(16), lse(1);
  kernels::DecodeArgs a;
  a.layout = lay;
  a.seqs = &sq;
  a.num_seqs = 1;
  a.total_q = 1;
  a.q = q.data();
  a.o = o.data();
  a.lse = lse.data();
  for (auto isa : {DecodeIsa::generic, DecodeIsa::avx2, DecodeIsa::avx512}) {
    kernels::cpu_decode(a, isa);
    const double mean = (0.0 + 5.9604645e-8 + 65504.0 - 2.5) / 4;
    for (int x = 0; x < 16; ++x) EXPECT_NEAR(o[x], x % 2 ? mean : -mean, 1e-3) << kernels::to_string(isa) << " " << x;
    EXPECT_NEAR(lse[0], std::log(4.0), 1e-6);
  }
}

TEST(DecodeKernel, RefusesBadArguments) {
  kernels::DecodeLayout lay{6, 4, 64, DType::bf16, 32};  // 6 % 4 != 0
  kernels::DecodeArgs a;
  a.layout = lay;
  EXPECT_THROW(kernels::cpu_decode(a), Error);
  a.layout = {4, 2, 64, DType::bf16, 24};  // page not a multiple of 16
  EXPECT_THROW(kernels::cpu_decode(a), Error);
}

}  // namespace
}  // namespace longattn
