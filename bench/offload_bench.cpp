// longattn-bench offload: the offload server end to end on loopback, against its own kernel time.
//  1. latency: a batch of --batch decode queries (one per sequence) over --context-token KV
//     caches; client wall time per attend next to the server's decode-kernel time for the same
//     calls (from its metrics), so the overhead (network, framing, copies, scheduling) is visible;
//  2. load: --clients concurrent clients (each its own connection and sequence) attending for
//     --seconds, reporting throughput, p50/p99 latency and errors.
// The server is the real daemon (build/bin/longattn-offload-server), started as a child process
// with a fresh token file, and stopped with SIGTERM (its RESULT line is echoed). With --tls it
// serves TLS with a self-signed certificate made for the run (openssl CLI), which the clients trust.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "longattn/offload_client.hpp"

namespace longattn::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  int batch = 32, q_heads = 32, kv_heads = 8, head_dim = 128, reps = 10, threads = 0;
  std::int64_t context = 32768;
  DType dtype = DType::bf16;
  int clients = 64;
  double seconds = 60;
  std::int64_t load_context = 4096;
  std::string memory = "16G";
  std::string transport = "tcp";
  std::string server_device = "cpu";  // the daemon's --device: KV in host memory (cpu) or GPU memory (cuda)
  bool skip_latency = false, skip_load = false, tls = false;
};

Options parse(int argc, char** argv) {
  static const char* const kUsage =
      "longattn-bench offload [--batch 32] [--context 32768] [--heads 32] [--kv-heads 8] [--head-dim 128] [--dtype bf16]\n"
      "  [--reps 10] [--threads cores] [--clients 64] [--seconds 60] [--load-context 4096] [--memory-limit 16G]\n"
      "  [--no-latency] [--no-load] [--transport tcp|ucx] [--tls] [--server-device cpu|cuda]\n"
      "  --server-device cuda starts the server with --device cuda (KV in GPU memory, the cuda decode kernel)\n";
  const examples::Flags f(argc, argv, kUsage,
                          {"batch", "context", "heads", "kv-heads", "head-dim", "dtype", "reps", "threads", "clients", "seconds",
                           "load-context", "memory-limit", "transport", "server-device"},
                          {"no-latency", "no-load", "tls"});
  constexpr int kMax = std::numeric_limits<int>::max();
  constexpr std::int64_t kMax64 = std::numeric_limits<std::int64_t>::max();
  Options o;
  o.batch = static_cast<int>(f.integer("batch", o.batch, 1, kMax));
  o.context = f.integer("context", o.context, 1, kMax64);
  o.q_heads = static_cast<int>(f.integer("heads", o.q_heads, 1, kMax));
  o.kv_heads = static_cast<int>(f.integer("kv-heads", o.kv_heads, 1, kMax));
  o.head_dim = static_cast<int>(f.integer("head-dim", o.head_dim, 1, kMax));
  if (f.has("dtype")) o.dtype = parse_dtype(f.str("dtype", ""));
  o.reps = static_cast<int>(f.integer("reps", o.reps, 1, kMax));
  o.threads = static_cast<int>(f.integer("threads", o.threads, std::numeric_limits<int>::min(), kMax));  // <= 0: all cores
  o.clients = static_cast<int>(f.integer("clients", o.clients, 1, kMax));
  if (f.has("seconds")) {
    const std::string s = f.str("seconds", "");
    char* end = nullptr;
    o.seconds = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0' || !std::isfinite(o.seconds) || o.seconds < 0)
      throw Error(ErrorCode::invalid_argument, "--seconds needs a number of seconds >= 0, got '" + s + "'");
  }
  o.load_context = f.integer("load-context", o.load_context, 1, kMax64);
  o.memory = f.str("memory-limit", o.memory);
  o.transport = f.str("transport", o.transport);
  o.server_device = f.str("server-device", o.server_device);
  if (o.server_device != "cpu" && o.server_device != "cuda")
    throw Error(ErrorCode::invalid_argument, "--server-device must be cpu or cuda, got '" + o.server_device + "'");
  o.skip_latency = f.flag("no-latency");
  o.skip_load = f.flag("no-load");
  o.tls = f.flag("tls");
  if (o.threads <= 0) o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return o;
}

// The daemon as a child process.
struct Daemon {
  pid_t pid = -1;
  int out = -1;
  int port = 0;
  std::filesystem::path dir;
  std::string token;
  std::string cert;  // with --tls: the self-signed certificate, the clients' CA

  // Client options for this daemon.
  offload::ClientOptions client(const Options& o, std::chrono::seconds timeout) const {
    offload::ClientOptions co;
    co.servers = {"127.0.0.1:" + std::to_string(port)};
    co.token = token;
    co.transport = o.transport;
    co.timeout = timeout;
    co.tls.enabled = o.tls;
    co.tls.ca_file = cert;
    return co;
  }

  Daemon(const Options& o) {
    const auto exe = std::filesystem::read_symlink("/proc/self/exe").parent_path() / "longattn-offload-server";
    if (!std::filesystem::exists(exe)) throw Error(ErrorCode::io, "build longattn-offload-server first (expected " + exe.string() + ")");
    std::random_device rd;
    for (int i = 0; i < 4; ++i) token += fmt::format("{:08x}", rd());
    dir = std::filesystem::temp_directory_path() / fmt::format("longattn-offload-bench-{}", ::getpid());
    std::filesystem::create_directories(dir);
    const auto tf = (dir / "token").string();
    std::ofstream(tf) << token << "\n";
    ::chmod(tf.c_str(), 0600);
    std::vector<std::string> args = {exe.string(), "--listen", "127.0.0.1:0", "--token-file", tf, "--threads", std::to_string(o.threads),
                                     "--memory-limit", o.memory, "--io-threads", "2", "--transport", o.transport,
                                     "--device", o.server_device};
    if (o.tls) {
      cert = (dir / "cert.pem").string();
      const auto key = (dir / "key.pem").string();
      const std::string make = fmt::format(
          "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost "
          "-addext subjectAltName=IP:127.0.0.1 -keyout {} -out {} 2>/dev/null",
          key, cert);
      if (std::system(make.c_str()) != 0) throw Error(ErrorCode::io, "--tls needs the openssl command to make a certificate: " + make);
      args.insert(args.end(), {"--tls-cert", cert, "--tls-key", key});
    }
    int fds[2];
    if (::pipe(fds) != 0) throw Error(ErrorCode::io, "pipe failed");
    pid = ::fork();
    if (pid == 0) {
      ::dup2(fds[1], 1);
      ::close(fds[0]);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(exe.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out = fds[0];
    const std::string first = line();
    if (first.rfind("LISTENING ", 0) != 0) throw Error(ErrorCode::io, "the server did not start: '" + first + "'");
    port = std::stoi(first.substr(10));
  }
  std::string line() {
    std::string s;
    char ch;
    while (::read(out, &ch, 1) == 1 && ch != '\n') s += ch;
    return s;
  }
  std::string stop() {
    ::kill(pid, SIGTERM);
    std::string result, l;
    while (!(l = line()).empty())
      if (l.rfind("RESULT ", 0) == 0) result = l.substr(7);
    ::waitpid(pid, nullptr, 0);
    pid = -1;
    return result;
  }
  ~Daemon() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    if (out >= 0) ::close(out);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

double metric(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);)
    if (l.rfind(name + " ", 0) == 0) return std::stod(l.substr(name.size() + 1));
  return 0;
}

double pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

// Random KV from a small pattern, appended in bulk.
void fill(offload::Client& c, std::uint64_t seq, int layers, const Options& o, std::int64_t tokens, std::mt19937_64& rng) {
  const std::size_t row = static_cast<std::size_t>(o.kv_heads) * o.head_dim * dtype_size(o.dtype);
  const std::int64_t pat = std::min<std::int64_t>(2048, tokens);
  std::vector<std::byte> k(row * static_cast<std::size_t>(pat)), v(k.size());
  std::uniform_real_distribution<float> val(-1, 1);
  for (std::size_t i = 0; i < k.size() / dtype_size(o.dtype); ++i) {
    store_from_f32(k.data(), o.dtype, i, val(rng));
    store_from_f32(v.data(), o.dtype, i, val(rng));
  }
  c.open({seq, layers, o.kv_heads, o.head_dim, o.dtype}).get();
  std::vector<std::future<void>> f;
  for (std::int64_t t = 0; t < tokens; t += pat) f.push_back(c.append(seq, 0, k.data(), v.data(), std::min(pat, tokens - t)));
  for (auto& x : f) x.get();
}

int run_offload(int argc, char** argv) {
  const Options o = parse(argc, argv);
  Daemon d(o);
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> val(-1, 1);
  std::string json = fmt::format("{{\"bench\":\"offload\",\"server_device\":\"{}\",\"tls\":{},\"transport\":\"{}\",\"threads\":{},\"q_heads\":{},\"kv_heads\":{},\"head_dim\":{},\"dtype\":\"{}\"", o.server_device, o.tls, o.transport, o.threads,
                                 o.q_heads, o.kv_heads, o.head_dim, to_string(o.dtype));

  if (!o.skip_latency) {
    const offload::ClientOptions co = d.client(o, std::chrono::seconds(120));
    offload::Client c(co);
    const auto tf = Clock::now();
    for (int b = 0; b < o.batch; ++b) fill(c, static_cast<std::uint64_t>(b), 1, o, o.context, rng);
    const double fill_s = std::chrono::duration<double>(Clock::now() - tf).count();
    std::vector<offload::DecodeQuery> qs;
    for (int b = 0; b < o.batch; ++b) qs.push_back({static_cast<std::uint64_t>(b), 1});
    std::vector<float> q(static_cast<std::size_t>(o.batch) * o.q_heads * o.head_dim), out(q.size()), lse(static_cast<std::size_t>(o.batch) * o.q_heads);
    for (auto& x : q) x = val(rng);
    c.attend(0, o.q_heads, o.head_dim, qs, q.data(), out.data(), lse.data()).get();  // warm-up
    std::vector<double> e2e, kern;
    for (int r = 0; r < o.reps; ++r) {
      const double k0 = metric(c.server_stats(0).get(), "longattn_offload_kernel_seconds_total");
      const auto t0 = Clock::now();
      c.attend(0, o.q_heads, o.head_dim, qs, q.data(), out.data(), lse.data()).get();
      e2e.push_back(std::chrono::duration<double>(Clock::now() - t0).count() * 1e3);
      kern.push_back((metric(c.server_stats(0).get(), "longattn_offload_kernel_seconds_total") - k0) * 1e3);
    }
    const double kv_bytes = 2.0 * o.kv_heads * o.head_dim * static_cast<double>(dtype_size(o.dtype)) * static_cast<double>(o.context) * o.batch;
    const double e2e_med = pct(e2e, 0.5), kern_med = pct(kern, 0.5);
    std::printf("latency: %d queries x %lld-token contexts (%.2f GiB KV; filled in %.1f s)\n", o.batch, static_cast<long long>(o.context),
                kv_bytes / (1 << 30), fill_s);
    std::printf("  %-34s %10.3f ms (min %.3f)\n", "end to end per attend (median)", e2e_med, *std::min_element(e2e.begin(), e2e.end()));
    std::printf("  %-34s %10.3f ms (min %.3f)\n", "server kernel per attend (median)", kern_med, *std::min_element(kern.begin(), kern.end()));
    std::printf("  %-34s %10.1f %%\n", "overhead", (e2e_med / kern_med - 1) * 100);
    std::printf("  %-34s %10.2f GB/s\n", "kernel KV read", kv_bytes / (kern_med * 1e-3) * 1e-9);
    std::printf("  %-34s %10.2f GB/s\n", "bulk append (prefill upload)", kv_bytes / fill_s * 1e-9);
    json += fmt::format(",\"batch\":{},\"context\":{},\"e2e_ms\":{:.4f},\"kernel_ms\":{:.4f},\"overhead\":{:.4f},\"kernel_gbps\":{:.3f},"
                        "\"append_gbps\":{:.3f}",
                        o.batch, o.context, e2e_med, kern_med, e2e_med / kern_med - 1, kv_bytes / (kern_med * 1e-3) * 1e-9,
                        kv_bytes / fill_s * 1e-9);
    for (int b = 0; b < o.batch; ++b) c.drop(static_cast<std::uint64_t>(b)).get();
  }

  if (!o.skip_load) {
    std::atomic<bool> go{false}, stop{false};
    std::atomic<std::uint64_t> errors{0}, done{0};
    std::mutex mu;
    std::vector<double> lat;
    std::vector<std::string> first_errors;
    std::vector<std::thread> th;
    std::atomic<int> ready{0};
    for (int i = 0; i < o.clients; ++i) {
      th.emplace_back([&, i] {
        std::vector<double> mine;
        try {
          const offload::ClientOptions co = d.client(o, std::chrono::seconds(30));
          offload::Client c(co);
          std::mt19937_64 r(static_cast<std::uint64_t>(i) + 100);
          fill(c, 1000 + static_cast<std::uint64_t>(i), 1, o, o.load_context, r);
          std::vector<offload::DecodeQuery> qs{{1000 + static_cast<std::uint64_t>(i), 1}};
          std::vector<float> q(static_cast<std::size_t>(o.q_heads) * o.head_dim, 0.1f), out(q.size()), lse(static_cast<std::size_t>(o.q_heads));
          ready++;
          while (!go) std::this_thread::sleep_for(std::chrono::milliseconds(1));
          while (!stop) {
            const auto t0 = Clock::now();
            try {
              c.attend(0, o.q_heads, o.head_dim, qs, q.data(), out.data(), lse.data()).get();
              mine.push_back(std::chrono::duration<double>(Clock::now() - t0).count() * 1e3);
              done++;
            } catch (const Error& e) {
              errors++;
              std::lock_guard lock(mu);
              if (first_errors.size() < 3) first_errors.push_back(e.what());
            }
          }
          c.drop(1000 + static_cast<std::uint64_t>(i)).get();
        } catch (const std::exception& e) {
          errors++;
          ready++;
          std::lock_guard lock(mu);
          if (first_errors.size() < 3) first_errors.push_back(e.what());
        }
        std::lock_guard lock(mu);
        lat.insert(lat.end(), mine.begin(), mine.end());
      });
    }
    while (ready < o.clients) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const auto t0 = Clock::now();
    go = true;
    std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds));
    stop = true;
    for (auto& t : th) t.join();
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::printf("load: %d clients x %.0f s, each attending 1 query over its own %lld-token KV\n", o.clients, o.seconds,
                static_cast<long long>(o.load_context));
    std::printf("  %-34s %10.1f /s\n", "attends", static_cast<double>(done.load()) / secs);
    std::printf("  %-34s %10.3f ms\n", "p50 latency", pct(lat, 0.5));
    std::printf("  %-34s %10.3f ms\n", "p99 latency", pct(lat, 0.99));
    std::printf("  %-34s %10llu\n", "errors", static_cast<unsigned long long>(errors.load()));
    for (const auto& e : first_errors) std::printf("  error: %s\n", e.c_str());
    json += fmt::format(",\"clients\":{},\"seconds\":{:.1f},\"load_context\":{},\"attends\":{},\"attends_per_s\":{:.2f},\"p50_ms\":{:.4f},"
                        "\"p99_ms\":{:.4f},\"errors\":{}",
                        o.clients, secs, o.load_context, done.load(), static_cast<double>(done.load()) / secs, pct(lat, 0.5), pct(lat, 0.99),
                        errors.load());
  }
  const std::string server_result = d.stop();
  std::printf("server: %s\n", server_result.c_str());
  std::printf("RESULT %s}\n", json.c_str());
  return 0;
}

const Register kRegister("offload", "offload server: end-to-end latency vs kernel time, and a concurrent-client load test", run_offload);

}  // namespace
}  // namespace longattn::bench
