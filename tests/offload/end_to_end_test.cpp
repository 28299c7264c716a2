// End to end over loopback: two in-process servers and a client, equal to the reference attention
// (whole sequences per server, and token ranges joined with the LSE merge); capacity errors that
// leave other clients served; a wrong token; metrics over HTTP.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <utility>

#include <fmt/format.h>

#include "longattn/offload_client.hpp"
#include "offload/transport.hpp"
#include "http_request.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

struct Model {
  int layers = 2, q_heads = 8, kv_heads = 2, head_dim = 64;
  DType dtype = DType::bf16;
};

// Prefill in bulk, then decode steps that append one token and attend; every step checked.
void run_decode(Client& c, const Model& m, std::mt19937_64& rng, std::vector<std::int64_t> prefill, int steps, int q_per_seq,
                std::uint64_t id_base) {
  std::vector<std::int64_t> final_lens = prefill;
  for (auto& l : final_lens) l += steps;
  const std::size_t B = prefill.size();
  std::vector<test::DenseKv> kv;
  for (int l = 0; l < m.layers; ++l) kv.emplace_back(rng, m.dtype, m.kv_heads, m.head_dim, final_lens);
  for (std::size_t s = 0; s < B; ++s) c.open({id_base + s, m.layers, m.kv_heads, m.head_dim, m.dtype}).get();
  for (int l = 0; l < m.layers; ++l)
    for (std::size_t s = 0; s < B; ++s)
      if (prefill[s] > 0) c.append(id_base + s, l, kv[l].k_at(s, 0), kv[l].v_at(s, 0), prefill[s]).get();
  std::vector<std::int64_t> lens = prefill;
  std::uniform_real_distribution<float> val(-1, 1);
  for (int step = 0; step < steps; ++step) {
    for (int l = 0; l < m.layers; ++l) {
      std::vector<std::future<void>> f;
      for (std::size_t s = 0; s < B; ++s) f.push_back(c.append(id_base + s, l, kv[l].k_at(s, lens[s]), kv[l].v_at(s, lens[s]), 1));
      for (auto& x : f) x.get();
    }
    for (auto& x : lens) ++x;
    std::vector<DecodeQuery> qs;
    std::vector<int> qc;
    for (std::size_t s = 0; s < B; ++s) {
      qs.push_back({id_base + s, q_per_seq});
      qc.push_back(q_per_seq);
    }
    const std::size_t tq = B * static_cast<std::size_t>(q_per_seq);
    std::vector<float> q(tq * m.q_heads * m.head_dim);
    for (auto& x : q) x = val(rng);
    for (int l = 0; l < m.layers; ++l) {
      std::vector<float> o(q.size()), lse(tq * m.q_heads), o_ref, lse_ref;
      c.attend(l, m.q_heads, m.head_dim, qs, q.data(), o.data(), lse.data()).get();
      test::reference_decode(kv[l], lens, qc, m.q_heads, q, o_ref, lse_ref);
      ASSERT_LT(test::max_abs_diff(o, o_ref), 1e-4) << "step " << step << " layer " << l;
      ASSERT_LT(test::max_abs_diff(lse, lse_ref), 1e-4) << "step " << step << " layer " << l;
    }
  }
  for (std::size_t s = 0; s < B; ++s) c.drop(id_base + s).get();
}

TEST(OffloadEndToEnd, TwoServersWholeSequences) {
  auto s1 = test::start_server(), s2 = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*s1), test::addr(*s2)};
  co.token = test::kToken;
  Client c(co);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  run_decode(c, Model{}, rng, {0, 1, 130, 77, 200}, 3, 1, 100);
  Model fp16{1, 4, 4, 32, DType::f16};
  run_decode(c, fp16, rng, {64, 5}, 2, 2, 200);  // two query tokens per sequence: causal between them
  EXPECT_GT(c.stats().bytes_sent, 0u);
}

TEST(OffloadEndToEnd, TwoServersTokenRanges) {
  // A sequence larger than one server's share: tokens in ranges of 48 alternate between servers and
  // the client joins the partial results with the LSE merge.
  auto s1 = test::start_server(), s2 = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*s1), test::addr(*s2)};
  co.token = test::kToken;
  co.shard_tokens = 48;
  Client c(co);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  run_decode(c, Model{2, 8, 2, 64, DType::f32}, rng, {300, 47, 1}, 3, 1, 300);
  run_decode(c, Model{1, 4, 1, 64, DType::bf16}, rng, {95}, 2, 3, 400);
}

TEST(OffloadEndToEnd, TwoServersOverUcx) {
  if (!ucx_available()) GTEST_SKIP() << "built without UCX";
  auto s1 = test::start_server(std::size_t{256} << 20, 0, "", "ucx"), s2 = test::start_server(std::size_t{256} << 20, 0, "", "ucx");
  ClientOptions co;
  co.servers = {test::addr(*s1), test::addr(*s2)};
  co.token = test::kToken;
  co.transport = "ucx";
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  {
    Client c(co);
    run_decode(c, Model{}, rng, {0, 1, 130, 77}, 2, 1, 500);
  }
  co.shard_tokens = 40;
  Client c(co);
  run_decode(c, Model{1, 4, 2, 32, DType::f16}, rng, {150, 3}, 2, 2, 600);
  // A wrong token is refused over UCX too.
  co.token = "wrong-token-wrong-token";
  Client bad(co);
  try {
    bad.open({1, 1, 1, 16, DType::f32}).get();
    FAIL() << "expected unauthorized";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unauthorized) << e.what();
  }
}

TEST(OffloadEndToEnd, KilledUcxServerFailsWithinTimeout) {
  if (!ucx_available()) GTEST_SKIP() << "built without UCX";
  auto s = test::start_server(std::size_t{64} << 20, 0, "", "ucx");
  ClientOptions co;
  co.servers = {test::addr(*s)};
  co.token = test::kToken;
  co.transport = "ucx";
  co.timeout = std::chrono::milliseconds(1500);
  Client c(co);
  std::vector<float> k(2 * 32, 0.5f), q(4 * 32, 0.1f), o(q.size()), lse(4);
  c.open({1, 1, 2, 32, DType::f32}).get();
  c.append(1, 0, k.data(), k.data(), 1).get();
  std::vector<DecodeQuery> qs{{1, 1}};
  c.attend(0, 4, 32, qs, q.data(), o.data(), lse.data()).get();
  s->kill();
  s->wait();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(c.attend(0, 4, 32, qs, q.data(), o.data(), lse.data()).get(), Error);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(1700));
}

TEST(OffloadEndToEnd, UcxServerDropsSilentConnections) {
  if (!ucx_available()) GTEST_SKIP() << "built without UCX";
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = test::kToken;
  o.transport = "ucx";
  o.hello_timeout_s = 0.3;
  Server s(o);
  s.start();
  auto eng = make_ucx_client([](std::function<void()> fn) { fn(); });
  auto st = eng->stream();
  std::promise<std::string> connected, got;
  st->connect("127.0.0.1", std::to_string(s.port()), [&](const std::string& e, std::size_t) { connected.set_value(e); });
  ASSERT_EQ(connected.get_future().get(), "");
  std::array<std::byte, kHeaderBytes> buf{};
  st->read(buf.data(), buf.size(), [&](const std::string& e, std::size_t) { got.set_value(e); });
  auto f = got.get_future();
  ASSERT_EQ(f.wait_for(std::chrono::seconds(5)), std::future_status::ready) << "a silent UCX peer was not dropped";
  EXPECT_FALSE(f.get().empty());
  st.reset();
  eng.reset();
}

TEST(OffloadEndToEnd, OutOfCapacityWhileOthersServed) {
  // 1 MiB of KV per client: client A overflows and gets a clear error; client B is unaffected.
  auto s = test::start_server(std::size_t{8} << 20, std::size_t{1} << 20);
  ClientOptions co;
  co.servers = {test::addr(*s)};
  co.token = test::kToken;
  Client a(co), b(co);
  const Model m{1, 4, 4, 64, DType::f32};
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  test::DenseKv kv(rng, m.dtype, m.kv_heads, m.head_dim, {4096});
  a.open({1, 1, 4, 64, DType::f32}).get();
  try {
    a.append(1, 0, kv.k_at(0, 0), kv.v_at(0, 0), 4096).get();
    FAIL() << "expected out of capacity";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_capacity) << e.what();
    EXPECT_NE(std::string(e.what()).find("out of capacity"), std::string::npos);
  }
  run_decode(b, m, rng, {200}, 1, 1, 7);
  // A's sequence is marked unknown after the failed append: it must be dropped, never answered wrongly.
  std::vector<DecodeQuery> qs{{1, 1}};
  std::vector<float> q(4 * 64), o(q.size()), lse(4);
  EXPECT_THROW(a.attend(0, 4, 64, qs, q.data(), o.data(), lse.data()).get(), Error);
  a.drop(1).get();
}

TEST(OffloadEndToEnd, WrongTokenRefused) {
  auto s = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*s)};
  co.token = "not-the-token-at-all";
  co.timeout = 5s;
  Client c(co);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    c.open({1, 1, 1, 64, DType::bf16}).get();
    FAIL() << "expected unauthorized";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unauthorized) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);  // refused at once, not retried
}

TEST(OffloadEndToEnd, MetricsOverHttp) {
  auto s = test::start_server(std::size_t{64} << 20, 0, "127.0.0.1:0");
  ClientOptions co;
  co.servers = {test::addr(*s)};
  co.token = test::kToken;
  Client c(co);
  std::mt19937_64 rng(1);
  run_decode(c, Model{1, 2, 1, 32, DType::bf16}, rng, {40}, 1, 1, 1);
  const std::string via_protocol = c.server_stats(0).get();
  EXPECT_NE(via_protocol.find("longattn_offload_requests_total{type=\"attend\"} 1"), std::string::npos) << via_protocol;

  const auto resp = test::http(s->metrics_port(), "GET", "/metrics");
  EXPECT_NE(resp.status_line.find("200 OK"), std::string::npos) << resp.status_line;
  EXPECT_NE(resp.body.find("longattn_offload_kernel_gbps"), std::string::npos);
  EXPECT_NE(resp.body.find("longattn_offload_bytes_received_total"), std::string::npos);
  EXPECT_NE(resp.body.find("longattn_offload_errors_total{kind=\"protocol\"}"), std::string::npos);
}

}  // namespace
}  // namespace longattn::offload
