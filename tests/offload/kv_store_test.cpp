// The KV store on its own: paging (appends in pieces that cross pages equal one bulk append),
// idempotent repeats, gaps and geometry mismatches refused, attends that expect another length
// refused, capacity errors that leave the layer as it was, memory returned on drop.
#include <gtest/gtest.h>

#include "offload/kv_store.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

Append make_append(std::uint64_t seq, std::uint32_t layer, const test::DenseKv& kv, std::size_t s, std::int64_t start, std::uint32_t n) {
  Append a;
  a.seq = seq;
  a.layer = layer;
  a.tokens = n;
  a.start = start;
  a.kv_heads = static_cast<std::uint32_t>(kv.kv_heads);
  a.head_dim = static_cast<std::uint32_t>(kv.head_dim);
  a.dtype = kv.dtype;
  a.k = std::span(kv.k_at(s, start), kv.row_bytes() * n);
  a.v = std::span(kv.v_at(s, start), kv.row_bytes() * n);
  return a;
}

std::vector<float> attend_one(KvStore& st, std::uint64_t seq, std::int64_t len, int q_heads, int d, const std::vector<float>& q,
                              std::vector<float>& lse) {
  Attend m;
  m.layer = 0;
  m.q_heads = static_cast<std::uint32_t>(q_heads);
  m.head_dim = static_cast<std::uint32_t>(d);
  m.seqs = {{seq, 1, len}};
  m.total_q = 1;
  m.q = std::as_bytes(std::span(q));
  std::vector<float> o(static_cast<std::size_t>(q_heads) * d);
  lse.assign(static_cast<std::size_t>(q_heads), 0.0f);
  st.attend(0, m, o.data(), lse.data(), 2);
  return o;
}

TEST(KvStore, PagingPiecesEqualBulkAndTheReference) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  const int H = 4, K = 2, D = 32;
  test::DenseKv kv(rng, DType::bf16, K, D, {160});
  KvStore st(KvStoreOptions{std::size_t{64} << 20, 0, 32});
  st.open(0, Open{1, 1, 2, 32, DType::bf16, 0});
  st.open(0, Open{2, 1, 2, 32, DType::bf16, 0});
  EXPECT_NO_THROW(st.open(0, Open{1, 1, 2, 32, DType::bf16, 0}));  // same geometry: a no-op
  EXPECT_THROW(st.open(0, Open{1, 2, 2, 32, DType::bf16, 0}), Error);
  // Sequence 1 in uneven pieces (1, 30, 2, 64, 53 tokens: crossing 32-token pages), sequence 2 at once.
  std::int64_t at = 0;
  for (std::uint32_t n : {1u, 30u, 2u, 64u, 53u}) {
    EXPECT_EQ(st.append(0, make_append(1, 0, kv, 0, at, n)), at + n);
    at += n;
  }
  EXPECT_EQ(st.append(0, make_append(2, 0, kv, 0, 0, 150)), 150);
  // A repeat of an applied append changes nothing; a gap is refused.
  EXPECT_EQ(st.append(0, make_append(1, 0, kv, 0, 64, 10)), 150);
  EXPECT_THROW(st.append(0, make_append(1, 0, kv, 0, 149, 2)), Error);  // overlaps the end: neither repeat nor next
  Append gap = make_append(1, 0, kv, 0, 0, 1);
  gap.start = 151;
  EXPECT_THROW(st.append(0, gap), Error);
  Append wrong = make_append(1, 0, kv, 0, 0, 1);
  wrong.start = 150;
  wrong.dtype = DType::f16;
  EXPECT_THROW(st.append(0, wrong), Error);

  std::vector<float> q(static_cast<std::size_t>(H) * D);
  std::uniform_real_distribution<float> val(-1, 1);
  for (auto& x : q) x = val(rng);
  std::vector<float> l1, l2, o_ref, lse_ref;
  const auto o1 = attend_one(st, 1, 150, H, D, q, l1);
  const auto o2 = attend_one(st, 2, 150, H, D, q, l2);
  EXPECT_EQ(o1, o2);
  EXPECT_EQ(l1, l2);
  test::reference_decode(kv, {150}, {1}, H, q, o_ref, lse_ref);  // the first 150 of the 160 tokens
  EXPECT_LT(test::max_abs_diff(o1, o_ref), 1e-4);
  EXPECT_LT(test::max_abs_diff(l1, lse_ref), 1e-4);
  // An attend that expects another length is refused, never answered over a different KV.
  std::vector<float> lse;
  EXPECT_THROW(attend_one(st, 1, 149, H, D, q, lse), Error);
  EXPECT_THROW(attend_one(st, 9, 0, H, D, q, lse), Error);  // unknown sequence
  // Sequences are per client id.
  EXPECT_THROW(st.append(7, make_append(1, 0, kv, 0, 150, 1)), Error);
}

TEST(KvStore, CapacityErrorsLeaveTheLayerAsItWasAndDropFrees) {
  std::mt19937_64 rng(1);
  test::DenseKv kv(rng, DType::f32, 1, 16, {400});
  // Pages of 16 tokens x 1 head x 16 x f32 x 2 = 2 KiB; 8 KiB per client = 4 pages = 64 tokens.
  KvStore st(KvStoreOptions{std::size_t{32} << 10, std::size_t{8} << 10, 16});
  st.open(0, Open{1, 1, 1, 16, DType::f32, 0});
  EXPECT_EQ(st.append(0, make_append(1, 0, kv, 0, 0, 40)), 40);
  try {
    st.append(0, make_append(1, 0, kv, 0, 40, 100));
    FAIL() << "expected out of capacity";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_capacity);
    EXPECT_NE(std::string(e.what()).find("limit"), std::string::npos) << e.what();
  }
  EXPECT_EQ(st.append(0, make_append(1, 0, kv, 0, 40, 24)), 64);  // the layer was untouched: 40 + 24 fits exactly
  // Another client id still has its own share.
  st.open(5, Open{1, 1, 1, 16, DType::f32, 0});
  EXPECT_EQ(st.append(5, make_append(1, 0, kv, 0, 0, 64)), 64);
  EXPECT_EQ(st.stats().bytes_in_use, std::size_t{16} << 10);
  EXPECT_TRUE(st.drop(0, 1));
  EXPECT_FALSE(st.drop(0, 1));
  EXPECT_EQ(st.stats().bytes_in_use, std::size_t{8} << 10);
  EXPECT_EQ(st.stats().sequences, 1u);
  // Freed pages are reused: the first client can fill its share again.
  st.open(0, Open{2, 1, 1, 16, DType::f32, 0});
  EXPECT_EQ(st.append(0, make_append(2, 0, kv, 0, 0, 64)), 64);
}

}  // namespace
}  // namespace longattn::offload
