// The offload server: accepts connections (TCP via Boost.Asio; UCX where built), authenticates
// them with the shared token, serves the protocol's requests from a KvStore, runs attends on a
// compute thread whose decode kernel uses the machine's cores, releases the KV of clients that
// vanished, exports Prometheus metrics and admin endpoints, and shuts down gracefully. Used by the longattn-offload-server daemon and, in process, by tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "offload/kv_store.hpp"
#include "offload/protocol.hpp"
#include "offload/tls_context.hpp"
#include "offload/transport.hpp"

namespace longattn::offload {

struct ServerOptions {
  std::string listen = "127.0.0.1:0";  // HOST:PORT; port 0 = an ephemeral port (see Server::port)
  std::string token;                    // the shared secret; required, never empty
  int io_threads = 2;
  int compute_threads = 0;  // decode kernel threads; 0 = all cores
  std::size_t memory_limit = std::size_t{1} << 30;
  std::size_t per_client_limit = 0;  // 0 = memory_limit
  int page_tokens = 64;
  std::string metrics_listen;  // HOST:PORT (or PORT alone: loopback) for GET /metrics; empty = off
  std::string transport = "tcp";
  int max_connections = 1024;     // authenticated connections; one more gets an out_of_capacity error at hello
  int max_unauthenticated = 64;   // connections still before hello; past it the oldest of them is closed
  double hello_timeout_s = 10;    // a connection must authenticate within this
  double frame_timeout_s = 60;    // a started frame (header and payload) must arrive completely within this
  double orphan_timeout_s = 60;   // sequences of a client id with no connection are dropped after this; 0 = never
  ServerTlsOptions tls;           // TLS on the protocol port (tcp only); off unless a certificate is given
  std::string device = "cpu";     // "cuda": KV in GPU memory, attends by the cuda backend (gpu_kv.hpp)
  Limits limits;
};

// Parses HOST:PORT ("[::1]:80" for IPv6); throws Error(invalid_argument).
std::pair<std::string, int> parse_host_port(const std::string& text);

class Server {
 public:
  explicit Server(ServerOptions opt);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds, starts the I/O and compute threads and returns. Throws on bind errors.
  void start();
  int port() const;          // the bound port
  int metrics_port() const;  // 0 when metrics are off
  // Graceful: stop accepting, answer new requests with an error, finish what is in flight, close.
  void shutdown();
  // Abrupt (tests: a crashed server): every connection is reset, nothing more is answered.
  void kill();
  // Blocks until the server has stopped (after shutdown or kill).
  void wait();

  std::string metrics_text() const;  // Prometheus exposition format
  std::string result_json() const;   // the RESULT line's object

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Constant-time comparison of secrets (no early exit on the first differing byte).
bool secrets_equal(const std::string& a, const std::string& b) noexcept;

}  // namespace longattn::offload
