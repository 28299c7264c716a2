// KV of vanished clients: the sequences of a client id that has had no connection for
// --orphan-timeout are released (and counted in /metrics), so a killed client cannot keep memory
// from the others forever; 0 keeps them. Operators list and drop sequences over HTTP behind the
// token.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#include <thread>


#include "longattn/offload_client.hpp"
#include "http_request.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

std::unique_ptr<Server> start(double orphan_timeout_s, std::size_t memory_limit) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = test::kToken;
  o.io_threads = 2;
  o.compute_threads = 1;
  o.memory_limit = memory_limit;
  o.metrics_listen = "127.0.0.1:0";
  o.orphan_timeout_s = orphan_timeout_s;
  auto s = std::make_unique<Server>(o);
  s->start();
  return s;
}

ClientOptions options(const Server& s, std::uint64_t client_id) {
  ClientOptions co;
  co.servers = {test::addr(s)};
  co.token = test::kToken;
  co.client_id = client_id;
  co.timeout = 5s;
  return co;
}

// The value of an unlabelled metric.
double metric(const Server& s, const std::string& name) {
  const std::string text = s.metrics_text();
  const auto at = text.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + name.size() + 2));
}

// Polls until the metric has the value, or `within` has passed; returns the last value seen.
double wait_for_metric(const Server& s, const std::string& name, double want, std::chrono::milliseconds within) {
  const auto end = std::chrono::steady_clock::now() + within;
  double v = metric(s, name);
  while (v != want && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(20ms);
    v = metric(s, name);
  }
  return v;
}

// Fills one sequence of `tokens` random f32 tokens (1 layer, 4 kv heads x 64).
void fill(Client& c, std::uint64_t seq, std::uint32_t tokens, std::mt19937_64& rng) {
  test::DenseKv kv(rng, DType::f32, 4, 64, {static_cast<std::int64_t>(tokens)});
  c.open({seq, 1, 4, 64, DType::f32}).get();
  c.append(seq, 0, kv.k_at(0, 0), kv.v_at(0, 0), tokens).get();
}

using test::http;

TEST(OffloadOrphans, SequencesOfAVanishedClientAreReleasedAfterTheOrphanTimeout) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  // Room for one client's sequence (and the frame that brings it), not two.
  auto s = start(0.5, std::size_t{16} << 20);
  const std::uint32_t tokens = 2560 + static_cast<std::uint32_t>(rng() % 512);  // 5-6 MiB of f32 KV
  {
    Client gone(options(*s, 1 + rng() % 1000));
    fill(gone, rng() % (std::uint64_t{1} << 40), tokens, rng);
  }  // its connection closes, as when the process is killed
  EXPECT_EQ(wait_for_metric(*s, "longattn_offload_kv_sequences_orphaned", 1, 2000ms), 1);
  EXPECT_EQ(wait_for_metric(*s, "longattn_offload_kv_sequences", 0, 3000ms), 0) << "the orphaned sequence was not released";
  EXPECT_EQ(metric(*s, "longattn_offload_orphaned_sequences_released_total"), 1);
  EXPECT_EQ(metric(*s, "longattn_offload_kv_sequences_orphaned"), 0);
  Client next(options(*s, 2000 + rng() % 1000));
  fill(next, rng() % (std::uint64_t{1} << 40), tokens, rng);  // the memory is there again

  // A client that is still connected keeps its sequences however long it is idle.
  std::this_thread::sleep_for(1200ms);
  EXPECT_EQ(metric(*s, "longattn_offload_kv_sequences"), 1);
  EXPECT_EQ(metric(*s, "longattn_offload_kv_sequences_orphaned"), 0);
}

TEST(OffloadOrphans, ZeroOrphanTimeoutKeepsThem) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  auto s = start(0, std::size_t{64} << 20);
  {
    Client gone(options(*s, 1 + rng() % 1000));
    fill(gone, rng() % (std::uint64_t{1} << 40), 64 + static_cast<std::uint32_t>(rng() % 64), rng);
  }
  EXPECT_EQ(wait_for_metric(*s, "longattn_offload_kv_sequences_orphaned", 1, 2000ms), 1);
  std::this_thread::sleep_for(1000ms);
  EXPECT_EQ(metric(*s, "longattn_offload_kv_sequences"), 1);
  EXPECT_EQ(metric(*s, "longattn_offload_orphaned_sequences_released_total"), 0);
}

TEST(OffloadAdmin, ListAndDropSequencesBehindTheToken) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  auto s = start(0, std::size_t{64} << 20);
  const std::uint64_t client_id = 1 + rng() % 100000, seq_a = rng() % 100000, seq_b = seq_a + 1 + rng() % 100;
  Client c(options(*s, client_id));
  fill(c, seq_a, 16 + static_cast<std::uint32_t>(rng() % 64), rng);
  fill(c, seq_b, 16 + static_cast<std::uint32_t>(rng() % 64), rng);

  EXPECT_NE(http(s->metrics_port(), "GET", "/admin/sequences", "").status_line.find("401"), std::string::npos);
  EXPECT_NE(http(s->metrics_port(), "GET", "/admin/sequences", "not-the-token-at-all").status_line.find("401"), std::string::npos);
  EXPECT_NE(http(s->metrics_port(), "POST", "/admin/drop?client=" + std::to_string(client_id), "").status_line.find("401"),
            std::string::npos);
  EXPECT_EQ(metric(*s, "longattn_offload_kv_sequences"), 2) << "a request without the token dropped something";

  // The listing names the server's own sequence ids (a client may map its ids onto the servers').
  const auto listed = http(s->metrics_port(), "GET", "/admin/sequences", test::kToken);
  EXPECT_NE(listed.status_line.find("200"), std::string::npos) << listed.status_line;
  std::vector<std::string> server_seqs;
  std::istringstream lines(listed.body);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string client, seq, layers;
    fields >> client >> seq >> layers;
    if (client == std::to_string(client_id) && layers == "1") server_seqs.push_back(seq);
  }
  ASSERT_EQ(server_seqs.size(), 2u) << listed.body;

  const auto bad = http(s->metrics_port(), "POST", "/admin/drop?client=x", test::kToken);
  EXPECT_NE(bad.status_line.find("400"), std::string::npos) << bad.status_line;
  const auto one = http(s->metrics_port(), "POST", "/admin/drop?client=" + std::to_string(client_id) + "&seq=" + server_seqs[rng() % 2],
                        test::kToken);
  EXPECT_EQ(one.body, "dropped 1\n");
  EXPECT_EQ(metric(*s, "longattn_offload_kv_sequences"), 1);
  const auto rest = http(s->metrics_port(), "POST", "/admin/drop?client=" + std::to_string(client_id), test::kToken);
  EXPECT_EQ(rest.body, "dropped 1\n");
  EXPECT_EQ(metric(*s, "longattn_offload_kv_sequences"), 0);
  const std::string left = http(s->metrics_port(), "GET", "/admin/sequences", test::kToken).body;
  EXPECT_EQ(std::count(left.begin(), left.end(), '\n'), 1) << "only the heading line is left: " << left;
}

}  // namespace
}  // namespace longattn::offload
