// Attention offloading, the caller's side: a client that keeps decode KV caches on
// longattn-offload-server daemons and asks them for attention, and a LocalEngine that runs the
// same KV store and decode kernel in this process (single host, tests, benchmarks).
//
// The client is asynchronous (every call returns a std::future and copies its inputs before
// returning), shards KV over several servers (whole sequences by id; with shard_tokens, token
// ranges spread over the servers and joined with the LSE merge), reconnects, retries idempotent
// requests (open, attend, drop, stats) within the call's timeout, and never retries appends.
// With replicas, a failed server is refilled from the other copies once it answers again.
// When a server dies or hangs, the future holds Error(communication or timeout) within the
// timeout: never a wrong answer (attends name the KV length they expect), never a hang.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <future>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "longattn/tensor.hpp"

namespace longattn::offload {

// TLS on the tcp transport (docs/offload.md, "TLS"). The servers' certificates are checked
// against ca_file and must name the host of each server address (or server_name); cert_file and
// key_file present a client certificate to servers that require one (mutual TLS).
struct ClientTls {
  bool enabled = false;
  std::string ca_file;      // PEM CA certificates; empty = the system's trusted CAs
  std::string cert_file;    // PEM client certificate chain; empty = none
  std::string key_file;     // its private key
  std::string server_name;  // the name the servers' certificates must carry; empty = the host of each address
};

struct ClientOptions {
  std::vector<std::string> servers;  // "host:port", at least one
  std::string token;                 // the servers' shared secret
  std::uint64_t client_id = 0;       // namespace of sequence ids on the servers; 0 = random
  std::chrono::milliseconds timeout{10000};  // per call, retries included
  int retries = 2;                   // extra attempts of an idempotent request after a lost connection
  std::int64_t shard_tokens = 0;     // 0: a sequence lives on one server; N: tokens [kN, (k+1)N) on server (home + k)
  std::string transport = "tcp";
  ClientTls tls;                     // tcp only; the token is still sent, inside TLS
  // Copies of every piece of KV, on consecutive servers (1..servers): appends go to every copy,
  // attends to the first complete one, and fail over to the next when a server fails.
  int replicas = 1;
};

struct SequenceSpec {
  std::uint64_t id = 0;  // < 2^48
  int layers = 1, kv_heads = 1, head_dim = 64;
  DType dtype = DType::bf16;
};

// One sequence's decode queries inside a batch: q_count consecutive query rows, at the last
// q_count positions of what the sequence holds (causal among themselves when q_count > 1).
struct DecodeQuery {
  std::uint64_t seq = 0;
  int q_count = 1;
};

struct ClientStats {
  std::uint64_t requests = 0, retries = 0, bytes_sent = 0, bytes_received = 0, errors = 0;
  std::uint64_t refills = 0;  // servers brought back by a refill (replicas > 1)
};

class Client {
 public:
  explicit Client(ClientOptions opt);  // connects lazily; the first call authenticates
  // Fails what is still pending (Error(communication)), then waits until the cancelled transfers
  // have finished: after it returns, no attend writes to its o and lse any more.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  std::future<void> open(const SequenceSpec& spec);
  // k and v: [tokens, kv_heads, head_dim] of the sequence's dtype, appended to one layer.
  std::future<void> append(std::uint64_t seq, int layer, const void* k, const void* v, std::int64_t tokens);
  // q: [total_q, q_heads, head_dim] f32, the queries' rows in order; o the same shape (f32) and
  // lse [q_heads, total_q] f32 are written before the future is ready, and only on success.
  std::future<void> attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q, float* o,
                           float* lse);
  // One decode step of one layer in one round trip per server (protocol version 2): appends each
  // sequence's q_count new tokens, whose k and v are the rows of the query rows (k, v:
  // [total_q, kv_heads, head_dim] in the sequences' dtype, the same for every sequence of the
  // call), then attends as attend() does. Never retried (a lost reply leaves the append unknown:
  // the sequence is then marked broken). `answered_at`, when given, receives the time the answer
  // was complete, so a pipeline can measure the attention side without waiting on it. With
  // replicas > 1 it is an append to every copy and an attend, sent at once; the future is then
  // deferred (it completes in get(), and answered_at is the time of the get).
  std::future<void> append_attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q,
                                  const void* k, const void* v, float* o, float* lse,
                                  std::chrono::steady_clock::time_point* answered_at = nullptr);
  std::future<void> drop(std::uint64_t seq);
  // A server's metrics (Prometheus text), by its index in ClientOptions::servers.
  std::future<std::string> server_stats(int server);

  // With replicas > 1, a server that failed is asked every 250 ms whether it is back, and once it
  // answers it is refilled from the complete copies before it serves reads again. refill() starts
  // that now (for an operator who restarted it) and is ready when the server is complete again:
  // at once when it is; Error when it cannot be reached or no complete copy is left to read.
  std::future<void> refill(int server);
  // With replicas > 1: whether the server holds complete copies (it takes reads and writes);
  // false from its failure until its refill is done. Always true with one copy (nothing is tracked).
  bool serving(int server) const;

  ClientStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The server's KV store and decode kernel in process, with the same calls (synchronous).
class LocalEngine {
 public:
  explicit LocalEngine(std::size_t memory_limit = std::size_t{1} << 30, int threads = 0);
  ~LocalEngine();
  void open(const SequenceSpec& spec);
  void append(std::uint64_t seq, int layer, const void* k, const void* v, std::int64_t tokens);
  struct Timing {
    double kernel_seconds = 0;
    std::size_t kv_bytes_read = 0;
  };
  Timing attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q, float* o, float* lse);
  void drop(std::uint64_t seq);
  std::int64_t length(std::uint64_t seq, int layer) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longattn::offload
