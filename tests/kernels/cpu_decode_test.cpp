// The CPU decode kernel against the double-precision reference, on every ISA path this CPU has.
// CpuDecode aims at what the AVX-512 path does differently: items that span several kv heads and
// stream whole pages, blocks that end at page and chunk ends (lengths that do not fill a page, a
// single token), the bf16 even/odd element order and its trailing 16-element slice (head dims 16,
// 48), vdpbf16ps scoring with q split into hi + lo (avx512_bf16), GQA 1/4/8 and groups too large for
// one item, several causal query tokens. DecodeKernel sweeps random batches (odd lengths, empty
// sequences, queryless sequences, token-range shards, small chunks that force the LSE merge) and
// the edge cases: no stored token, fp16 special values, bad arguments. Unused page rows are filled
// with NaN bit patterns (decode_test_util.hpp), so reading a row that is not stored poisons the output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "decode_test_util.hpp"
#include "kernels/cpu_decode.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using kernels::DecodeIsa;
using test::check_decode;

TEST(CpuDecode, PartialPagesAndSingleTokens) {
  // GQA 4, head dim 128, the benchmark's shape: 1 token, a page minus one, a page, a page plus one.
  for (DType t : {DType::bf16, DType::f16, DType::f32})
    check_decode({64, 32, 8, 128, t, {1, 63, 64, 65, 200, 0}, 1, false, 0});
  check_decode({64, 4, 1, 128, DType::bf16, {1}, 1, false, 0});  // one token, MQA
  check_decode({16, 4, 1, 64, DType::bf16, {1}, 1, true, 0});
}

TEST(CpuDecode, GqaRatiosAndHeadDims) {
  for (int d : {64, 128}) {
    check_decode({16, 8, 8, d, DType::bf16, {1, 17, 33, 100}, 1, false, 0});          // GQA 1 (MHA)
    check_decode({32, 16, 4, d, DType::f16, {5, 77, 130}, 1, false, 0});              // GQA 4
    check_decode({32, 64, 8, d, DType::bf16, {5, 77, 130}, 2, true, 0});              // GQA 8, 2 tokens: 16 rows per head
    check_decode({64, 8, 1, d, DType::f32, {1, 95, 300}, 3, true, 48});               // MQA (GQA 8), chunks inside pages
    check_decode({64, 12, 4, d, DType::bf16, {31, 129, 257}, 5, true, 32});           // 15 rows per head: 4 heads per item
  }
}

TEST(CpuDecode, HeadDimsWithATrailingSlice) {
  // Head dims that are odd multiples of 16: the bf16 path's last 16 elements stay in natural order
  // and scores use the FMA loop even with AVX512_BF16.
  for (DType t : {DType::bf16, DType::f16, DType::f32}) {
    check_decode({128, 16, 4, 48, t, {3, 129, 250}, 1, false, 0});
    check_decode({64, 4, 2, 16, t, {1, 64, 90}, 2, true, 0});
    check_decode({32, 8, 2, 80, t, {40, 70}, 1, false, 16});
  }
}

TEST(CpuDecode, HeadDimsOddMultiplesOfEight) {
  // The AVX2 path's 8-element trailing slice (head dims 24, 40, 56), GQA 1/3/8, causal and not.
  for (DType t : {DType::bf16, DType::f16, DType::f32}) {
    check_decode({64, 6, 2, 24, t, {1, 65, 130}, 1, false, 0});
    check_decode({32, 8, 8, 40, t, {17, 90}, 2, true, 0});
    check_decode({64, 8, 1, 56, t, {63, 200}, 1, true, 32});
  }
}

TEST(CpuDecode, LargeGroupsSplitIntoRowBlocks) {
  // 80 and 3 x 40 rows per kv head: more than one item's rows, so one head per item and row blocks.
  check_decode({32, 80, 1, 128, DType::bf16, {1, 45, 100}, 1, false, 0});
  check_decode({64, 40, 2, 64, DType::f16, {20, 70}, 3, true, 0});
}

TEST(CpuDecode, LongerContextsMergeManyChunks) {
  // The kernel's own chunking over several pages per item, and the LSE merge of many chunks.
  check_decode({64, 32, 8, 128, DType::bf16, {3000, 2500, 1}, 1, false, 0});
  check_decode({64, 32, 8, 128, DType::f16, {1500, 777}, 2, true, 0});
  check_decode({128, 8, 2, 128, DType::bf16, {2049}, 1, false, 256});
}

TEST(CpuDecode, IsaNames) {
  EXPECT_STREQ(kernels::to_string(DecodeIsa::avx512_bf16), "avx512_bf16");
  EXPECT_STREQ(kernels::to_string(DecodeIsa::avx512), "avx512");
}

// Random lengths of the DecodeKernel sweep: sequence 0 is empty, 1 holds one token, 2 the maximum,
// the others anything up to it.
std::vector<std::int64_t> sweep_lengths(std::mt19937_64& rng, int batch, int max_len) {
  std::uniform_int_distribution<int> len_dist(0, max_len);
  std::vector<std::int64_t> lengths;
  for (int s = 0; s < batch; ++s) lengths.push_back(s == 0 ? 0 : s == 1 ? 1 : s == 2 ? max_len : len_dist(rng));
  return lengths;
}

TEST(DecodeKernel, MatchesReferenceAllPaths) {
  // Pages of 32 tokens; sequence 3 (where there is one) has no query token; causal cases put
  // sequence s at token 7 s and odd sequences' queries 3 positions early.
  struct Sweep {
    int batch, max_len, hq, hkv, d, q_per_seq;
    DType dtype;
    bool causal;
    std::int64_t chunk;
  };
  const std::vector<Sweep> cases = {
      {5, 200, 8, 2, 64, 1, DType::bf16, false, 0},    // GQA 4, odd lengths, an empty sequence
      {5, 333, 4, 4, 128, 1, DType::f16, false, 64},   // MHA, chunks force the merge
      {4, 150, 8, 1, 32, 1, DType::f32, false, 32},    // MQA, tiny chunks
      {5, 97, 6, 2, 40, 3, DType::bf16, true, 48},     // head dim 40 (no full vector), 3 tokens, causal
      {4, 130, 16, 4, 128, 2, DType::f16, true, 0},    // two decode tokens, causal, shifted shards
      {3, 64, 2, 1, 8, 1, DType::f32, true, 16},       // small everything
      {3, 90, 64, 1, 32, 3, DType::bf16, true, 32},    // 192 rows per kv head: several row blocks per item
  };
  for (auto isa : test::decode_isas())
    for (const auto& w : cases) {
      const auto seed = test::fresh_seed();
      SCOPED_TRACE(fmt::format("seed {}", seed));
      std::mt19937_64 rng(seed);
      test::DecodeCase c{32, w.hq, w.hkv, w.d, w.dtype, sweep_lengths(rng, w.batch, w.max_len), w.q_per_seq, w.causal, w.chunk};
      c.queryless_seq = 3;
      c.kv_start_stride = 7;
      c.odd_q_shift = 3;
      check_decode(c, {isa}, rng);
    }
}

TEST(DecodeKernel, EmptyAndQueryless) {
  // A sequence with no stored token: lse = -inf and o = 0, never NaN.
  kernels::DecodeLayout lay{4, 2, 64, DType::bf16, 32};
  kernels::DecodeSequence sq;
  sq.q_count = 1;
  std::vector<float> q(4 * 64, 1.0f), o(4 * 64, 7.0f), lse(4, 7.0f);
  kernels::cpu_decode(test::decode_args(lay, {&sq, 1}, q, o, lse));
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
  const kernels::DecodeArgs a = test::decode_args(lay, {&sq, 1}, q, o, lse);
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
