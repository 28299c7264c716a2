// longattn-bench kernels: the fast CPU attention (forward and backward) against the machine's
// sgemm rate, measured in the same run with the same thread count. The ratio fwd/sgemm says how much
// of the GEMM-bound ceiling the attention kernel reaches; BLAS is only the ruler, never used inside.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/backend.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "longattn/host_buffer.hpp"

#if defined(LONGATTN_HAVE_BLAS)
// Declared here rather than through <cblas.h>, whose location differs between BLAS vendors.
extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
// OpenBLAS keeps its own thread pool; weak so that another BLAS (which follows OpenMP) links too.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));
extern "C" char* openblas_get_corename() __attribute__((weak));
#endif

namespace longattn::bench {
namespace {

struct Options {
  int seq_len = 8192, heads = 4, head_dim = 128, iters = 3, threads = 0;
  std::string dtype = "fp32", causal = "both";
};

constexpr const char* kUsage =
    "usage: longattn-bench kernels [--seq-len 8192] [--heads 4] [--head-dim 128] [--dtype fp32|bf16|fp16]\n"
    "                              [--causal 0|1|both] [--iters 3] [--threads N (default: OpenMP's)]\n"
    "The fast CPU attention forward/backward GFLOP/s beside OpenBLAS sgemm in the same run (the ruler).\n";

Options parse(int argc, char** argv) {
  const examples::Flags f(argc, argv, kUsage, {"seq-len", "heads", "head-dim", "dtype", "causal", "iters", "threads"}, {});
  constexpr int kMax = std::numeric_limits<int>::max();
  Options o;
  o.seq_len = static_cast<int>(f.integer("seq-len", o.seq_len, 1, kMax));
  o.heads = static_cast<int>(f.integer("heads", o.heads, 1, kMax));
  o.head_dim = static_cast<int>(f.integer("head-dim", o.head_dim, 1, kMax));
  o.iters = static_cast<int>(f.integer("iters", o.iters, 1, kMax));
  o.threads = static_cast<int>(f.integer("threads", o.threads, std::numeric_limits<int>::min(), kMax));  // <= 0: OpenMP's
  o.dtype = f.str("dtype", o.dtype);
  o.causal = f.str("causal", o.causal);
  if (o.causal != "0" && o.causal != "1" && o.causal != "both" && o.causal != "true" && o.causal != "false")
    throw std::runtime_error("--causal takes 0, 1 or both, got '" + o.causal + "'");
  return o;
}

constexpr double kWarmupSeconds = 0.5;

// Best of `iters` timed runs after a warm-up of at least kWarmupSeconds (and one call): caches,
// thread pools and clock frequency settle first, and on a shared machine the minimum is the least
// noisy figure.
template <class F>
double best_seconds(int iters, F&& f) {
  using Clock = std::chrono::steady_clock;
  const auto warm_until = Clock::now() + std::chrono::duration<double>(kWarmupSeconds);
  do f();
  while (Clock::now() < warm_until);
  double best = 1e30;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

#if defined(LONGATTN_HAVE_BLAS)
// Whether an OpenBLAS core name is one of its AVX2 (or wider) kernel sets.
bool blas_core_uses_avx2(std::string core) {
  std::transform(core.begin(), core.end(), core.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (const char* wide : {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"})
    if (core == wide) return true;
  return false;
}

// The sgemm ruler is only fair when OpenBLAS runs kernels as wide as the CPU's. OpenBLAS picks them
// once, when it loads, from CPUID, and under some hypervisors it does not recognise the CPU and
// falls back to its SSE3 kernels ("Prescott"), several times too slow. Then this process starts
// itself again with OPENBLAS_CORETYPE naming the kernels the CPU can run; a value the user set is
// kept, and the variable being set is what stops a second restart.
void restart_with_fitting_blas_core(char** argv) {
  if (!openblas_get_corename || std::getenv("OPENBLAS_CORETYPE") || !__builtin_cpu_supports("avx2")) return;
  if (blas_core_uses_avx2(openblas_get_corename())) return;
  ::setenv("OPENBLAS_CORETYPE", __builtin_cpu_supports("avx512f") ? "SkylakeX" : "Haswell", 1);
  std::vector<char*> args{const_cast<char*>("longattn-bench")};
  for (char** a = argv; *a; ++a) args.push_back(*a);  // argv[0] is the subcommand
  args.push_back(nullptr);
  std::fflush(nullptr);
  ::execv("/proc/self/exe", args.data());  // returns only on failure: carry on, the ratio is then dropped
}
#endif

void fill_random(HostBuffer& b, DType t, std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (std::size_t i = 0; i < n; ++i) store_from_f32(b.data(), t, i, u(rng));
}

struct Run {
  bool causal;
  double flops_fwd, fwd_s, bwd_s;
  double fwd_gflops() const { return flops_fwd / fwd_s * 1e-9; }
  double bwd_gflops() const { return 2.5 * flops_fwd / bwd_s * 1e-9; }
};

int run_kernels(int argc, char** argv) {
  const Options opt = parse(argc, argv);
#if defined(LONGATTN_HAVE_BLAS)
  restart_with_fitting_blas_core(argv);
#endif
  const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
  omp_set_num_threads(threads);
  const DType dt = parse_dtype(opt.dtype);
  const std::int64_t L = opt.seq_len, H = opt.heads, D = opt.head_dim;
  std::vector<bool> modes;
  if (opt.causal == "0" || opt.causal == "false" || opt.causal == "both") modes.push_back(false);
  if (opt.causal == "1" || opt.causal == "true" || opt.causal == "both") modes.push_back(true);

  // sgemm on square n x n matrices, n chosen so 2 n^3 matches the non-causal forward's FLOPs.
  const double flops_full = 4.0 * static_cast<double>(L) * L * D * H;
  const int n = std::max(64, static_cast<int>(std::lround(std::cbrt(flops_full / 2) / 64)) * 64);
  double sgemm_gflops = -1;
  std::string blas_core = "none";
  bool fair_ruler = false;  // sgemm ran kernels as wide as the CPU's, so the ratio means something
#if defined(LONGATTN_HAVE_BLAS)
  {
    blas_core = openblas_get_corename ? openblas_get_corename() : "unknown (not OpenBLAS)";
    fair_ruler = !openblas_get_corename || !__builtin_cpu_supports("avx2") || blas_core_uses_avx2(blas_core);
    if (openblas_set_num_threads) openblas_set_num_threads(threads);
    std::vector<float> A(static_cast<std::size_t>(n) * n), B(A.size()), C(A.size());
    std::mt19937_64 rng(1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& x : A) x = u(rng);
    for (auto& x : B) x = u(rng);
    const double s = best_seconds(opt.iters, [&] {
      cblas_sgemm(101, 111, 111, n, n, n, 1.0f, A.data(), n, B.data(), n, 0.0f, C.data(), n);  // RowMajor, NoTrans
    });
    sgemm_gflops = 2.0 * n * n * static_cast<double>(n) / s * 1e-9;
  }
#endif

  auto backend = make_backend("cpu");
  std::mt19937_64 rng(2);
  const std::size_t elems = static_cast<std::size_t>(L * H * D);
  HostBuffer q(elems * dtype_size(dt)), k(elems * dtype_size(dt)), v(elems * dtype_size(dt)), d_o(elems * dtype_size(dt));
  for (auto* b : {&q, &k, &v, &d_o}) fill_random(*b, dt, elems, rng);
  HostBuffer o(elems * 4), lse(static_cast<std::size_t>(H * L) * 4), dq(elems * 4), dk(elems * 4), dv(elems * 4);
  AttentionArgs a;
  a.q = TensorView(q.data(), dt, {L, H, D});
  a.k = TensorView(k.data(), dt, {L, H, D});
  a.v = TensorView(v.data(), dt, {L, H, D});
  const ForwardOutputs out{TensorView(o.data(), DType::f32, {L, H, D}), TensorView(lse.data(), DType::f32, {H, L})};
  const BackwardArgs g{out.o, out.lse, TensorView(d_o.data(), dt, {L, H, D}), {}, TensorView(dq.data(), DType::f32, {L, H, D}),
                       TensorView(dk.data(), DType::f32, {L, H, D}), TensorView(dv.data(), DType::f32, {L, H, D}), false};

  std::vector<Run> runs;
  for (bool causal : modes) {
    a.causal = causal;
    Run r{causal, causal ? flops_full / 2 : flops_full, 0, 0};
    r.fwd_s = best_seconds(opt.iters, [&] { backend->forward(a, out); });
    r.bwd_s = best_seconds(opt.iters, [&] { backend->backward(a, g); });
    runs.push_back(r);
  }

  std::printf("longattn-bench kernels: seq %lld, heads %lld, head_dim %lld, %s, %d threads, best of %d after a %.1f s warm-up\n",
              static_cast<long long>(L), static_cast<long long>(H), static_cast<long long>(D), to_string(dt), threads,
              opt.iters, kWarmupSeconds);
  if (sgemm_gflops > 0) {
    std::printf("sgemm (OpenBLAS core %s%s) %d x %d x %d: %.1f GFLOP/s\n", blas_core.c_str(),
                std::getenv("OPENBLAS_CORETYPE") ? ", from OPENBLAS_CORETYPE" : "", n, n, n, sgemm_gflops);
    if (!fair_ruler)
      std::printf("note: OpenBLAS runs its %s kernels on a CPU with AVX2, so sgemm is no fair ruler and fwd/sgemm is left "
                  "out; unset OPENBLAS_CORETYPE or set it to Haswell or SkylakeX\n",
                  blas_core.c_str());
  } else {
    std::printf("sgemm: null (built without BLAS, so no ruler; attention numbers only)\n");
  }
  const bool ratio = sgemm_gflops > 0 && fair_ruler;
  auto ratio_of = [&](double gflops, const char* none, int digits = 4) {
    return ratio ? fmt::format("{:.{}f}", gflops / sgemm_gflops, digits) : std::string(none);
  };
  std::printf("%-8s %10s %10s %10s %10s %10s\n", "causal", "fwd ms", "fwd GF/s", "bwd ms", "bwd GF/s", "fwd/sgemm");
  for (const auto& r : runs)
    std::printf("%-8s %10.1f %10.1f %10.1f %10.1f %10s\n", r.causal ? "yes" : "no", r.fwd_s * 1e3, r.fwd_gflops(),
                r.bwd_s * 1e3, r.bwd_gflops(), ratio_of(r.fwd_gflops(), "n/a", 3).c_str());

  // Headline numbers: the first mode (non-causal when both ran); every mode is in "runs".
  const Run& head = runs.front();
  auto num = [](double x) { return x > 0 ? fmt::format("{:.2f}", x) : std::string("null"); };
  std::string per_mode;
  for (const auto& r : runs) {
    if (!per_mode.empty()) per_mode += ",";
    per_mode += fmt::format(R"({{"causal":{},"fwd_gflops":{:.2f},"bwd_gflops":{:.2f},"fwd_ms":{:.2f},"bwd_ms":{:.2f},"fwd_ratio":{}}})",
                            r.causal, r.fwd_gflops(), r.bwd_gflops(), r.fwd_s * 1e3, r.bwd_s * 1e3,
                            ratio_of(r.fwd_gflops(), "null"));
  }
  std::printf(
      "RESULT {\"bench\":\"kernels\",\"sgemm_gflops\":%s,\"sgemm_n\":%d,\"fwd_gflops\":%.2f,\"bwd_gflops\":%.2f,"
      "\"fwd_ratio\":%s,\"bwd_ratio\":%s,\"seq_len\":%lld,\"head_dim\":%lld,\"heads\":%lld,\"dtype\":\"%s\",\"causal\":%s,"
      "\"threads\":%d,\"iters\":%d,\"blas_core\":\"%s\",\"runs\":[%s]}\n",
      num(sgemm_gflops).c_str(), n, head.fwd_gflops(), head.bwd_gflops(), ratio_of(head.fwd_gflops(), "null").c_str(),
      ratio_of(head.bwd_gflops(), "null").c_str(),
      static_cast<long long>(L), static_cast<long long>(D), static_cast<long long>(H), to_string(dt),
      modes.size() == 2 ? "\"both\"" : (head.causal ? "true" : "false"), threads, opt.iters, blas_core.c_str(), per_mode.c_str());
  return 0;
}

const Register kRegister("kernels", "fast CPU attention fwd/bwd GFLOP/s against sgemm (BLAS ruler)", run_kernels);

}  // namespace
}  // namespace longattn::bench
