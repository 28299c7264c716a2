// Refill of a restarted server from its replicas (ClientOptions::replicas = 2): a daemon killed
// with SIGKILL in the middle of a decode and restarted empty on the same port is refilled by the
// client while the decode goes on, and every answer still equals the double reference. Once it
// serves again, its admin listing shows every sequence it should hold with the token counts the
// client sent, and with the other copy killed it alone answers correctly. refill() is the same
// thing on demand, and says clearly when it cannot be done; offload_decode --replicas 2 --check
// goes on through a restart of one of its servers.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <future>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio.hpp>

#include "daemon_process.hpp"
#include "http_request.hpp"
#include "longattn/error.hpp"
#include "longattn/offload_client.hpp"
#include "offload/attend_plan.hpp"
#include "offload/replica_set.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

int free_port() {
  boost::asio::io_context io;
  boost::asio::ip::tcp::acceptor a(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

// Daemons on fixed ports (protocol and admin), so that one can be killed and started again where
// the client looks for it.
struct Servers {
  test::TempDir dir;
  std::string token_file;
  std::vector<int> ports, admin_ports;
  std::vector<std::unique_ptr<test::Daemon>> daemons;
  int starts = 0;

  explicit Servers(int n) : token_file(test::write_token_file(dir, test::kToken)) {
    for (int i = 0; i < n; ++i) {
      ports.push_back(free_port());
      admin_ports.push_back(free_port());
      daemons.emplace_back();
      start(i);
    }
  }
  void start(int i) {
    const auto at = static_cast<std::size_t>(i);
    daemons[at] = std::make_unique<test::Daemon>(
        std::vector<std::string>{"--listen", "127.0.0.1:" + std::to_string(ports[at]), "--metrics-listen",
                                 "127.0.0.1:" + std::to_string(admin_ports[at]), "--token-file", token_file, "--threads", "1",
                                 "--memory-limit", "64M"},
        dir.file("stderr" + std::to_string(starts++)));
    ASSERT_EQ(daemons[at]->port(), ports[at]) << "server " << i << " did not start on its port";
  }
  void kill(int i) {
    auto& d = *daemons[static_cast<std::size_t>(i)];
    ::kill(d.pid(), SIGKILL);
    d.wait_exit(5s);
  }
  std::vector<std::string> addresses() const {
    std::vector<std::string> out;
    for (int p : ports) out.push_back("127.0.0.1:" + std::to_string(p));
    return out;
  }
  // Server-side sequence id -> tokens held summed over layers, from GET /admin/sequences.
  std::map<std::uint64_t, std::size_t> listing(int i) const {
    const auto reply = test::http(admin_ports[static_cast<std::size_t>(i)], "GET", "/admin/sequences", test::kToken);
    EXPECT_NE(reply.status_line.find("200"), std::string::npos) << reply.status_line;
    std::map<std::uint64_t, std::size_t> out;
    std::istringstream in(reply.body);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      std::istringstream f(line);
      std::uint64_t client = 0, seq = 0, layers = 0, token_layers = 0;
      f >> client >> seq >> layers >> token_layers;
      out[seq] = token_layers;
    }
    return out;
  }
};

// A decode of B sequences over `layers` layers: each step appends one token per sequence and layer
// to every copy, then attends every layer and compares with the double reference.
struct Decode {
  static constexpr int layers = 2, q_heads = 4, kv_heads = 2, head_dim = 32, max_steps = 1000;
  std::mt19937_64& rng;
  Client& client;
  std::vector<std::int64_t> lens;
  std::vector<test::DenseKv> kv;
  int steps = 0;

  // Long enough prompts that copying them takes longer than a decode step, so that steps append
  // while a refill runs.
  Decode(std::mt19937_64& r, Client& c) : rng(r), client(c) {
    std::uniform_int_distribution<std::int64_t> len(1000, 2000);
    for (int s = 0; s < 5; ++s) lens.push_back(len(rng));
    std::vector<std::int64_t> most = lens;
    for (auto& l : most) l += max_steps;
    for (int l = 0; l < layers; ++l) kv.emplace_back(rng, DType::bf16, kv_heads, head_dim, most);
    for (std::size_t s = 0; s < lens.size(); ++s) client.open({s + 1, layers, kv_heads, head_dim, DType::bf16}).get();
    for (int l = 0; l < layers; ++l)
      for (std::size_t s = 0; s < lens.size(); ++s) client.append(s + 1, l, kv[l].k_at(s, 0), kv[l].v_at(s, 0), lens[s]).get();
  }

  // One token more for every sequence and layer; "" or what went wrong.
  std::string grow() {
    if (steps == max_steps) return "the test ran out of steps";
    ++steps;
    try {
      for (int l = 0; l < layers; ++l)
        for (std::size_t s = 0; s < lens.size(); ++s) client.append(s + 1, l, kv[l].k_at(s, lens[s]), kv[l].v_at(s, lens[s]), 1).get();
      for (auto& x : lens) ++x;
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }

  // One decode step (grow, then attend every layer); "" when every answer matched, else what
  // went wrong.
  std::string step() {
    if (auto grown = grow(); !grown.empty()) return grown;
    const std::size_t B = lens.size();
    std::uniform_real_distribution<float> val(-1, 1);
    try {
      std::vector<DecodeQuery> qs;
      for (std::size_t s = 0; s < B; ++s) qs.push_back({s + 1, 1});
      std::vector<float> q(B * q_heads * head_dim), o(q.size()), lse(B * q_heads), o_ref, lse_ref;
      for (auto& x : q) x = val(rng);
      for (int l = 0; l < layers; ++l) {
        client.attend(l, q_heads, head_dim, qs, q.data(), o.data(), lse.data()).get();
        test::reference_decode(kv[l], lens, std::vector<int>(B, 1), q_heads, q, o_ref, lse_ref);
        if (test::max_abs_diff(o, o_ref) > 1e-4 || test::max_abs_diff(lse, lse_ref) > 1e-4)
          return "wrong answer at step " + std::to_string(steps) + " layer " + std::to_string(l);
      }
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }

  // What server `server` of `servers` should list once complete: every piece it holds a copy of
  // (replicas 2: primary p is kept on p and p + 1), with its tokens summed over layers.
  std::map<std::uint64_t, std::size_t> expected_on(int server, int servers, std::int64_t shard_tokens) const {
    const ShardLayout layout{shard_tokens, static_cast<std::size_t>(servers)};
    std::map<std::uint64_t, std::size_t> out;
    for (std::size_t s = 0; s < lens.size(); ++s) {
      const std::uint64_t id = s + 1;
      const int home = static_cast<int>(id % static_cast<std::uint64_t>(servers));
      for (std::uint64_t k = 0; k < layout.shards_for(lens[s]); ++k) {
        const int primary = layout.server_of(home, k);
        if (primary != server && (primary + 1) % servers != server) continue;
        out[server_seq_id(id, k)] = static_cast<std::size_t>(layers * layout.tokens_in(lens[s], k));
      }
    }
    return out;
  }
};

void restarted_server_is_refilled(int n, std::int64_t shard_tokens) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const int victim = 1, other = 0;
  Servers servers(n);
  ClientOptions co;
  co.servers = servers.addresses();
  co.token = test::kToken;
  co.timeout = 3s;
  co.replicas = 2;
  co.shard_tokens = shard_tokens;
  Client c(co);
  Decode d(rng, c);
  for (int i = 0; i < 2; ++i) ASSERT_EQ(d.step(), "");
  servers.kill(victim);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(d.step(), "") << "after the kill";
  EXPECT_FALSE(c.serving(victim));
  servers.start(victim);  // empty, on the same port
  const auto t0 = std::chrono::steady_clock::now();
  // Appends run while the refill copies (the reference check is slower than a refill), so some
  // of them reach the server only after its copied tokens.
  while (!c.serving(victim) && std::chrono::steady_clock::now() - t0 < 20s) {
    for (int i = 0; i < 8; ++i) ASSERT_EQ(d.grow(), "") << "while it is refilled";
    ASSERT_EQ(d.step(), "") << "while it is refilled";
  }
  ASSERT_TRUE(c.serving(victim)) << "not refilled within 20 s";
  EXPECT_EQ(c.stats().refills, 1u);
  for (int i = 0; i < 2; ++i) ASSERT_EQ(d.step(), "") << "after the refill";

  // Everything it should hold, with the client's token counts (those of the last step included,
  // which went to both copies).
  const auto expected = d.expected_on(victim, n, shard_tokens);
  ASSERT_FALSE(expected.empty());
  EXPECT_EQ(servers.listing(victim), expected);
  EXPECT_EQ(servers.listing(other), d.expected_on(other, n, shard_tokens));

  // With the other copy gone, the pieces they shared are read from the refilled server alone.
  servers.kill(other);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(d.step(), "") << "served by the refilled server";
  EXPECT_TRUE(c.serving(victim));
  EXPECT_FALSE(c.serving(other));
}

TEST(OffloadRefill, RestartedServerIsRefilledWhileDecoding) { restarted_server_is_refilled(2, 0); }

TEST(OffloadRefill, RestartedServerGetsItsTokenRangesBack) { restarted_server_is_refilled(3, 32); }

TEST(OffloadRefill, RefillOnDemand) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Servers servers(2);
  ClientOptions co;
  co.servers = servers.addresses();
  co.token = test::kToken;
  co.timeout = 2s;
  co.replicas = 2;
  Client c(co);
  Decode d(rng, c);
  ASSERT_EQ(d.step(), "");
  c.refill(1).get();  // complete already: nothing to do
  EXPECT_EQ(c.stats().refills, 0u);

  servers.kill(1);
  ASSERT_EQ(d.step(), "");
  try {
    c.refill(1).get();
    ADD_FAILURE() << "a refill of a server that is down succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("refill of server " + co.servers[1] + " failed"), std::string::npos) << e.what();
  }
  servers.start(1);
  auto refilled = c.refill(1);
  while (refilled.wait_for(0s) != std::future_status::ready) ASSERT_EQ(d.grow(), "") << "while it is refilled";
  refilled.get();
  EXPECT_TRUE(c.serving(1));
  ASSERT_EQ(d.step(), "");
  EXPECT_EQ(servers.listing(1), d.expected_on(1, 2, 0));
  servers.kill(0);
  for (int i = 0; i < 2; ++i) ASSERT_EQ(d.step(), "") << "served by the refilled server";

  for (int bad : {-1, 2}) {
    try {
      (void)c.refill(bad);
      ADD_FAILURE() << "refill(" << bad << ") accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("no server"), std::string::npos) << e.what();
    }
  }
  ClientOptions single = co;
  single.replicas = 1;
  Client one(single);
  try {
    (void)one.refill(0);
    ADD_FAILURE() << "refill without replicas accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no replica to refill from"), std::string::npos) << e.what();
  }
}

// The states behind it: a refilling server takes no reads until its refill is finished, and a
// failure while refilling sends it back to incomplete.
TEST(OffloadRefill, RefillingServerTakesNoReads) {
  ReplicaSet r({"a:1", "b:1", "c:1"}, 2);
  EXPECT_FALSE(r.begin_refill(0));  // complete: nothing to refill
  EXPECT_TRUE(r.mark_incomplete(0));
  EXPECT_TRUE(r.holds(0, 2));
  EXPECT_FALSE(r.holds(0, 1));
  EXPECT_EQ(r.reader(0), 1);
  EXPECT_TRUE(r.begin_refill(0));
  EXPECT_FALSE(r.begin_refill(0));
  EXPECT_EQ(r.state(0), CopyState::refilling);
  EXPECT_EQ(r.reader(0), 1);
  EXPECT_EQ(r.complete_holders(2), (std::vector<int>{2}));
  EXPECT_FALSE(r.mark_incomplete(0));  // not news: it was not serving
  EXPECT_FALSE(r.finish_refill(0));    // it failed meanwhile
  EXPECT_EQ(r.reader(0), 1);
  EXPECT_TRUE(r.begin_refill(0));
  EXPECT_TRUE(r.finish_refill(0));
  EXPECT_EQ(r.reader(0), 0);
  EXPECT_EQ(r.complete_holders(2), (std::vector<int>{2, 0}));
}

#ifdef LONGATTN_OFFLOAD_DECODE_PROGRAM
// The same through the decode program: offload_decode --replicas 2 --check runs while one of its
// servers is killed and started again; the program logs the failure and the refill, and its check
// passes. The replica answered export requests and the restarted server took appends.
TEST(OffloadRefill, DecodeProgramGoesOnThroughARestart) {
  Servers servers(2);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  const auto addresses = servers.addresses();
  const std::string cmd = std::string(LONGATTN_OFFLOAD_DECODE_PROGRAM) + " --servers " + addresses[0] + "," + addresses[1] +
                          " --token-file " + servers.token_file + " --layers 2 --batch 4 --context 64 --steps 1500 --heads 4" +
                          " --kv-heads 2 --head-dim 16 --replicas 2 --timeout-ms 3000 --check --seed " + std::to_string(seed % 1000000) +
                          " 2>&1";
  std::string output;
  int status = -1;
  std::thread program([&] {
    std::FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return;
    char buf[4096];
    while (std::fgets(buf, sizeof buf, p)) output += buf;
    const int st = ::pclose(p);
    status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  });
  // Kill once the decode is under way (server 1 has answered attends), not after a fixed pause: a
  // fast machine finishes a short decode before any pause a slow one needs; 1500 steps leave most
  // of the decode to run through the failure and the refill.
  const auto started = std::chrono::steady_clock::now();
  const std::regex attends(R"(longattn_offload_attend_queries_total ([0-9]+))");
  for (;;) {
    std::smatch m;
    const auto metrics = test::http(servers.admin_ports[1], "GET", "/metrics").body;
    if (std::regex_search(metrics, m, attends) && std::stoull(m[1].str()) > 0) break;
    if (std::chrono::steady_clock::now() - started > 60s) {
      ADD_FAILURE() << "the decode never reached server 1 within 60 s";  // the kill below still ends the run
      break;
    }
    std::this_thread::sleep_for(10ms);
  }
  servers.kill(1);
  std::this_thread::sleep_for(200ms);
  servers.start(1);
  program.join();
  ASSERT_EQ(status, 0) << cmd << "\n" << output;
  EXPECT_NE(output.find("server " + addresses[1] + " failed"), std::string::npos) << output;
  EXPECT_NE(output.find("server " + addresses[1] + " refilled"), std::string::npos) << output;
  const auto at = output.rfind("RESULT {");
  ASSERT_NE(at, std::string::npos) << output;
  EXPECT_NE(output.find("\"checked\":true", at), std::string::npos) << output.substr(at);
  const auto replica = test::http(servers.admin_ports[0], "GET", "/metrics").body;
  const auto restarted = test::http(servers.admin_ports[1], "GET", "/metrics").body;
  EXPECT_TRUE(std::regex_search(replica, std::regex(R"(requests_total\{type="export"\} [1-9])"))) << replica;
  EXPECT_TRUE(std::regex_search(restarted, std::regex(R"(requests_total\{type="append"\} [1-9])"))) << restarted;
}
#endif

}  // namespace
}  // namespace longattn::offload
