// longattn-bench decode: the CPU decode kernel's KV read rate (GB/s) next to this machine's memory
// read bandwidth measured in the same run (a STREAM-like parallel sum over a buffer far larger
// than the caches), so the ratio says how close to DRAM speed the kernel runs. Defaults are sized
// for the machine: threads = cores, KV = 4 sequences x 32k tokens x 8 kv heads x 128 bf16 (1 GiB),
// shrunk when memory is small. Timing: best of --reps after a warm-up (the best run is the one
// least disturbed by other tenants; medians are printed too).
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "longattn/host_buffer.hpp"
#include "longattn/offload_client.hpp"

namespace longattn::bench {
namespace {

struct Options {
  int batch = 4, q_heads = 32, kv_heads = 8, head_dim = 128, threads = 0, reps = 10, q_per_seq = 1;
  std::int64_t context = 32768;
  DType dtype = DType::bf16;
  std::size_t stream_bytes = 0;  // 0 = as large as the KV, at least 512 MiB
};

Options parse(int argc, char** argv) {
  static const char* const kUsage =
      "longattn-bench decode [--batch 4] [--context 32768] [--heads 32] [--kv-heads 8] [--head-dim 128]\n"
      "  [--dtype bf16|fp16|fp32] [--threads cores] [--reps 10] [--q-per-seq 1] [--stream-mib N]\n";
  const examples::Flags f(argc, argv, kUsage,
                          {"batch", "context", "heads", "kv-heads", "head-dim", "threads", "reps", "q-per-seq", "dtype", "stream-mib"}, {});
  constexpr int kMax = std::numeric_limits<int>::max();
  Options o;
  o.batch = static_cast<int>(f.integer("batch", o.batch, 1, kMax));
  o.context = f.integer("context", o.context, 1, std::numeric_limits<std::int64_t>::max());
  o.q_heads = static_cast<int>(f.integer("heads", o.q_heads, 1, kMax));
  o.kv_heads = static_cast<int>(f.integer("kv-heads", o.kv_heads, 1, kMax));
  o.head_dim = static_cast<int>(f.integer("head-dim", o.head_dim, 1, kMax));
  o.threads = static_cast<int>(f.integer("threads", o.threads, std::numeric_limits<int>::min(), kMax));  // <= 0: all cores
  o.reps = static_cast<int>(f.integer("reps", o.reps, 1, kMax));
  o.q_per_seq = static_cast<int>(f.integer("q-per-seq", o.q_per_seq, 1, kMax));
  if (f.has("dtype")) o.dtype = parse_dtype(f.str("dtype", ""));
  o.stream_bytes = static_cast<std::size_t>(f.integer("stream-mib", 0, 0, 1LL << 30)) << 20;  // 0: as large as the KV
  if (o.threads <= 0) o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return o;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// STREAM-like read: every thread sums its slice of a large buffer; GB/s of bytes read.
struct ReadRuler {
  HostBuffer buf;
  std::size_t n = 0;
  explicit ReadRuler(std::size_t bytes) : buf(bytes), n(bytes / sizeof(float)) {
    float* p = buf.as<float>();
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<float>(i & 1023) * 1e-3f;  // first touch by the readers
  }
  double run(int threads) {
    const float* p = buf.as<float>();
    double sum = 0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : sum)
    for (std::size_t b = 0; b < n; b += 4096) {
      // 16 independent accumulators per thread let the compiler vectorize without -ffast-math.
      float acc[16] = {};
      const std::size_t e = std::min(n, b + 4096);
      for (std::size_t i = b; i + 16 <= e; i += 16)
        for (int l = 0; l < 16; ++l) acc[l] += p[i + l];
      for (float a : acc) sum += a;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sum == 42.0) std::printf(" ");  // keep the sum alive
    return static_cast<double>(n * sizeof(float)) / s * 1e-9;
  }
};

int run_decode(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const std::size_t row = static_cast<std::size_t>(o.kv_heads) * o.head_dim * dtype_size(o.dtype);
  const std::size_t kv_bytes = 2 * row * static_cast<std::size_t>(o.context) * o.batch;
  const std::size_t stream_bytes = o.stream_bytes ? o.stream_bytes : std::max<std::size_t>(std::size_t{512} << 20, kv_bytes);

  std::printf("decode kernel: batch %d x %lld tokens, %d q heads / %d kv heads x %d, %s KV (%.2f GiB), %d threads\n", o.batch,
              static_cast<long long>(o.context), o.q_heads, o.kv_heads, o.head_dim, to_string(o.dtype),
              static_cast<double>(kv_bytes) / (1 << 30), o.threads);

  offload::LocalEngine eng(kv_bytes + (std::size_t{64} << 20), o.threads);
  // Random KV from a 1024-token pattern (the kernel's speed does not depend on the values).
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> val(-1, 1);
  const std::int64_t pat = std::min<std::int64_t>(1024, o.context);
  std::vector<std::byte> k(row * static_cast<std::size_t>(pat)), v(k.size());
  const std::size_t elems = k.size() / dtype_size(o.dtype);
  for (std::size_t i = 0; i < elems; ++i) {
    store_from_f32(k.data(), o.dtype, i, val(rng));
    store_from_f32(v.data(), o.dtype, i, val(rng));
  }
  std::vector<offload::DecodeQuery> qs;
  for (int b = 0; b < o.batch; ++b) {
    eng.open({static_cast<std::uint64_t>(b), 1, o.kv_heads, o.head_dim, o.dtype});
    for (std::int64_t t = 0; t < o.context; t += pat) eng.append(static_cast<std::uint64_t>(b), 0, k.data(), v.data(), std::min(pat, o.context - t));
    qs.push_back({static_cast<std::uint64_t>(b), o.q_per_seq});
  }
  const std::size_t tq = static_cast<std::size_t>(o.batch) * o.q_per_seq;
  std::vector<float> q(tq * o.q_heads * o.head_dim), out(q.size()), lse(tq * o.q_heads);
  for (auto& x : q) x = val(rng);

  ReadRuler ruler(stream_bytes);
  std::vector<double> kv_gbps, dram_gbps, ms;
  eng.attend(0, o.q_heads, o.head_dim, qs, q.data(), out.data(), lse.data());  // warm-up
  ruler.run(o.threads);
  // Interleaved, so both see the same machine state (other tenants, frequency).
  for (int r = 0; r < o.reps; ++r) {
    const auto t = eng.attend(0, o.q_heads, o.head_dim, qs, q.data(), out.data(), lse.data());
    kv_gbps.push_back(static_cast<double>(t.kv_bytes_read) / t.kernel_seconds * 1e-9);
    ms.push_back(t.kernel_seconds * 1e3);
    dram_gbps.push_back(ruler.run(o.threads));
  }
  const double kv_best = *std::max_element(kv_gbps.begin(), kv_gbps.end());
  const double dram_best = *std::max_element(dram_gbps.begin(), dram_gbps.end());
  std::printf("%-28s %10s %10s\n", "", "best", "median");
  std::printf("%-28s %10.2f %10.2f\n", "decode kernel KV GB/s", kv_best, median(kv_gbps));
  std::printf("%-28s %10.2f %10.2f\n", "memory read GB/s (ruler)", dram_best, median(dram_gbps));
  std::printf("%-28s %10.3f %10.3f\n", "decode ms per call", *std::min_element(ms.begin(), ms.end()), median(ms));
  std::printf("%-28s %10.3f %10.3f\n", "ratio", kv_best / dram_best, median(kv_gbps) / median(dram_gbps));
  std::printf("RESULT {\"bench\":\"decode\",\"batch\":%d,\"context\":%lld,\"q_heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"dtype\":\"%s\","
              "\"threads\":%d,\"kv_bytes\":%zu,\"ms\":%.4f,\"kv_gbps\":%.3f,\"dram_read_gbps\":%.3f,\"dram_ratio\":%.3f,"
              "\"kv_gbps_median\":%.3f,\"dram_read_gbps_median\":%.3f}\n",
              o.batch, static_cast<long long>(o.context), o.q_heads, o.kv_heads, o.head_dim, to_string(o.dtype), o.threads, kv_bytes,
              median(ms), kv_best, dram_best, kv_best / dram_best, median(kv_gbps), median(dram_gbps));
  return 0;
}

const Register kRegister("decode", "CPU decode kernel KV GB/s against a STREAM-like memory read in the same run", run_decode);

}  // namespace
}  // namespace longattn::bench
