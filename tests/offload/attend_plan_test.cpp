// The client's shard planning as data: every query of every sequence reaches each shard of its
// sequence exactly once with its rows and positions, and the shards' answers joined with the LSE
// merge equal attention over the whole sequence, also where a shard holds none of the keys.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "kernels/cpu_kernels.hpp"
#include "longattn/error.hpp"
#include "offload/attend_plan.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

constexpr int kQHeads = 4, kKvHeads = 2, kHeadDim = 16;

// Attention of a sequence's queries (at its last q_count positions) over its keys [first, end),
// in f32 rows of the caller's layout: o [q_count, heads, dim], lse [heads, q_count].
void attend_range(const std::vector<float>& k, const std::vector<float>& v, std::int64_t length, std::int64_t first, std::int64_t end,
                  const float* q, int q_count, std::vector<float>& o, std::vector<float>& lse) {
  const std::size_t kv_row = static_cast<std::size_t>(kKvHeads) * kHeadDim;
  std::vector<float> ks(k.begin() + first * static_cast<std::ptrdiff_t>(kv_row), k.begin() + end * static_cast<std::ptrdiff_t>(kv_row));
  std::vector<float> vs(v.begin() + first * static_cast<std::ptrdiff_t>(kv_row), v.begin() + end * static_cast<std::ptrdiff_t>(kv_row));
  ks.resize(std::max<std::size_t>(ks.size(), 1));
  vs.resize(std::max<std::size_t>(vs.size(), 1));
  std::vector<std::int32_t> q_pos, k_pos;
  for (int j = 0; j < q_count; ++j) q_pos.push_back(static_cast<std::int32_t>(length - q_count + j));
  for (std::int64_t t = first; t < end; ++t) k_pos.push_back(static_cast<std::int32_t>(t));
  k_pos.resize(std::max<std::size_t>(k_pos.size(), 1));
  o.assign(static_cast<std::size_t>(q_count) * kQHeads * kHeadDim, 0.0f);
  lse.assign(static_cast<std::size_t>(q_count) * kQHeads, 0.0f);
  AttentionArgs a;
  a.q = TensorView(const_cast<float*>(q), DType::f32, {q_count, kQHeads, kHeadDim});
  a.k = TensorView(ks.data(), DType::f32, {end - first, kKvHeads, kHeadDim});
  a.v = TensorView(vs.data(), DType::f32, {end - first, kKvHeads, kHeadDim});
  a.causal = true;
  a.q_positions = q_pos.data();
  a.k_positions = k_pos.data();
  kernels::reference_forward(a, {TensorView(o.data(), DType::f32, {q_count, kQHeads, kHeadDim}),
                                 TensorView(lse.data(), DType::f32, {kQHeads, q_count})});
}

struct Batch {
  std::vector<QueriedSequence> queries;
  std::vector<std::vector<float>> k, v;  // per sequence [length, kv heads, dim]
  std::vector<float> q;                  // [total_q, q heads, dim]
  std::int64_t total_q = 0;
};

Batch random_batch(std::mt19937_64& rng, const std::vector<std::int64_t>& lengths, const std::vector<int>& q_counts, int servers) {
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  Batch b;
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    b.queries.push_back({100 + s, q_counts[s], lengths[s], static_cast<int>((3 * s + 1) % static_cast<std::size_t>(servers))});
    b.k.emplace_back(static_cast<std::size_t>(lengths[s]) * kKvHeads * kHeadDim);
    b.v.emplace_back(b.k.back().size());
    for (auto& x : b.k.back()) x = val(rng);
    for (auto& x : b.v.back()) x = val(rng);
    b.total_q += q_counts[s];
  }
  b.q.resize(static_cast<std::size_t>(b.total_q) * kQHeads * kHeadDim);
  for (auto& x : b.q) x = val(rng);
  return b;
}

TEST(AttendPlan, EveryShardOfEveryQueryAskedOnceWithItsRowsAndPositions) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const ShardLayout layout{48, 3};
  auto b = random_batch(rng, {1, 130, 48, 97, 0}, {1, 2, 1, 3, 1}, 3);
  const AttendPlan plan = plan_attend(layout, 1, kQHeads, kHeadDim, b.queries, b.q.data());
  ASSERT_EQ(plan.servers.size(), 3u);
  EXPECT_EQ(plan.total_q, b.total_q);
  // Per (sequence, shard): how often asked, and the token count asked for.
  std::map<std::uint64_t, int> asked;
  const std::size_t q_row = static_cast<std::size_t>(kQHeads) * kHeadDim;
  for (std::size_t s = 0; s < plan.servers.size(); ++s) {
    const auto& part = plan.servers[s];
    EXPECT_EQ(part.request.layer, 1u);
    EXPECT_EQ(part.request.flags, kAttendHasPositions);  // some sequence has several queries
    ASSERT_EQ(part.request.seqs.size(), part.rows.size());
    ASSERT_EQ(part.q.size(), part.request.total_q * q_row);
    ASSERT_EQ(part.request.positions.size(), part.request.total_q);
    std::size_t reply_row = 0;
    for (std::size_t e = 0; e < part.rows.size(); ++e) {
      const std::uint64_t seq = part.request.seqs[e].seq >> kShardBits, shard = part.request.seqs[e].seq & (kMaxShards - 1);
      const auto& qs = b.queries[seq - 100];
      ++asked[part.request.seqs[e].seq];
      EXPECT_EQ(static_cast<int>(s), (qs.home + static_cast<int>(shard)) % 3);
      EXPECT_EQ(part.request.seqs[e].length, std::clamp<std::int64_t>(qs.length - static_cast<std::int64_t>(shard) * 48, 0, 48));
      EXPECT_EQ(part.rows[e].rows, qs.q_count);
      for (int j = 0; j < qs.q_count; ++j, ++reply_row) {
        EXPECT_EQ(part.request.positions[reply_row], qs.length - qs.q_count + j);
        for (std::size_t x = 0; x < q_row; ++x)
          ASSERT_EQ(part.q[reply_row * q_row + x], b.q[static_cast<std::size_t>(part.rows[e].first_row + j) * q_row + x]);
      }
    }
  }
  for (const auto& qs : b.queries) {
    const std::uint64_t shards = std::max<std::int64_t>(1, (qs.length + 47) / 48);
    for (std::uint64_t k = 0; k < shards; ++k) EXPECT_EQ(asked[server_seq_id(qs.seq, k)], 1) << qs.seq << " shard " << k;
  }
  EXPECT_EQ(asked.size(), 1u + 3u + 1u + 3u + 1u);
}

// The servers' answers built from the reference per shard (a shard past a query's keys answers
// lse = -inf, with junk in its o), merged, equal the reference over the whole sequence.
TEST(AttendPlan, MergedShardAnswersEqualAttentionOverTheWholeSequence) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (const ShardLayout layout : {ShardLayout{0, 2}, ShardLayout{32, 3}, ShardLayout{200, 2}}) {
    SCOPED_TRACE(layout.shard_tokens);
    auto b = random_batch(rng, {1, 130, 64, 97}, {1, 2, 1, 3}, static_cast<int>(layout.servers));
    const AttendPlan plan = plan_attend(layout, 0, kQHeads, kHeadDim, b.queries, b.q.data());
    std::vector<std::vector<float>> reply_o(plan.servers.size()), reply_lse(plan.servers.size());
    std::vector<AttendReply> replies(plan.servers.size());
    for (std::size_t s = 0; s < plan.servers.size(); ++s) {
      const auto& part = plan.servers[s];
      if (!part.asked()) continue;
      const std::size_t n = part.request.total_q;
      reply_o[s].resize(n * kQHeads * kHeadDim);
      reply_lse[s].resize(n * kQHeads);
      std::size_t reply_row = 0;
      for (std::size_t e = 0; e < part.rows.size(); ++e) {
        const auto& qs = b.queries[(part.request.seqs[e].seq >> kShardBits) - 100];
        const std::uint64_t shard = part.request.seqs[e].seq & (kMaxShards - 1);
        const std::int64_t first = layout.first_token(shard), end = first + part.request.seqs[e].length;
        std::vector<float> o, lse;
        attend_range(b.k[qs.seq - 100], b.v[qs.seq - 100], qs.length, first, end,
                     &part.q[reply_row * kQHeads * kHeadDim], qs.q_count, o, lse);
        for (int j = 0; j < qs.q_count; ++j)
          for (int h = 0; h < kQHeads; ++h) {
            const float l = lse[static_cast<std::size_t>(h * qs.q_count + j)];
            reply_lse[s][h * n + reply_row + static_cast<std::size_t>(j)] = l;
            for (int x = 0; x < kHeadDim; ++x) {
              const float value = o[static_cast<std::size_t>((j * kQHeads + h) * kHeadDim + x)];
              // A shard that saw no key of this row: its o must not matter.
              reply_o[s][((reply_row + static_cast<std::size_t>(j)) * kQHeads + static_cast<std::size_t>(h)) * kHeadDim +
                         static_cast<std::size_t>(x)] = l == -INFINITY ? std::numeric_limits<float>::quiet_NaN() : value;
            }
          }
        reply_row += static_cast<std::size_t>(qs.q_count);
      }
      replies[s].total_q = n;
      replies[s].q_heads = kQHeads;
      replies[s].head_dim = kHeadDim;
      replies[s].o = std::as_bytes(std::span(reply_o[s]));
      replies[s].lse = std::as_bytes(std::span(reply_lse[s]));
    }
    std::vector<float> o(static_cast<std::size_t>(b.total_q) * kQHeads * kHeadDim), lse(static_cast<std::size_t>(b.total_q) * kQHeads);
    merge_attend_replies(plan, replies, o.data(), lse.data());
    // The reference, sequence by sequence, over all its keys.
    std::size_t row = 0;
    for (std::size_t s = 0; s < b.queries.size(); ++s) {
      const auto& qs = b.queries[s];
      std::vector<float> o_ref, lse_ref;
      attend_range(b.k[s], b.v[s], qs.length, 0, qs.length, &b.q[row * kQHeads * kHeadDim], qs.q_count, o_ref, lse_ref);
      for (int j = 0; j < qs.q_count; ++j)
        for (int h = 0; h < kQHeads; ++h) {
          const std::size_t r = row + static_cast<std::size_t>(j);
          EXPECT_NEAR(lse[static_cast<std::size_t>(h) * static_cast<std::size_t>(b.total_q) + r], lse_ref[static_cast<std::size_t>(h * qs.q_count + j)], 1e-5);
          for (int x = 0; x < kHeadDim; ++x)
            ASSERT_NEAR(o[(r * kQHeads + static_cast<std::size_t>(h)) * kHeadDim + static_cast<std::size_t>(x)],
                        o_ref[static_cast<std::size_t>((j * kQHeads + h) * kHeadDim + x)], 1e-5)
                << "sequence " << s << " row " << j << " head " << h;
        }
      row += static_cast<std::size_t>(qs.q_count);
    }
  }
}

TEST(AttendPlan, ReplyOfTheWrongShapeIsAProtocolError) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  auto b = random_batch(rng, {40}, {1}, 1);
  const AttendPlan plan = plan_attend(ShardLayout{0, 1}, 0, kQHeads, kHeadDim, b.queries, b.q.data());
  std::vector<float> o_bytes(2 * kQHeads * kHeadDim, 0.5f), lse_bytes(2 * kQHeads, 0.25f);
  std::vector<AttendReply> replies(1);
  replies[0] = {2, kQHeads, kHeadDim, std::as_bytes(std::span(o_bytes)), std::as_bytes(std::span(lse_bytes))};  // 2 rows, 1 asked
  std::vector<float> o(kQHeads * kHeadDim), lse(kQHeads);
  try {
    merge_attend_replies(plan, replies, o.data(), lse.data());
    FAIL() << "a reply with 2 rows for 1 query was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::protocol);
  }
}

TEST(AttendPlan, QueryCountOutsideItsRangeIsRefused) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  auto b = random_batch(rng, {40}, {1}, 1);
  b.queries[0].q_count = 0;
  EXPECT_THROW(plan_attend(ShardLayout{0, 1}, 0, kQHeads, kHeadDim, b.queries, b.q.data()), Error);
}

}  // namespace
}  // namespace longattn::offload
