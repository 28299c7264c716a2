// longattn-bench gpu-kernels: forward and backward TFLOP/s of the GPU attention backends ("cuda",
// "cudnn") on one GPU (bf16, batch 1; seq 8k/32k/128k; causal and not; head dims 64/128), the
// decode kernel's KV read rate on a 1M-token KV, and a device-copy ruler measured in the same run.
// Timing: CUDA events around a batch of back-to-back calls (enough for ~20 ms, so the host's launch
// cost of a short call hides behind the previous one, as in a training step) after a warm-up;
// median over the repeats of the batch time per call; random data.
#ifdef LONGATTN_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/backend.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"

namespace longattn::bench {
namespace {

#define BENCH_CUDA(call)                                                                            \
  do {                                                                                              \
    const cudaError_t e_ = (call);                                                                  \
    if (e_ != cudaSuccess) throw Error(ErrorCode::internal, fmt::format("{}: {}", #call, cudaGetErrorString(e_))); \
  } while (0)

struct Options {
  std::vector<int> seqs{8192, 32768, 131072}, dims{64, 128};
  std::vector<std::string> backends{"cuda", "cudnn"};
  int heads = 32, reps = 5, decode_kv = 1 << 20;
  std::string causal = "both";
};

std::vector<std::string> words(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) out.push_back(x);
  return out;
}

Options parse(int argc, char** argv) {
  static const char* const kUsage =
      "longattn-bench gpu-kernels [--seqs 8192,32768,131072] [--dims 64,128] [--backends cuda,cudnn]\n"
      "                           [--heads 32] [--reps 5] [--causal 0|1|both] [--decode-kv 1048576]\n";
  const examples::Flags f(argc, argv, kUsage, {"seqs", "dims", "backends", "heads", "reps", "causal", "decode-kv"}, {});
  constexpr int kMax = std::numeric_limits<int>::max();
  auto int_list = [&](const char* name, const std::vector<int>& fallback) {
    const auto v = f.integers(name, std::vector<long long>(fallback.begin(), fallback.end()), 1, kMax);
    return std::vector<int>(v.begin(), v.end());
  };
  Options o;
  o.seqs = int_list("seqs", o.seqs);
  o.dims = int_list("dims", o.dims);
  if (f.has("backends")) o.backends = words(f.str("backends", ""));
  o.heads = static_cast<int>(f.integer("heads", o.heads, 1, kMax));
  o.reps = static_cast<int>(f.integer("reps", o.reps, 1, kMax));
  o.causal = f.str("causal", o.causal);
  if (o.causal != "0" && o.causal != "1" && o.causal != "both")
    throw Error(ErrorCode::invalid_argument, "--causal takes 0, 1 or both, got '" + o.causal + "'");
  o.decode_kv = static_cast<int>(f.integer("decode-kv", o.decode_kv, 1, kMax));
  return o;
}

// Device memory filled with random bf16 values in [-1, 1] (a host pattern copied over the buffer).
struct DevBuf {
  void* p = nullptr;
  std::size_t bytes = 0;
  explicit DevBuf(std::size_t n) : bytes(n) { BENCH_CUDA(cudaMalloc(&p, std::max<std::size_t>(n, 16))); }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void randomize(const std::vector<std::uint16_t>& pattern, std::size_t shift) {
    const std::size_t chunk = pattern.size() * 2;
    for (std::size_t off = 0; off < bytes; off += chunk) {
      const std::size_t s = (shift * 2 + off / 7) % chunk & ~std::size_t{15};
      const std::size_t n = std::min({chunk - s, bytes - off});
      BENCH_CUDA(cudaMemcpy(static_cast<char*>(p) + off, reinterpret_cast<const char*>(pattern.data()) + s, n, cudaMemcpyHostToDevice));
    }
  }
};

template <class F>
double median_ms(int reps, F&& run) {
  constexpr float kBatchMs = 20;  // time per repeat; a 1 ms call runs ~20 times back to back
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  auto time_calls = [&](int calls) {
    BENCH_CUDA(cudaEventRecord(a));
    for (int c = 0; c < calls; ++c) run();
    BENCH_CUDA(cudaEventRecord(b));
    BENCH_CUDA(cudaEventSynchronize(b));
    float t = 0;
    BENCH_CUDA(cudaEventElapsedTime(&t, a, b));
    return t / static_cast<float>(calls);
  };
  run();  // warm-up (builds cuDNN graphs, allocates workspaces)
  BENCH_CUDA(cudaDeviceSynchronize());
  const float one = time_calls(1);
  const int calls = std::clamp(static_cast<int>(kBatchMs / std::max(one, 1e-3f)), 1, 1000);
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) ms.push_back(time_calls(calls));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Row {
  std::string backend;
  int seq, d;
  bool causal;
  double fwd_ms = 0, bwd_ms = 0, fwd_tflops = 0, bwd_tflops = 0;
  std::string note;
};

int run(int argc, char** argv) {
  const Options o = parse(argc, argv);
  int dev = 0;
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDevice(&dev));
  BENCH_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

  std::vector<std::uint16_t> pattern(std::size_t{1} << 22);
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto& x : pattern) x = f32_to_bf16(u(rng));

  std::vector<bool> causals;
  if (o.causal != "0") causals.push_back(true);
  if (o.causal != "1") causals.push_back(false);
  const Device gpu{DeviceKind::cuda, dev};
  std::vector<Row> rows;
  const auto available = available_backends();
  auto usable = [&](const std::string& b) { return std::find(available.begin(), available.end(), b) != available.end(); };
  for (const auto& bname : o.backends) {
    if (!usable(bname)) {
      std::printf("backend %s: not available in this build or on this machine\n", bname.c_str());
      continue;
    }
    std::unique_ptr<AttentionBackend> backend;
    try {
      backend = make_backend(bname, DeviceKind::cuda);
    } catch (const Error& e) {
      std::printf("backend %s: not available (%s)\n", bname.c_str(), e.what());
      continue;
    }
    for (int d : o.dims)
      for (int L : o.seqs)
        for (bool causal : causals) {
          Row r{bname, L, d, causal, 0, 0, 0, 0, {}};
          const std::size_t n = static_cast<std::size_t>(L) * o.heads * d;
          DevBuf q(n * 2), k(n * 2), v(n * 2), out(n * 2), d_o(n * 2), dq(n * 2), dk(n * 2), dv(n * 2);
          DevBuf lse(static_cast<std::size_t>(L) * o.heads * 4);
          q.randomize(pattern, 1);
          k.randomize(pattern, 2);
          v.randomize(pattern, 3);
          d_o.randomize(pattern, 4);
          AttentionArgs a;
          a.q = TensorView(q.p, DType::bf16, {L, o.heads, d}, gpu);
          a.k = TensorView(k.p, DType::bf16, {L, o.heads, d}, gpu);
          a.v = TensorView(v.p, DType::bf16, {L, o.heads, d}, gpu);
          a.causal = causal;
          ForwardOutputs fo{TensorView(out.p, DType::bf16, {L, o.heads, d}, gpu), TensorView(lse.p, DType::f32, {o.heads, L}, gpu)};
          const auto why = backend->unsupported_reason(a);
          if (!why.empty()) {
            r.note = why;
            rows.push_back(r);
            continue;
          }
          const double flops = 4.0 * L * double(L) * d * o.heads * (causal ? 0.5 : 1.0);
          const int reps = L >= 131072 ? std::min(o.reps, 3) : o.reps;
          try {
            r.fwd_ms = median_ms(reps, [&] { backend->forward(a, fo); });
            BackwardArgs g{fo.o, fo.lse, TensorView(d_o.p, DType::bf16, {L, o.heads, d}, gpu), {},
                           TensorView(dq.p, DType::bf16, {L, o.heads, d}, gpu), TensorView(dk.p, DType::bf16, {L, o.heads, d}, gpu),
                           TensorView(dv.p, DType::bf16, {L, o.heads, d}, gpu), false};
            r.bwd_ms = median_ms(reps, [&] { backend->backward(a, g); });
            r.fwd_tflops = flops / (r.fwd_ms * 1e-3) / 1e12;
            r.bwd_tflops = 2.5 * flops / (r.bwd_ms * 1e-3) / 1e12;
          } catch (const Error& e) {
            r.note = e.what();
          }
          std::printf("%-6s seq %6d d %3d %-6s fwd %8.2f ms %6.1f TFLOP/s | bwd %8.2f ms %6.1f TFLOP/s %s\n", bname.c_str(), L, d,
                      causal ? "causal" : "full", r.fwd_ms, r.fwd_tflops, r.bwd_ms, r.bwd_tflops, r.note.c_str());
          std::fflush(stdout);
          rows.push_back(r);
        }
  }

  // Copy ruler: a 2 GiB device-to-device copy, bytes read + written.
  double copy_gbs = 0;
  {
    const std::size_t bytes = std::size_t{1} << 31;
    DevBuf a(bytes), b(bytes);
    a.randomize(pattern, 5);
    const double ms = median_ms(10, [&] { BENCH_CUDA(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice)); });
    copy_gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
    std::printf("device copy: %.0f GB/s (read + written)\n", copy_gbs);
  }

  // Decode: 1 query token, 32 q heads over 8 kv heads, head dim 128, bf16 KV of decode_kv tokens.
  struct DecodeRow {
    std::string backend;
    double ms = 0, gbs = 0;
    std::string note;
  };
  std::vector<DecodeRow> drows;
  {
    const int hq = 32, hkv = 8, d = 128, T = o.decode_kv;
    const std::size_t kv = static_cast<std::size_t>(T) * hkv * d;
    DevBuf q(static_cast<std::size_t>(hq) * d * 2), k(kv * 2), v(kv * 2), out(static_cast<std::size_t>(hq) * d * 2), lse(hq * 4);
    q.randomize(pattern, 6);
    k.randomize(pattern, 7);
    v.randomize(pattern, 8);
    AttentionArgs a;
    a.q = TensorView(q.p, DType::bf16, {1, hq, d}, gpu);
    a.k = TensorView(k.p, DType::bf16, {T, hkv, d}, gpu);
    a.v = TensorView(v.p, DType::bf16, {T, hkv, d}, gpu);
    ForwardOutputs fo{TensorView(out.p, DType::bf16, {1, hq, d}, gpu), TensorView(lse.p, DType::f32, {hq, 1}, gpu)};
    for (const auto& bname : o.backends) {
      if (!usable(bname)) continue;
      DecodeRow r{bname, 0, 0, {}};
      try {
        auto backend = make_backend(bname, DeviceKind::cuda);
        const auto why = backend->unsupported_reason(a);
        if (!why.empty()) throw Error(ErrorCode::unsupported, why);
        r.ms = median_ms(20, [&] { backend->forward(a, fo); });
        r.gbs = 2.0 * kv * 2 / (r.ms * 1e-3) / 1e9;
      } catch (const Error& e) {
        r.note = e.what();
      }
      std::printf("decode %-6s 1M-token KV: %.3f ms, %.0f GB/s of KV (%.0f%% of copy) %s\n", bname.c_str(), r.ms, r.gbs,
                  copy_gbs > 0 ? 100.0 * r.gbs / copy_gbs : 0.0, r.note.c_str());
      drows.push_back(r);
    }
  }

  // Which forward kernel the cuda backend ran (LONGATTN_CUDA_FWD_KERNEL; the backend refuses bad values).
  const char* fwd_kernel = std::getenv("LONGATTN_CUDA_FWD_KERNEL");
  std::string json = fmt::format(
      "{{\"bench\":\"gpu-kernels\",\"device\":\"{}\",\"heads\":{},\"dtype\":\"bf16\",\"cuda_fwd_kernel\":\"{}\",\"copy_gbs\":{:.1f},"
      "\"attention\":[",
      prop.name, o.heads, fwd_kernel && *fwd_kernel ? fwd_kernel : "auto", copy_gbs);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    json += fmt::format("{}{{\"backend\":\"{}\",\"seq\":{},\"d\":{},\"causal\":{},\"fwd_ms\":{:.3f},\"bwd_ms\":{:.3f},"
                        "\"fwd_tflops\":{:.1f},\"bwd_tflops\":{:.1f}}}",
                        i ? "," : "", r.backend, r.seq, r.d, r.causal ? "true" : "false", r.fwd_ms, r.bwd_ms, r.fwd_tflops,
                        r.bwd_tflops);
  }
  json += "],\"decode\":[";
  for (std::size_t i = 0; i < drows.size(); ++i)
    json += fmt::format("{}{{\"backend\":\"{}\",\"kv_tokens\":{},\"ms\":{:.4f},\"gbs\":{:.1f}}}", i ? "," : "", drows[i].backend,
                        o.decode_kv, drows[i].ms, drows[i].gbs);
  json += "]}";
  std::printf("RESULT %s\n", json.c_str());
  return 0;
}

const Register reg("gpu-kernels", "GPU attention fwd/bwd TFLOP/s (cuda, cudnn), decode GB/s, copy ruler", run);

}  // namespace
}  // namespace longattn::bench
#endif  // LONGATTN_HAVE_CUDA
