// The KV store on its own: paging (appends in pieces that cross pages equal one bulk append),
// idempotent repeats, gaps and geometry mismatches refused, attends that expect another length
// refused, capacity errors that leave the layer as it was, memory returned on drop; receive
// buffers counted against the same limit; the operator's listing and a client's drop.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

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

TEST(KvStore, ReceiveBuffersCountAgainstTheLimit) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  test::DenseKv kv(rng, DType::f32, 1, 16, {64});
  // Pages of 16 tokens are 2 KiB; the limit holds 16 of them.
  KvStore st(KvStoreOptions{std::size_t{32} << 10, 0, 16});
  PagePool& pool = st.pool();
  const std::size_t buffer = (std::size_t{24} << 10) + 1 + rng() % 2047;  // more than 24 KiB: no room for 4 pages beside it
  pool.reserve_buffer(buffer);
  EXPECT_EQ(st.stats().receive_buffers, buffer);
  EXPECT_THROW(pool.reserve_buffer((std::size_t{8} << 10) + 1 + rng() % 1024), Error);  // past the limit with the first
  st.open(3, Open{1, 1, 1, 16, DType::f32, 0});
  try {
    st.append(3, make_append(1, 0, kv, 0, 0, 64));  // 8 KiB of pages do not fit beside the buffer
    FAIL() << "KV was allocated past the limit that a receive buffer holds";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_capacity);
    EXPECT_NE(std::string(e.what()).find("receive buffers"), std::string::npos) << e.what();
  }
  pool.release_buffer(buffer);
  EXPECT_EQ(st.stats().receive_buffers, 0u);
  EXPECT_EQ(st.append(3, make_append(1, 0, kv, 0, 0, 64)), 64);
}

TEST(KvStore, ListingAndDroppingAClientsSequences) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  test::DenseKv kv(rng, DType::f32, 1, 16, {100});
  KvStore st(KvStoreOptions{std::size_t{1} << 20, 0, 16});
  const std::uint64_t a = 1 + rng() % 1000, b = a + 1 + rng() % 1000;
  const std::uint32_t tokens = 17 + static_cast<std::uint32_t>(rng() % 80);
  st.open(a, Open{10, 2, 1, 16, DType::f32, 0});
  st.append(a, make_append(10, 0, kv, 0, 0, tokens));
  st.append(a, make_append(10, 1, kv, 0, 0, 5));
  st.open(a, Open{11, 1, 1, 16, DType::f32, 0});
  st.open(b, Open{10, 1, 1, 16, DType::f32, 0});
  const auto all = st.list();
  ASSERT_EQ(all.size(), 3u);
  const auto first = std::find_if(all.begin(), all.end(), [&](const SequenceInfo& i) { return i.client == a && i.seq == 10; });
  ASSERT_NE(first, all.end());
  EXPECT_EQ(first->layers, 2u);
  EXPECT_EQ(first->token_layers, tokens + 5u);
  EXPECT_EQ(first->bytes, ((tokens + 15) / 16 + 1) * std::size_t{2048});
  EXPECT_EQ(st.drop_client(a), 2u);
  EXPECT_EQ(st.drop_client(a), 0u);
  ASSERT_EQ(st.list().size(), 1u);
  EXPECT_EQ(st.list().front().client, b);
  EXPECT_EQ(st.stats().tokens, 0u);
}

}  // namespace
}  // namespace longattn::offload
