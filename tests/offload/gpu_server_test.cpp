// `--device cuda` servers: where a GPU and the cuda backend exist, a GPU server's answers equal the
// CPU server's (and the double reference) for the same random KV and queries, causal positions
// and sharded token ranges included; where they do not, the daemon refuses `--device cuda` with
// one line saying why. Each case skips where the other applies.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "daemon_process.hpp"
#include "longattn/backend.hpp"
#include "longattn/offload_client.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

bool cuda_backend_here() {
  const auto names = available_backends();
  return std::find(names.begin(), names.end(), "cuda") != names.end();
}

std::unique_ptr<Server> start(const std::string& device) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = test::kToken;
  o.compute_threads = 2;
  o.memory_limit = std::size_t{512} << 20;
  o.device = device;
  auto s = std::make_unique<Server>(o);
  s->start();
  return s;
}

TEST(OffloadGpuServer, AnswersEqualTheCpuServer) {
  if (!cuda_backend_here()) GTEST_SKIP() << "no cuda backend in this build or no GPU on this machine";
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int q_heads = 8, kv_heads = 2, head_dim = 128;
  // One sequence long enough for the split-KV decode kernel, others short; two query rows per
  // sequence, so the causal mask between them matters.
  const std::vector<std::int64_t> lens = {5000, 37, 300};
  test::DenseKv kv(rng, DType::bf16, kv_heads, head_dim, lens);
  for (std::int64_t shard_tokens : {std::int64_t{0}, std::int64_t{1024}}) {
    SCOPED_TRACE(shard_tokens);
    auto cpu = start("cpu"), gpu = start("cuda");
    std::vector<std::vector<float>> o(2), lse(2);
    std::vector<float> q(lens.size() * 2 * q_heads * head_dim);
    std::uniform_real_distribution<float> val(-1, 1);
    for (auto& x : q) x = val(rng);
    const std::vector<DecodeQuery> qs = {{1, 2}, {2, 2}, {3, 2}};
    int which = 0;
    for (auto* server : {cpu.get(), gpu.get()}) {
      ClientOptions co;
      co.servers = {test::addr(*server)};
      co.token = test::kToken;
      co.shard_tokens = shard_tokens;
      Client c(co);
      for (std::size_t s = 0; s < lens.size(); ++s) {
        c.open({s + 1, 1, kv_heads, head_dim, DType::bf16}).get();
        c.append(s + 1, 0, kv.k_at(s, 0), kv.v_at(s, 0), lens[s]).get();
      }
      o[which].resize(q.size());
      lse[which].resize(lens.size() * 2 * q_heads);
      c.attend(0, q_heads, head_dim, qs, q.data(), o[which].data(), lse[which].data()).get();
      ++which;
    }
    std::vector<float> o_ref, lse_ref;
    test::reference_decode(kv, lens, {2, 2, 2}, q_heads, q, o_ref, lse_ref);
    EXPECT_LT(test::max_abs_diff(o[0], o_ref), 1e-4);
    // The GPU rounds q to bf16 before scoring: bf16 tolerance.
    EXPECT_LT(test::max_abs_diff(o[1], o[0]), 2e-2);
    EXPECT_LT(test::max_abs_diff(lse[1], lse[0]), 5e-2);
  }
}

TEST(OffloadGpuServer, RefusesGeometriesTheGpuCannotServe) {
  if (!cuda_backend_here()) GTEST_SKIP() << "no cuda backend in this build or no GPU on this machine";
  auto gpu = start("cuda");
  ClientOptions co;
  co.servers = {test::addr(*gpu)};
  co.token = test::kToken;
  Client c(co);
  try {
    c.open({1, 1, 2, 96, DType::bf16}).get();
    ADD_FAILURE() << "head_dim 96 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim"), std::string::npos) << e.what();
  }
  try {
    c.open({2, 1, 2, 128, DType::f32}).get();
    ADD_FAILURE() << "fp32 KV accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16 or fp16"), std::string::npos) << e.what();
  }
}

TEST(OffloadGpuServer, WithoutAGpuTheDaemonSaysSo) {
  if (cuda_backend_here()) GTEST_SKIP() << "a GPU is here: AnswersEqualTheCpuServer covers --device cuda";
  test::TempDir dir;
  const std::string token_file = test::write_token_file(dir, test::kToken);
  test::Daemon d({"--listen", "127.0.0.1:0", "--token-file", token_file, "--device", "cuda"}, dir.file("stderr"));
  EXPECT_EQ(d.port(), 0);
  EXPECT_EQ(d.wait_exit(5s), 2);
  const std::string err = d.stderr_text();
  EXPECT_NE(err.find("--device cuda needs a longattn built with CUDA"), std::string::npos) << err;
  EXPECT_NE(err.find("--device cpu"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  test::Daemon bad({"--listen", "127.0.0.1:0", "--token-file", token_file, "--device", "tpu"}, dir.file("stderr2"));
  EXPECT_EQ(bad.wait_exit(5s), 2);
  EXPECT_NE(bad.stderr_text().find("--device must be cpu or cuda"), std::string::npos) << bad.stderr_text();
}

}  // namespace
}  // namespace longattn::offload
