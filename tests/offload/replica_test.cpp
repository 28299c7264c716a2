// KV replication (ClientOptions::replicas): with two copies, a server killed with SIGKILL in the
// middle of a decode loses nothing (every later answer still equals the double reference, reads
// fail over to the copy), through append + attend and through append_attend; with one copy the
// same kill gives a clear error naming the server, and losing both copies says so. Servers are
// real daemons, so the kill is a real crash.
#include <gtest/gtest.h>

#include <signal.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "longattn/error.hpp"
#include "daemon_process.hpp"
#include "longattn/offload_client.hpp"
#include "offload/replica_set.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

struct Servers {
  test::TempDir dir;
  std::vector<std::unique_ptr<test::Daemon>> daemons;
  explicit Servers(int n) {
    const std::string token = test::write_token_file(dir, test::kToken);
    for (int i = 0; i < n; ++i)
      daemons.push_back(std::make_unique<test::Daemon>(
          std::vector<std::string>{"--listen", "127.0.0.1:0", "--token-file", token, "--threads", "1", "--memory-limit", "64M"},
          dir.file("stderr" + std::to_string(i))));
  }
  std::vector<std::string> addresses() const {
    std::vector<std::string> out;
    for (const auto& d : daemons) out.push_back("127.0.0.1:" + std::to_string(d->port()));
    return out;
  }
  void kill(int i) {
    ::kill(daemons[static_cast<std::size_t>(i)]->pid(), SIGKILL);
    daemons[static_cast<std::size_t>(i)]->wait_exit(5s);
  }
};

// A decode loop over `c` whose every attend is checked against the reference; before step
// `kill_at` (after that step's appends, so the kill lands between a write and a read) it calls
// `kill`. Returns the first error, or "" when every step passed.
std::string decode(Client& c, std::mt19937_64& rng, int steps, int kill_at, const std::function<void()>& kill) {
  const int layers = 2, q_heads = 4, kv_heads = 2, head_dim = 32;
  std::uniform_int_distribution<std::int64_t> len(20, 120);
  std::vector<std::int64_t> lens;
  for (int s = 0; s < 5; ++s) lens.push_back(len(rng));
  std::vector<std::int64_t> final_lens = lens;
  for (auto& l : final_lens) l += steps;
  std::vector<test::DenseKv> kv;
  for (int l = 0; l < layers; ++l) kv.emplace_back(rng, DType::bf16, kv_heads, head_dim, final_lens);
  const std::size_t B = lens.size();
  std::uniform_real_distribution<float> val(-1, 1);
  try {
    for (std::size_t s = 0; s < B; ++s) c.open({s + 1, layers, kv_heads, head_dim, DType::bf16}).get();
    for (int l = 0; l < layers; ++l)
      for (std::size_t s = 0; s < B; ++s) c.append(s + 1, l, kv[l].k_at(s, 0), kv[l].v_at(s, 0), lens[s]).get();
    for (int step = 0; step < steps; ++step) {
      for (int l = 0; l < layers; ++l)
        for (std::size_t s = 0; s < B; ++s) c.append(s + 1, l, kv[l].k_at(s, lens[s]), kv[l].v_at(s, lens[s]), 1).get();
      for (auto& x : lens) ++x;
      if (step == kill_at) kill();
      std::vector<DecodeQuery> qs;
      for (std::size_t s = 0; s < B; ++s) qs.push_back({s + 1, 1});
      std::vector<float> q(B * q_heads * head_dim), o(q.size()), lse(B * q_heads), o_ref, lse_ref;
      for (auto& x : q) x = val(rng);
      for (int l = 0; l < layers; ++l) {
        c.attend(l, q_heads, head_dim, qs, q.data(), o.data(), lse.data()).get();
        test::reference_decode(kv[l], lens, std::vector<int>(B, 1), q_heads, q, o_ref, lse_ref);
        if (test::max_abs_diff(o, o_ref) > 1e-4 || test::max_abs_diff(lse, lse_ref) > 1e-4)
          return "wrong answer at step " + std::to_string(step) + " layer " + std::to_string(l);
      }
    }
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(OffloadReplicas, KilledServerLosesNothingWithTwoCopies) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (int victim = 0; victim < 3; ++victim) {
    SCOPED_TRACE(victim);
    Servers servers(3);
    ClientOptions co;
    co.servers = servers.addresses();
    co.token = test::kToken;
    co.timeout = 5s;
    co.replicas = 2;
    Client c(co);
    EXPECT_EQ(decode(c, rng, 6, 2, [&] { servers.kill(victim); }), "");
  }
}

TEST(OffloadReplicas, ShardedSequencesSurviveAKill) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Servers servers(3);
  ClientOptions co;
  co.servers = servers.addresses();
  co.token = test::kToken;
  co.timeout = 5s;
  co.replicas = 2;
  co.shard_tokens = 32;  // token ranges over the servers, each range on two of them
  Client c(co);
  EXPECT_EQ(decode(c, rng, 5, 1, [&] { servers.kill(1); }), "");
}

TEST(OffloadReplicas, WithoutReplicasAKillIsAClearError) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Servers servers(2);
  const auto addresses = servers.addresses();
  ClientOptions co;
  co.servers = addresses;
  co.token = test::kToken;
  co.timeout = 3s;
  Client c(co);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string error = decode(c, rng, 4, 1, [&] { servers.kill(1); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_NE(error.find("server " + addresses[1]), std::string::npos) << error;
  EXPECT_EQ(error.find("wrong answer"), std::string::npos) << error;
}

TEST(OffloadReplicas, LosingEveryCopySaysSo) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Servers servers(3);
  const auto addresses = servers.addresses();
  ClientOptions co;
  co.servers = addresses;
  co.token = test::kToken;
  co.timeout = 3s;
  co.replicas = 2;
  Client c(co);
  const std::string error = decode(c, rng, 4, 1, [&] {
    servers.kill(0);
    servers.kill(1);
  });
  EXPECT_NE(error.find("has failed"), std::string::npos) << error;
  EXPECT_EQ(error.find("wrong answer"), std::string::npos) << error;
}

// append_attend (one decode step of a layer in one call) with replicas: the new tokens reach every
// copy, and a server killed between two layers of a step loses nothing.
TEST(OffloadReplicas, AppendAttendKeepsEveryCopy) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Servers servers(3);
  ClientOptions co;
  co.servers = servers.addresses();
  co.token = test::kToken;
  co.timeout = 5s;
  co.replicas = 2;
  Client c(co);
  const int layers = 2, q_heads = 4, kv_heads = 2, head_dim = 32, steps = 4, B = 4;
  std::vector<std::int64_t> lens = {30, 64, 7, 101};
  std::vector<std::int64_t> final_lens = lens;
  for (auto& l : final_lens) l += steps;
  std::vector<test::DenseKv> kv;
  for (int l = 0; l < layers; ++l) kv.emplace_back(rng, DType::bf16, kv_heads, head_dim, final_lens);
  for (int s = 0; s < B; ++s) c.open({static_cast<std::uint64_t>(s + 1), layers, kv_heads, head_dim, DType::bf16}).get();
  for (int l = 0; l < layers; ++l)
    for (int s = 0; s < B; ++s) c.append(static_cast<std::uint64_t>(s + 1), l, kv[l].k_at(s, 0), kv[l].v_at(s, 0), lens[s]).get();
  std::vector<DecodeQuery> qs;
  for (int s = 0; s < B; ++s) qs.push_back({static_cast<std::uint64_t>(s + 1), 1});
  std::uniform_real_distribution<float> val(-1, 1);
  const std::size_t row = kv[0].row_bytes();
  for (int step = 0; step < steps; ++step) {
    for (auto& x : lens) ++x;
    for (int l = 0; l < layers; ++l) {
      if (step == 2 && l == 1) servers.kill(1);
      std::vector<std::byte> k(B * row), v(B * row);
      for (int s = 0; s < B; ++s) {
        std::memcpy(k.data() + s * row, kv[l].k_at(s, lens[s] - 1), row);
        std::memcpy(v.data() + s * row, kv[l].v_at(s, lens[s] - 1), row);
      }
      std::vector<float> q(B * q_heads * head_dim), o(q.size()), lse(B * q_heads), o_ref, lse_ref;
      for (auto& x : q) x = val(rng);
      c.append_attend(l, q_heads, head_dim, qs, q.data(), k.data(), v.data(), o.data(), lse.data()).get();
      test::reference_decode(kv[l], lens, std::vector<int>(B, 1), q_heads, q, o_ref, lse_ref);
      ASSERT_LT(test::max_abs_diff(o, o_ref), 1e-4) << "step " << step << " layer " << l;
      ASSERT_LT(test::max_abs_diff(lse, lse_ref), 1e-4) << "step " << step << " layer " << l;
    }
  }
}

TEST(OffloadReplicas, PlacementAndBadCounts) {
  ReplicaSet r({"a:1", "b:1", "c:1"}, 2);
  EXPECT_EQ(r.holders(2), (std::vector<int>{2, 0}));
  EXPECT_EQ(r.reader(2), 2);
  EXPECT_TRUE(r.mark_incomplete(2));
  EXPECT_FALSE(r.mark_incomplete(2));
  EXPECT_EQ(r.reader(2), 0);
  EXPECT_EQ(r.complete_holders(1), (std::vector<int>{1}));
  r.mark_incomplete(0);
  EXPECT_EQ(r.reader(2), -1);
  EXPECT_NE(r.describe_lost(2).find("c:1, a:1"), std::string::npos);
  for (int bad : {0, 4}) {
    try {
      ReplicaSet x({"a:1", "b:1", "c:1"}, bad);
      ADD_FAILURE() << "replicas " << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("between 1 and the number of servers"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace longattn::offload
