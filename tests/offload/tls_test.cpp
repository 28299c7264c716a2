// TLS on the offload protocol: a decode over TLS (and over mutual TLS) equals the reference;
// handshakes with an untrusted, an expired or a missing certificate are refused quickly with a
// clear error on the client's side and a clear log line (and a counter) on the server's side;
// inconsistent TLS flags stop the daemon with one line. Certificates are made by the test.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "daemon_process.hpp"
#include "http_request.hpp"
#include "longattn/offload_client.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"
#include "tls_certificates.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

std::unique_ptr<Server> start_tls_server(const test::TestPki& pki, const std::string& cert, bool require_client_cert) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = test::kToken;
  o.io_threads = 2;
  o.compute_threads = 2;
  o.memory_limit = std::size_t{64} << 20;
  o.tls.cert_file = pki.file(cert + ".pem");
  o.tls.key_file = pki.file(cert + ".key");
  if (require_client_cert) {
    o.tls.ca_file = pki.file("ca.pem");
    o.tls.require_client_cert = true;
  }
  auto s = std::make_unique<Server>(o);
  s->start();
  return s;
}

ClientOptions tls_client(const test::TestPki& pki, int port, const std::string& client_cert) {
  ClientOptions co;
  co.servers = {"127.0.0.1:" + std::to_string(port)};
  co.token = test::kToken;
  co.timeout = 5s;
  co.tls.enabled = true;
  co.tls.ca_file = pki.file("ca.pem");
  if (!client_cert.empty()) {
    co.tls.cert_file = pki.file(client_cert + ".pem");
    co.tls.key_file = pki.file(client_cert + ".key");
  }
  return co;
}

// Prefill and a few decode steps over `c`, every attend checked against the double reference.
void decode_and_check(Client& c, std::mt19937_64& rng) {
  const int q_heads = 4, kv_heads = 2, head_dim = 32, steps = 3;
  const std::vector<std::int64_t> prefill = {45, 130};
  std::vector<std::int64_t> final_lens = prefill;
  for (auto& l : final_lens) l += steps;
  test::DenseKv kv(rng, DType::bf16, kv_heads, head_dim, final_lens);
  for (std::size_t s = 0; s < prefill.size(); ++s) {
    c.open({s + 1, 1, kv_heads, head_dim, DType::bf16}).get();
    c.append(s + 1, 0, kv.k_at(s, 0), kv.v_at(s, 0), prefill[s]).get();
  }
  std::vector<std::int64_t> lens = prefill;
  std::uniform_real_distribution<float> val(-1, 1);
  for (int step = 0; step < steps; ++step) {
    for (std::size_t s = 0; s < lens.size(); ++s) c.append(s + 1, 0, kv.k_at(s, lens[s]), kv.v_at(s, lens[s]), 1).get();
    for (auto& l : lens) ++l;
    const std::vector<DecodeQuery> qs = {{1, 1}, {2, 1}};
    std::vector<float> q(2 * q_heads * head_dim), o(q.size()), lse(2 * q_heads), o_ref, lse_ref;
    for (auto& x : q) x = val(rng);
    c.attend(0, q_heads, head_dim, qs, q.data(), o.data(), lse.data()).get();
    test::reference_decode(kv, lens, {1, 1}, q_heads, q, o_ref, lse_ref);
    ASSERT_LT(test::max_abs_diff(o, o_ref), 1e-4) << "step " << step;
    ASSERT_LT(test::max_abs_diff(lse, lse_ref), 1e-4) << "step " << step;
  }
}

// The error of the first request of a client, and how long it took to come.
std::pair<std::string, std::chrono::milliseconds> first_error(const ClientOptions& co) {
  Client c(co);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    c.open({7, 1, 1, 32, DType::bf16}).get();
  } catch (const Error& e) {
    return {e.what(), std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)};
  }
  return {"", 0ms};
}

std::uint64_t handshake_failures(const Server& s) {
  const std::string text = s.metrics_text();
  const std::string key = "\nlongattn_offload_tls_handshake_failures_total ";
  const auto at = text.find(key);
  return at == std::string::npos ? ~0ull : std::stoull(text.substr(at + key.size()));
}

TEST(OffloadTls, DecodeOverTlsEqualsReference) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  auto server = start_tls_server(pki, "server", false);
  Client c(tls_client(pki, server->port(), ""));
  decode_and_check(c, rng);
  EXPECT_EQ(handshake_failures(*server), 0u);
}

TEST(OffloadTls, DecodeOverMutualTlsEqualsReference) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  auto server = start_tls_server(pki, "server", true);
  auto co = tls_client(pki, server->port(), "client");
  co.tls.server_name = "localhost";  // a DNS name of the certificate instead of the address
  Client c(co);
  decode_and_check(c, rng);
}

TEST(OffloadTls, ClientRefusesUntrustedOrExpiredServerCertificate) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  for (const std::string cert : {"stranger", "expired"}) {
    SCOPED_TRACE(cert);
    auto server = start_tls_server(pki, cert, false);
    const auto [error, took] = first_error(tls_client(pki, server->port(), ""));
    EXPECT_NE(error.find("certificate verify failed"), std::string::npos) << error;
    EXPECT_NE(error.find(cert == "expired" ? "certificate has expired" : "unable to get local issuer certificate"), std::string::npos) << error;
    EXPECT_NE(error.find("not trusted"), std::string::npos) << error;
    EXPECT_LT(took, 3s) << "a refused handshake is not retried until the timeout";
    EXPECT_GE(handshake_failures(*server), 1u);
  }
}

TEST(OffloadTls, ClientRefusesACertificateForAnotherName) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  auto server = start_tls_server(pki, "server", false);
  auto co = tls_client(pki, server->port(), "");
  co.tls.server_name = "offload.example.org";
  const auto [error, took] = first_error(co);
  EXPECT_NE(error.find("certificate verify failed"), std::string::npos) << error;
}

TEST(OffloadTls, TlsClientToPlainServerSaysSo) {
  auto server = test::start_server();
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  const auto [error, took] = first_error(tls_client(pki, server->port(), ""));
  EXPECT_NE(error.find("does not speak TLS"), std::string::npos) << error;
  EXPECT_LT(took, 3s);
}

TEST(OffloadTls, PlainClientToTlsServerIsToldAboutTls) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  auto server = start_tls_server(pki, "server", false);
  auto co = tls_client(pki, server->port(), "");
  co.tls = {};
  co.timeout = 2s;
  const auto [error, took] = first_error(co);
  EXPECT_NE(error.find("turn TLS on in the client"), std::string::npos) << error;
  EXPECT_GE(handshake_failures(*server), 1u);
}

// Mutual TLS against the daemon: both sides' messages.
TEST(OffloadTls, MutualTlsRefusesMissingUntrustedAndExpiredClientCertificates) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  const std::string token_file = test::write_token_file(dir, test::kToken);
  test::Daemon d({"--listen", "127.0.0.1:0", "--token-file", token_file, "--threads", "1", "--tls-cert", pki.file("server.pem"),
                  "--tls-key", pki.file("server.key"), "--tls-ca", pki.file("ca.pem"), "--tls-require-client-cert"},
                 dir.file("stderr"));
  ASSERT_GT(d.port(), 0) << d.stderr_text();
  struct Case {
    std::string cert, client_says, server_says;
  };
  const std::vector<Case> cases = {{"", "requires a client certificate", "the client sent no certificate"},
                                   {"stranger", "refused this client's certificate", "not signed by --tls-ca"},
                                   {"expired", "refused this client's certificate", "certificate has expired"}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.cert.empty() ? "no certificate" : c.cert);
    const auto [error, took] = first_error(tls_client(pki, d.port(), c.cert));
    EXPECT_NE(error.find(c.client_says), std::string::npos) << error;
    EXPECT_LT(took, 3s);
    // The server logs at most one refusal a second.
    std::this_thread::sleep_for(1100ms);
  }
  std::this_thread::sleep_for(200ms);
  const std::string log = d.stderr_text();
  for (const auto& c : cases) EXPECT_NE(log.find(c.server_says), std::string::npos) << log;
  // A client with the right certificate is still served.
  Client ok(tls_client(pki, d.port(), "client"));
  EXPECT_NO_THROW(ok.open({1, 1, 1, 32, DType::bf16}).get());
}

// The metrics stay plain HTTP on their own port, next to a TLS protocol port; a bare port number
// binds loopback.
TEST(OffloadTls, MetricsStayOnTheirOwnLoopbackPort) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.token = test::kToken;
  o.metrics_listen = "0";
  o.tls.cert_file = pki.file("server.pem");
  o.tls.key_file = pki.file("server.key");
  Server s(o);
  s.start();
  ASSERT_GT(s.metrics_port(), 0);
  EXPECT_NE(s.metrics_port(), s.port());
  const auto r = test::http(s.metrics_port(), "GET", "/metrics");
  EXPECT_NE(r.status_line.find("200"), std::string::npos) << r.status_line;
  EXPECT_NE(r.body.find("longattn_offload_tls_handshake_failures_total"), std::string::npos);
}

TEST(OffloadTls, DaemonRefusesInconsistentTlsFlags) {
  test::TempDir dir;
  test::TestPki pki(dir.path.string());
  const std::string token_file = test::write_token_file(dir, test::kToken);
  struct Case {
    std::vector<std::string> flags;
    std::string says;
  };
  const std::vector<Case> cases = {
      {{"--tls-cert", pki.file("server.pem"), "--tls-key", pki.file("server.key"), "--tls-require-client-cert"}, "needs --tls-ca"},
      {{"--tls-cert", pki.file("server.pem")}, "--tls-key"},
      {{"--tls-key", pki.file("server.key")}, "need --tls-cert"},
      {{"--tls-cert", pki.file("server.pem"), "--tls-key", pki.file("client.key")}, "does not belong to the certificate"},
      {{"--tls-cert", dir.file("missing.pem"), "--tls-key", pki.file("server.key")}, "cannot load the TLS certificate chain"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = {"--listen", "127.0.0.1:0", "--token-file", token_file};
    args.insert(args.end(), c.flags.begin(), c.flags.end());
    test::Daemon d(args, dir.file("stderr"));
    EXPECT_EQ(d.port(), 0);
    EXPECT_EQ(d.wait_exit(5s), 2);
    const std::string err = d.stderr_text();
    EXPECT_NE(err.find(c.says), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
}

}  // namespace
}  // namespace longattn::offload
