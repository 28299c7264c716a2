// With --replicas 2, every call on a client whose server was SIGKILLed while two micro-batches'
// append_attends were in flight completes within the client's timeout: the decode goes on over the
// surviving copy (answers equal the double reference), and server_stats of the dead server (what
// offload_decode asks at its end) fails with an Error instead of waiting forever. Repeated over
// fresh servers with the kill at a random point, because the failure races with requests in flight.
#include <gtest/gtest.h>

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "daemon_process.hpp"
#include "longattn/error.hpp"
#include "longattn/offload_client.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

constexpr auto kTimeout = 1500ms;
// How long past the client's timeout a call may take before it counts as hung: the timeout is
// measured from when the request was made, and a loaded machine delays the I/O thread.
constexpr auto kGrace = 3000ms;

// Waits for `f` (a deferred future too) at most kTimeout + kGrace. A call that does not complete
// would block this process for good, so the test reports it and exits at once.
template <class T>
T get_bounded(std::future<T>& f, const char* what) {
  auto runner = std::async(std::launch::async, [&f] { return f.get(); });
  if (runner.wait_for(kTimeout + kGrace) != std::future_status::ready) {
    std::fprintf(stderr, "FAIL: %s did not complete within the client's timeout (%lld ms) + %lld ms: the client hangs\n", what,
                 static_cast<long long>(kTimeout.count()), static_cast<long long>(kGrace.count()));
    std::fflush(stderr);
    std::_Exit(1);
  }
  return runner.get();
}

struct TwoServers {
  test::TempDir dir;
  std::vector<std::unique_ptr<test::Daemon>> daemons;
  TwoServers() {
    const std::string token = test::write_token_file(dir, test::kToken);
    for (int i = 0; i < 2; ++i)
      daemons.push_back(std::make_unique<test::Daemon>(
          std::vector<std::string>{"--listen", "127.0.0.1:0", "--token-file", token, "--threads", "1", "--memory-limit", "64M"},
          dir.file("stderr" + std::to_string(i))));
  }
  std::vector<std::string> addresses() const {
    return {"127.0.0.1:" + std::to_string(daemons[0]->port()), "127.0.0.1:" + std::to_string(daemons[1]->port())};
  }
  void kill(int i) {
    ::kill(daemons[static_cast<std::size_t>(i)]->pid(), SIGKILL);
    daemons[static_cast<std::size_t>(i)]->wait_exit(5s);
  }
};

// One round: 4 sequences in two micro-batches of 2, `steps` decode steps over 2 layers with both
// micro-batches' append_attend in flight at once; server `victim` is killed at step `kill_at`
// right after micro-batch 0's request left. Returns the first wrong answer, or "".
std::string round_with_kill(std::mt19937_64& rng, int victim, int steps, int kill_at) {
  const int layers = 2, q_heads = 4, kv_heads = 2, head_dim = 32, batch = 4, per_micro_batch = 2;
  TwoServers servers;
  ClientOptions co;
  co.servers = servers.addresses();
  co.token = test::kToken;
  co.timeout = kTimeout;
  co.replicas = 2;
  Client c(co);

  std::uniform_int_distribution<std::int64_t> len(20, 120);
  std::vector<std::int64_t> lens;
  for (int s = 0; s < batch; ++s) lens.push_back(len(rng));
  std::vector<std::int64_t> final_lens = lens;
  for (auto& l : final_lens) l += steps;
  std::vector<test::DenseKv> kv;
  for (int l = 0; l < layers; ++l) kv.emplace_back(rng, DType::bf16, kv_heads, head_dim, final_lens);
  for (int s = 0; s < batch; ++s) {
    auto opened = c.open({static_cast<std::uint64_t>(s + 1), layers, kv_heads, head_dim, DType::bf16});
    get_bounded(opened, "open");
    for (int l = 0; l < layers; ++l) {
      auto appended = c.append(static_cast<std::uint64_t>(s + 1), l, kv[l].k_at(s, 0), kv[l].v_at(s, 0), lens[s]);
      get_bounded(appended, "prefill append");
    }
  }

  std::uniform_real_distribution<float> val(-1, 1);
  const std::size_t row = kv[0].row_bytes();
  for (int step = 0; step < steps; ++step) {
    for (int l = 0; l < layers; ++l) {
      struct InFlight {
        std::vector<DecodeQuery> queries;
        std::vector<float> q, o, lse;
        std::vector<std::byte> k, v;
        std::future<void> answer;
      };
      std::vector<InFlight> mb(2);
      for (int m = 0; m < 2; ++m) {
        auto& f = mb[static_cast<std::size_t>(m)];
        for (int j = 0; j < per_micro_batch; ++j) {
          const int s = m * per_micro_batch + j;
          f.queries.push_back({static_cast<std::uint64_t>(s + 1), 1});
          f.k.insert(f.k.end(), kv[l].k_at(s, lens[s]), kv[l].k_at(s, lens[s]) + row);
          f.v.insert(f.v.end(), kv[l].v_at(s, lens[s]), kv[l].v_at(s, lens[s]) + row);
        }
        f.q.resize(static_cast<std::size_t>(per_micro_batch) * q_heads * head_dim);
        for (auto& x : f.q) x = val(rng);
        f.o.resize(f.q.size());
        f.lse.resize(static_cast<std::size_t>(per_micro_batch) * q_heads);
        f.answer = c.append_attend(l, q_heads, head_dim, f.queries, f.q.data(), f.k.data(), f.v.data(), f.o.data(), f.lse.data());
        if (m == 0 && step == kill_at && l == 0) servers.kill(victim);
      }
      for (int m = 0; m < 2; ++m) {
        auto& f = mb[static_cast<std::size_t>(m)];
        get_bounded(f.answer, "a replicated append_attend after the kill");
        std::vector<std::int64_t> mb_lens;
        for (int j = 0; j < per_micro_batch; ++j) mb_lens.push_back(lens[static_cast<std::size_t>(m * per_micro_batch + j)] + 1);
        test::DenseKv part = kv[l];  // the reference reads this micro-batch's sequences only
        part.k.assign(kv[l].k.begin() + m * per_micro_batch, kv[l].k.begin() + (m + 1) * per_micro_batch);
        part.v.assign(kv[l].v.begin() + m * per_micro_batch, kv[l].v.begin() + (m + 1) * per_micro_batch);
        part.kf.assign(kv[l].kf.begin() + m * per_micro_batch, kv[l].kf.begin() + (m + 1) * per_micro_batch);
        part.vf.assign(kv[l].vf.begin() + m * per_micro_batch, kv[l].vf.begin() + (m + 1) * per_micro_batch);
        std::vector<float> o_ref, lse_ref;
        test::reference_decode(part, mb_lens, std::vector<int>(per_micro_batch, 1), q_heads, f.q, o_ref, lse_ref);
        if (test::max_abs_diff(f.o, o_ref) > 1e-4 || test::max_abs_diff(f.lse, lse_ref) > 1e-4)
          return "wrong answer at step " + std::to_string(step) + " layer " + std::to_string(l) + " micro-batch " + std::to_string(m);
      }
    }
    for (auto& x : lens) ++x;
  }

  // What offload_decode does at its end: the servers' metrics. The dead server's must fail, every
  // time, within the timeout; the survivor's still answer.
  EXPECT_FALSE(c.serving(victim));
  EXPECT_TRUE(c.serving(1 - victim));
  for (int i = 0; i < 4; ++i) {
    auto dead = c.server_stats(victim);
    EXPECT_THROW(get_bounded(dead, "server_stats of the SIGKILLed server"), Error);
    auto alive = c.server_stats(1 - victim);
    EXPECT_NE(get_bounded(alive, "server_stats of the surviving server").find("longattn_offload_kv_bytes"), std::string::npos);
  }
  return "";
}

TEST(OffloadKilledReplica, EveryCallCompletesWithinTheTimeout) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> kill_at(0, 3);
  for (int round = 0; round < 4; ++round) {
    SCOPED_TRACE(round);
    const int victim = round % 2;
    EXPECT_EQ(round_with_kill(rng, victim, 6, kill_at(rng)), "");
  }
}

}  // namespace
}  // namespace longattn::offload
