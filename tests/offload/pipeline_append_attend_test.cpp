// append_attend (append the new tokens, then attend, in one round trip per server) against the
// double-precision reference: N = 1, 2, 3 micro-batches kept in flight at once, whole sequences
// and token ranges whose new token crosses into a fresh shard, several query rows per sequence;
// and a request with a non-finite k refused without appending anything.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <future>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "longattn/offload_client.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

struct Shape {
  int layers = 2, q_heads = 4, kv_heads = 2, head_dim = 32;
  DType dtype = DType::bf16;
};

// Decodes `steps` steps of the batch in `micro_batches` groups with every group's append_attend of
// one layer in flight together, and checks every answer against the reference.
void pipelined_decode(Client& c, const Shape& m, std::mt19937_64& rng, const std::vector<std::int64_t>& prefill, int steps,
                      int micro_batches, int q_per_seq, std::uint64_t id_base) {
  const std::size_t B = prefill.size();
  std::vector<std::int64_t> final_lens = prefill;
  for (auto& l : final_lens) l += static_cast<std::int64_t>(steps) * q_per_seq;
  std::vector<test::DenseKv> kv;
  for (int l = 0; l < m.layers; ++l) kv.emplace_back(rng, m.dtype, m.kv_heads, m.head_dim, final_lens);
  for (std::size_t s = 0; s < B; ++s) c.open({id_base + s, m.layers, m.kv_heads, m.head_dim, m.dtype}).get();
  for (int l = 0; l < m.layers; ++l)
    for (std::size_t s = 0; s < B; ++s)
      if (prefill[s] > 0) c.append(id_base + s, l, kv[l].k_at(s, 0), kv[l].v_at(s, 0), prefill[s]).get();

  struct Group {
    std::vector<std::size_t> seqs;
    std::vector<DecodeQuery> queries;
    std::vector<float> q, o, lse;
    std::vector<std::byte> k, v;
    std::future<void> answer;
  };
  std::vector<Group> groups(static_cast<std::size_t>(micro_batches));
  for (std::size_t s = 0; s < B; ++s) groups[s % groups.size()].seqs.push_back(s);
  std::vector<std::int64_t> lens = prefill;
  std::uniform_real_distribution<float> val(-1, 1);
  const std::size_t row = kv[0].row_bytes();
  for (int step = 0; step < steps; ++step) {
    for (int l = 0; l < m.layers; ++l) {
      for (auto& g : groups) {
        g.queries.clear();
        g.k.clear();
        g.v.clear();
        for (auto s : g.seqs) {
          g.queries.push_back({id_base + s, q_per_seq});
          g.k.insert(g.k.end(), kv[l].k_at(s, lens[s]), kv[l].k_at(s, lens[s]) + q_per_seq * row);
          g.v.insert(g.v.end(), kv[l].v_at(s, lens[s]), kv[l].v_at(s, lens[s]) + q_per_seq * row);
        }
        const std::size_t tq = g.seqs.size() * static_cast<std::size_t>(q_per_seq);
        g.q.resize(tq * m.q_heads * m.head_dim);
        for (auto& x : g.q) x = val(rng);
        g.o.assign(g.q.size(), 0.0f);
        g.lse.assign(tq * m.q_heads, 0.0f);
        g.answer = c.append_attend(l, m.q_heads, m.head_dim, g.queries, g.q.data(), g.k.data(), g.v.data(), g.o.data(), g.lse.data());
      }
      // Every group's request is in flight now; check them in turn.
      for (auto& g : groups) {
        g.answer.get();
        std::vector<std::int64_t> group_lens;
        std::vector<int> qc;
        test::DenseKv part = kv[l];
        part.k.clear(), part.v.clear(), part.kf.clear(), part.vf.clear();
        for (auto s : g.seqs) {
          group_lens.push_back(lens[s] + q_per_seq);
          qc.push_back(q_per_seq);
          part.k.push_back(kv[l].k[s]), part.v.push_back(kv[l].v[s]);
          part.kf.push_back(kv[l].kf[s]), part.vf.push_back(kv[l].vf[s]);
        }
        std::vector<float> o_ref, lse_ref;
        test::reference_decode(part, group_lens, qc, m.q_heads, g.q, o_ref, lse_ref);
        ASSERT_LT(test::max_abs_diff(g.o, o_ref), 1e-4) << "step " << step << " layer " << l;
        ASSERT_LT(test::max_abs_diff(g.lse, lse_ref), 1e-4) << "step " << step << " layer " << l;
      }
    }
    for (auto& len : lens) len += q_per_seq;
  }
  for (std::size_t s = 0; s < B; ++s) c.drop(id_base + s).get();
}

TEST(OffloadPipeline, AppendAttendEqualsReferenceForOneTwoThreeMicroBatches) {
  auto s1 = test::start_server(), s2 = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*s1), test::addr(*s2)};
  co.token = test::kToken;
  Client c(co);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> len(1, 300);
  for (int n : {1, 2, 3}) {
    SCOPED_TRACE(n);
    std::vector<std::int64_t> prefill(6);
    for (auto& p : prefill) p = len(rng);
    prefill[0] = 0;  // a sequence whose first token arrives by append_attend
    pipelined_decode(c, Shape{}, rng, prefill, 3, n, 1, 1000 * static_cast<std::uint64_t>(n));
  }
  pipelined_decode(c, Shape{1, 4, 4, 16, DType::f16}, rng, {40, 9, 77}, 2, 2, 2, 9000);  // two new tokens per sequence, causal
  // The servers count the new request like the others in /metrics (and the stats request).
  std::uint64_t counted = 0;
  for (int server : {0, 1}) {
    const std::string metrics = c.server_stats(server).get();
    const std::string key = "longattn_offload_requests_total{type=\"append_attend\"} ";
    const auto at = metrics.find(key);
    ASSERT_NE(at, std::string::npos) << metrics;
    counted += std::stoull(metrics.substr(at + key.size()));
  }
  EXPECT_GT(counted, 0u);
}

TEST(OffloadPipeline, AppendAttendOverTokenRangesCrossingIntoNewShards) {
  auto s1 = test::start_server(), s2 = test::start_server(), s3 = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*s1), test::addr(*s2), test::addr(*s3)};
  co.token = test::kToken;
  co.shard_tokens = 16;
  Client c(co);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  // Prefills ending at or just before a multiple of 16: the new tokens open the next shard.
  pipelined_decode(c, Shape{}, rng, {15, 16, 31, 47, 3}, 3, 2, 1, 100);
  pipelined_decode(c, Shape{}, rng, {15, 30}, 2, 1, 3, 200);  // three new tokens straddle a boundary
}

TEST(OffloadPipeline, NonFiniteNewKeyRefusedAndNothingAppended) {
  auto s1 = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*s1)};
  co.token = test::kToken;
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  co.client_id = (rng() | 1) & 0xffffffffffffULL;
  Client c(co);
  const Shape m;
  test::DenseKv kv(rng, m.dtype, m.kv_heads, m.head_dim, {21});
  c.open({7, m.layers, m.kv_heads, m.head_dim, m.dtype}).get();
  c.append(7, 0, kv.k_at(0, 0), kv.v_at(0, 0), 20).get();
  std::uniform_real_distribution<float> val(-1, 1);
  std::vector<float> q(static_cast<std::size_t>(m.q_heads) * m.head_dim), o(q.size()), lse(m.q_heads);
  for (auto& x : q) x = val(rng);
  std::vector<std::byte> bad_k(kv.k_at(0, 20), kv.k_at(0, 20) + kv.row_bytes());
  store_from_f32(bad_k.data(), m.dtype, 5, std::numeric_limits<float>::quiet_NaN());
  const DecodeQuery dq{7, 1};
  try {
    c.append_attend(0, m.q_heads, m.head_dim, std::span(&dq, 1), q.data(), bad_k.data(), kv.v_at(0, 20), o.data(), lse.data()).get();
    FAIL() << "a NaN in the new key was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find("append_attend's k"), std::string::npos) << e.what();
  }
  // The first client marked the sequence broken: it must be dropped before it is used again.
  try {
    c.attend(0, m.q_heads, m.head_dim, std::span(&dq, 1), q.data(), o.data(), lse.data()).get();
    FAIL() << "a sequence whose append_attend failed was used again";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::communication) << e.what();
  }
  // The server stored nothing of the refused request. A second client of the same id re-sends the
  // 20 tokens (a repeat changes nothing) and then the good token 20: had the NaN token been kept,
  // the good one would be taken as a repeat and the answer would not be the reference.
  Client c2(co);
  c2.open({7, m.layers, m.kv_heads, m.head_dim, m.dtype}).get();
  c2.append(7, 0, kv.k_at(0, 0), kv.v_at(0, 0), 20).get();
  c2.append_attend(0, m.q_heads, m.head_dim, std::span(&dq, 1), q.data(), kv.k_at(0, 20), kv.v_at(0, 20), o.data(), lse.data()).get();
  std::vector<float> o_ref, lse_ref;
  test::reference_decode(kv, {21}, {1}, m.q_heads, q, o_ref, lse_ref);
  EXPECT_LT(test::max_abs_diff(o, o_ref), 1e-4);
  EXPECT_LT(test::max_abs_diff(lse, lse_ref), 1e-4);
}

}  // namespace
}  // namespace longattn::offload
