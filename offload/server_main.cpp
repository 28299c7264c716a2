// longattn-offload-server: the attention-offload daemon. Holds KV caches in host memory and answers
// decode attention over TCP (docs/offload.md: deployment and security; docs/offload-protocol.md:
// the wire format). SIGTERM/SIGINT: finish in-flight requests, refuse new ones, exit 0 with a
// RESULT {json} line.
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "offload/cpu_affinity.hpp"
#include "offload/server.hpp"
#include "offload/token_file.hpp"

namespace {

using longattn::Error;
using longattn::ErrorCode;

const char* kUsage = R"(usage: longattn-offload-server --token-file FILE [flags]
  --listen HOST:PORT        where to serve (default 127.0.0.1:7070; 0.0.0.0:PORT for every interface)
  --token-file FILE         the shared secret clients must present (required; not readable by others)
  --threads N               decode kernel threads (default: all cores)
  --device cpu|cuda         where KV lives and attention runs: host memory and the CPU kernel (default), or GPU
                            memory and the cuda backend's decode kernel (bf16/fp16 KV, head_dim 64 or 128; only where
                            built with CUDA and a GPU is visible); --memory-limit then bounds the GPU memory for KV
  --io-threads N            network threads (default 2)
  --cpus LIST               run every thread of this server on these CPUs only, e.g. 0-15 (one server per socket:
                            its socket's CPUs); --threads then defaults to their number
  --numa-node N             the same with the CPUs of NUMA node N (KV pages, first touched by these threads, stay local)
  --memory-limit SIZE       KV memory this server may hold, e.g. 64G (default 1G)
  --per-client-limit SIZE   KV memory one client id may hold (default: the memory limit)
  --metrics-listen HOST:PORT  serve Prometheus text on GET /metrics, plain HTTP (default: off; PORT alone = 127.0.0.1:PORT)
  --tls-cert FILE           serve TLS with this PEM certificate chain (tcp only; default: no TLS)
  --tls-key FILE            the certificate's PEM private key (keep it mode 0600)
  --tls-ca FILE             PEM CA certificates that client certificates must be signed by
  --tls-require-client-cert refuse clients without a valid certificate signed by --tls-ca (mutual TLS)
  --transport tcp|ucx       (ucx only where built with UCX)
  --max-frame SIZE          largest accepted frame payload (default 256M)
  --max-connections N       authenticated connections served at once; more get an out_of_capacity error at hello (default 1024)
  --max-unauthenticated N   connections not yet authenticated; past it the oldest of them is closed (default 64)
  --orphan-timeout S        drop the sequences of a client id that has had no connection for S seconds; 0 = never (default 60)
  --frame-timeout S         a started frame must arrive completely within S seconds (default 60)
  --hello-timeout S         a new connection must authenticate within S seconds (default 10)
  --page-tokens N           tokens per KV page, a multiple of 16 (default 64)
  --config FILE             key=value lines with the same keys (flags given on the command line win)
)";

const std::set<std::string> kKeys = {"listen",      "token-file", "threads",   "io-threads", "memory-limit", "per-client-limit",
                                     "metrics-listen", "transport", "max-frame", "max-connections", "page-tokens", "config",
                                     "frame-timeout", "hello-timeout", "max-unauthenticated", "orphan-timeout",
                                     "tls-cert", "tls-key", "tls-ca", "tls-require-client-cert", "device", "cpus", "numa-node"};
// Flags that take no value on the command line (true when given); in a config file: key=true|false.
const std::set<std::string> kSwitches = {"tls-require-client-cert"};

bool to_bool(const std::map<std::string, std::string>& kv, const std::string& k) {
  auto it = kv.find(k);
  if (it == kv.end()) return false;
  LONGATTN_INVALID(it->second == "true" || it->second == "false", "--{}={}: expected true or false", k, it->second);
  return it->second == "true";
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

std::map<std::string, std::string> read_config(const std::string& path) {
  std::ifstream in(path);
  LONGATTN_REQUIRE(in, ErrorCode::io, "cannot read config file {}", path);
  std::map<std::string, std::string> kv;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    line = trim(line);
    if (line.empty() || line[0] == '#') continue;
    const auto eq = line.find('=');
    LONGATTN_REQUIRE(eq != std::string::npos, ErrorCode::io, "{}:{}: expected key=value", path, n);
    const std::string k = trim(line.substr(0, eq));
    LONGATTN_REQUIRE(kKeys.count(k) && k != "config", ErrorCode::io, "{}:{}: unknown key '{}'", path, n, k);
    kv[k] = trim(line.substr(eq + 1));
  }
  return kv;
}

long to_int(const std::map<std::string, std::string>& kv, const std::string& k, long dflt, long lo, long hi) {
  auto it = kv.find(k);
  if (it == kv.end()) return dflt;
  char* end = nullptr;
  const long v = std::strtol(it->second.c_str(), &end, 10);
  LONGATTN_INVALID(!it->second.empty() && *end == '\0' && v >= lo && v <= hi, "--{}={}: expected an integer in [{}, {}]", k,
                   it->second, lo, hi);
  return v;
}

double to_seconds(const std::map<std::string, std::string>& kv, const std::string& k, double dflt, double lo = 0.01) {
  auto it = kv.find(k);
  if (it == kv.end()) return dflt;
  char* end = nullptr;
  const double v = std::strtod(it->second.c_str(), &end);
  LONGATTN_INVALID(!it->second.empty() && *end == '\0' && v >= lo && v <= 86400, "--{}={}: expected seconds in [{}, 86400]", k,
                   it->second, lo);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace longattn;
  // OpenMP threads that spin between kernel calls take the cores the network threads need (and,
  // on a shared host, everyone else's). libgomp reads OMP_WAIT_POLICY once, before main, so
  // unless the operator chose a policy, run again with the passive one.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    ::execv("/proc/self/exe", argv);  // on failure, carry on with the default policy
  }
  try {
    std::map<std::string, std::string> cli;
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--help" || a == "-h") {
        std::fputs(kUsage, stdout);
        return 0;
      }
      LONGATTN_INVALID(a.rfind("--", 0) == 0, "unexpected argument '{}' (see --help)", a);
      a = a.substr(2);
      std::string v;
      const auto eq = a.find('=');
      if (eq != std::string::npos) {
        v = a.substr(eq + 1);
        a = a.substr(0, eq);
      } else if (kSwitches.count(a)) {
        v = "true";
      } else {
        LONGATTN_INVALID(i + 1 < argc, "--{} needs a value", a);
        v = argv[++i];
      }
      LONGATTN_INVALID(kKeys.count(a), "unknown flag --{} (see --help)", a);
      cli[a] = v;
    }
    std::map<std::string, std::string> kv;
    if (cli.count("config")) kv = read_config(cli["config"]);
    for (auto& [k, v] : cli) kv[k] = v;

    offload::ServerOptions opt;
    opt.listen = kv.count("listen") ? kv["listen"] : "127.0.0.1:7070";
    LONGATTN_INVALID(kv.count("token-file"), "--token-file is required: the server never serves without authentication");
    opt.token = offload::read_token_file(kv["token-file"]);
    opt.compute_threads = static_cast<int>(to_int(kv, "threads", 0, 0, 4096));
    opt.io_threads = static_cast<int>(to_int(kv, "io-threads", 2, 1, 256));
    if (kv.count("memory-limit")) opt.memory_limit = offload::parse_size(kv["memory-limit"]);
    if (kv.count("per-client-limit")) opt.per_client_limit = offload::parse_size(kv["per-client-limit"]);
    if (kv.count("metrics-listen")) opt.metrics_listen = kv["metrics-listen"];
    if (kv.count("transport")) opt.transport = kv["transport"];
    LONGATTN_INVALID(opt.transport == "tcp" || opt.transport == "ucx", "--transport must be tcp or ucx, got '{}'", opt.transport);
    if (kv.count("max-frame")) {
      const auto mf = offload::parse_size(kv["max-frame"]);
      LONGATTN_INVALID(mf >= 4096 && mf <= 0xffffffffull, "--max-frame must be in [4K, 4G)");
      opt.limits.max_payload = static_cast<std::uint32_t>(mf);
    }
    opt.max_connections = static_cast<int>(to_int(kv, "max-connections", 1024, 1, 1 << 20));
    opt.max_unauthenticated = static_cast<int>(to_int(kv, "max-unauthenticated", 64, 1, 1 << 20));
    opt.orphan_timeout_s = to_seconds(kv, "orphan-timeout", 60, 0);
    opt.page_tokens = static_cast<int>(to_int(kv, "page-tokens", 64, 16, 1 << 16));
    opt.frame_timeout_s = to_seconds(kv, "frame-timeout", 60);
    opt.hello_timeout_s = to_seconds(kv, "hello-timeout", 10);
    if (kv.count("tls-cert")) opt.tls.cert_file = kv["tls-cert"];
    if (kv.count("tls-key")) opt.tls.key_file = kv["tls-key"];
    if (kv.count("tls-ca")) opt.tls.ca_file = kv["tls-ca"];
    opt.tls.require_client_cert = to_bool(kv, "tls-require-client-cert");
    opt.device = kv.count("device") ? kv["device"] : "cpu";
    LONGATTN_INVALID(opt.device == "cpu" || opt.device == "cuda", "--device must be cpu or cuda, got '{}'", opt.device);
    // Before any thread starts, so that every thread of the server inherits the CPU set.
    LONGATTN_INVALID(!(kv.count("cpus") && kv.count("numa-node")), "give --cpus or --numa-node, not both");
    if (kv.count("cpus") || kv.count("numa-node")) {
      const auto cpus = kv.count("cpus") ? offload::parse_cpu_list(kv["cpus"])
                                         : offload::numa_node_cpus(static_cast<int>(to_int(kv, "numa-node", 0, 0, 1 << 16)));
      offload::restrict_to_cpus(cpus);
      if (!kv.count("threads")) opt.compute_threads = static_cast<int>(cpus.size());
    }

    // Signals go to this thread only (blocked before any other thread exists), taken by sigwait.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::signal(SIGPIPE, SIG_IGN);

    offload::Server server(opt);
    server.start();
    std::printf("LISTENING %d\n", server.port());
    std::fflush(stdout);
    int sig = 0;
    sigwait(&set, &sig);
    logger(Subsystem::offload).info("signal {}: graceful shutdown", sig);
    server.shutdown();
    server.wait();
    std::printf("RESULT %s\n", server.result_json().c_str());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "longattn-offload-server: error (%s): %s\n", to_string(e.code()), e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "longattn-offload-server: error: %s\n", e.what());
    return 2;
  }
}
