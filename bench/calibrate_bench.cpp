// longattn-bench calibrate: the cost model's kernel-rate table measured on the machine it runs on.
// For each block length L it times the backend's varlen local call on a batch of sequences of L
// tokens (query and key blocks of L, as the model's table is indexed), forward and backward, and
// writes the rates as machine-file lines (partition/machine_file.hpp), which `balance-measure
// --machine-file`, `ring_attention --machine-file` and the strategy choice read. A batch of many
// sequences keeps short blocks in one launch, as the varlen executor runs them.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../examples/common/flags.hpp"
#include "bench_registry.hpp"
#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "measure_buffers.hpp"
#include "measure_timer.hpp"
#include "partition/cost_model.hpp"
#include "partition/machine_file.hpp"

namespace longattn::bench {
namespace {

constexpr const char* kUsage =
    "longattn-bench calibrate [--device cuda|cpu] [--backend auto] [--lengths 128,256,...,131072] [--tokens N]\n"
    "  [--heads 32] [--kv-heads 8] [--head-dim 128] [--mask causal|full|both] [--dtype bf16|f16|f32]\n"
    "  [--warmups 1] [--reps 3] [--out F]\n"
    "Measures the cost model's kernel-rate table on this machine: for each block length L, the backend's\n"
    "varlen local call on max(L, N) / L sequences of L tokens, forward and backward, timed by CUDA events on\n"
    "GPUs and the wall clock on CPUs (median of --reps after --warmups). Rates are TFLOP/s counted as the\n"
    "model counts them (4 x visible pairs x head dim x heads forward, 2.5x that backward). Prints a table,\n"
    "the machine-file lines (`causal|full <head_dim> <length> <fwd> <bwd>`) and a RESULT {json} line.\n"
    "  --lengths  block lengths (default 128 to 131072 by powers of 2 on cuda, 128 to 1024 on cpu)\n"
    "  --tokens   tokens per timed call (default 131072 on cuda, 2048 on cpu)\n"
    "  --out      write the machine file there (rates only: links and linear layers stay the built-in\n"
    "             machine's); `longattn-bench balance-measure --machine-file F` reads it\n";

struct Point {
  bool causal = true;
  std::int64_t length = 0;
  int sequences = 0;
  double forward_ms = 0, backward_ms = 0, forward_tflops = 0, backward_tflops = 0;
};

bool cuda_available() {
  const auto names = available_backends();
  return std::find(names.begin(), names.end(), "cuda") != names.end() || std::find(names.begin(), names.end(), "cudnn") != names.end();
}

int run_calibrate(int argc, char** argv) {
  const examples::Flags f(argc, argv, kUsage,
                          {"device", "backend", "lengths", "tokens", "heads", "kv-heads", "head-dim", "mask", "dtype", "warmups",
                           "reps", "out"},
                          {});
  constexpr long long kMaxInt = std::numeric_limits<int>::max();
  const std::string device_name = f.str("device", cuda_available() ? "cuda" : "cpu");
  if (device_name != "cpu" && device_name != "cuda")
    throw Error(ErrorCode::invalid_argument, fmt::format("--device takes cpu or cuda, got `{}`", device_name));
  if (device_name == "cuda" && !cuda_available())
    throw Error(ErrorCode::unsupported, "--device cuda: this build or machine has no GPU backend; run with --device cpu");
  const bool gpu = device_name == "cuda";
  std::vector<long long> default_lengths;
  for (long long l = 128; l <= (gpu ? 131072 : 1024); l *= 2) default_lengths.push_back(l);
  const auto lengths = f.integers("lengths", default_lengths, 1, kMaxInt);
  const std::int64_t tokens = f.integer("tokens", gpu ? 131072 : 2048, 1, kMaxInt);
  const int heads = static_cast<int>(f.integer("heads", 32, 1, kMaxInt));
  const int kv_heads = static_cast<int>(f.integer("kv-heads", 8, 1, kMaxInt));
  const int head_dim = static_cast<int>(f.integer("head-dim", 128, 1, kMaxInt));
  if (heads % kv_heads != 0)
    throw Error(ErrorCode::invalid_argument, fmt::format("--heads {} is not a multiple of --kv-heads {}", heads, kv_heads));
  const std::string mask = f.str("mask", "causal");
  if (mask != "causal" && mask != "full" && mask != "both")
    throw Error(ErrorCode::invalid_argument, fmt::format("--mask takes causal, full or both, got `{}`", mask));
  const std::string dtype_name = f.str("dtype", gpu ? "bf16" : "f32");
  DType dtype = DType::f32;
  if (dtype_name == "bf16") dtype = DType::bf16;
  else if (dtype_name == "f16") dtype = DType::f16;
  else if (dtype_name != "f32") throw Error(ErrorCode::invalid_argument, fmt::format("--dtype takes bf16, f16 or f32, got `{}`", dtype_name));
  const int warmups = static_cast<int>(f.integer("warmups", 1, 0, 100));
  const int reps = static_cast<int>(f.integer("reps", 3, 1, 1000));
  const std::string out_path = f.str("out", "");
  std::ofstream out_file;
  if (!out_path.empty()) {
    out_file.open(out_path);
    if (!out_file.is_open()) throw Error(ErrorCode::io, fmt::format("cannot write {}: check the directory exists and is writable", out_path));
  }

  auto backend = make_backend(f.str("backend", "auto"), gpu ? DeviceKind::cuda : DeviceKind::cpu);
  CallTimer timer(*backend);
  auto& ops = backend->device_ops();
  const Device dev = backend->device();
  std::printf("calibrate: %s backend %s, %s, %d query / %d kv heads, head dim %d, timing by %s (median of %d after %d warm-up)\n",
              device_name.c_str(), backend->name().c_str(), dtype_name.c_str(), heads, kv_heads, head_dim, timer.method(), reps,
              warmups);
  std::printf("%-7s %9s %9s %11s %11s %11s %11s\n", "mask", "length", "seqs", "fwd ms", "bwd ms", "fwd TFLOP/s", "bwd TFLOP/s");
  std::vector<Point> points;
  std::uint64_t seed = 7;
  for (const bool causal : {true, false}) {
    if ((causal && mask == "full") || (!causal && mask == "causal")) continue;
    for (const long long length : lengths) {
      Point p;
      p.causal = causal;
      p.length = length;
      p.sequences = static_cast<int>(std::max<std::int64_t>(tokens / length, 1));
      const std::int64_t rows = p.length * p.sequences;
      std::vector<std::int32_t> cu(static_cast<std::size_t>(p.sequences) + 1);
      for (std::size_t b = 0; b < cu.size(); ++b) cu[b] = static_cast<std::int32_t>(static_cast<std::int64_t>(b) * length);
      const auto q_elements = static_cast<std::size_t>(rows * heads * head_dim);
      const auto k_elements = static_cast<std::size_t>(rows * kv_heads * head_dim);
      auto q = random_buffer(ops, q_elements, dtype, seed++), k = random_buffer(ops, k_elements, dtype, seed++),
           v = random_buffer(ops, k_elements, dtype, seed++), d_o = random_buffer(ops, q_elements, dtype, seed++);
      auto o = ops.allocate(q_elements * dtype_size(dtype)), lse = ops.allocate(static_cast<std::size_t>(rows * heads) * 4),
           delta = ops.allocate(static_cast<std::size_t>(rows * heads) * 4), dq = ops.allocate(q_elements * dtype_size(dtype)),
           dk = ops.allocate(k_elements * dtype_size(dtype)), dv = ops.allocate(k_elements * dtype_size(dtype)),
           cu_device = ops.allocate(cu.size() * 4);
      ops.copy_bytes(cu_device->data(), cu.data(), cu.size() * 4, nullptr);
      AttentionArgs a;
      a.q = TensorView(q->data(), dtype, {rows, heads, head_dim}, dev);
      a.k = TensorView(k->data(), dtype, {rows, kv_heads, head_dim}, dev);
      a.v = TensorView(v->data(), dtype, {rows, kv_heads, head_dim}, dev);
      if (p.sequences > 1) {
        a.cu_seqlens_q = a.cu_seqlens_k = static_cast<const std::int32_t*>(cu_device->data());
        a.batch = p.sequences;
      }
      a.max_seqlen_q = a.max_seqlen_k = static_cast<int>(length);
      a.causal = causal;
      const ForwardOutputs fo{TensorView(o->data(), dtype, {rows, heads, head_dim}, dev),
                              TensorView(lse->data(), DType::f32, {heads, rows}, dev)};
      p.forward_ms = timer.median_ms(warmups, reps, [&] { backend->forward(a, fo); });
      backend->forward(a, fo);  // the saved results the backward reads
      BackwardArgs g;
      g.o = fo.o;
      g.lse = fo.lse;
      g.d_o = TensorView(d_o->data(), dtype, {rows, heads, head_dim}, dev);
      g.delta = TensorView(delta->data(), DType::f32, {heads, rows}, dev);
      backend->compute_delta(g.o, g.d_o, g.delta, nullptr);
      g.dq = TensorView(dq->data(), dtype, {rows, heads, head_dim}, dev);
      g.dk = TensorView(dk->data(), dtype, {rows, kv_heads, head_dim}, dev);
      g.dv = TensorView(dv->data(), dtype, {rows, kv_heads, head_dim}, dev);
      p.backward_ms = timer.median_ms(warmups, reps, [&] { backend->backward(a, g); });
      const double flops = p.sequences * partition::forward_flops(length, length, causal, head_dim, heads);
      p.forward_tflops = flops / (p.forward_ms * 1e-3) / 1e12;
      p.backward_tflops = partition::kBackwardFlopFactor * flops / (p.backward_ms * 1e-3) / 1e12;
      std::printf("%-7s %9lld %9d %11.3f %11.3f %11.3f %11.3f\n", causal ? "causal" : "full", length, p.sequences, p.forward_ms,
                  p.backward_ms, p.forward_tflops, p.backward_tflops);
      points.push_back(p);
    }
  }

  // The machine file: rates only; what it leaves out (links, linear layers) stays the built-in
  // machine's where it is read. Points round-trip through the table's own writer.
  partition::KernelRateTable table;
  for (const auto& p : points) table.add(p.causal, head_dim, {p.length, p.forward_tflops, p.backward_tflops});
  std::ostringstream text;
  text << fmt::format("# longattn-bench calibrate: {} backend {}, {}, {} query / {} kv heads, head dim {}, {} tokens per call\n",
                      device_name, backend->name(), dtype_name, heads, kv_heads, head_dim, tokens);
  table.write(text);
  // The file must read back as a machine file before anyone relies on it.
  std::istringstream check(text.str());
  partition::parse_machine_file(check, "calibrate output");
  if (out_file.is_open()) {
    out_file << text.str();
    out_file.close();
    if (!out_file) throw Error(ErrorCode::io, fmt::format("writing {} failed: check the disk space", out_path));
    std::printf("machine file written to %s\n", out_path.c_str());
  } else {
    std::printf("machine file (save with --out F):\n%s", text.str().c_str());
  }
  std::string points_json;
  for (const auto& p : points)
    points_json += fmt::format("{}{{\"causal\":{},\"length\":{},\"sequences\":{},\"forward_ms\":{:.4f},\"backward_ms\":{:.4f},"
                               "\"forward_tflops\":{:.6g},\"backward_tflops\":{:.6g}}}",
                               points_json.empty() ? "" : ",", p.causal ? "true" : "false", p.length, p.sequences, p.forward_ms,
                               p.backward_ms, p.forward_tflops, p.backward_tflops);
  std::printf("RESULT {\"bench\":\"calibrate\",\"device\":\"%s\",\"backend\":\"%s\",\"dtype\":\"%s\",\"timing\":\"%s\","
              "\"q_heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"tokens\":%lld,\"out\":\"%s\",\"points\":[%s]}\n",
              device_name.c_str(), backend->name().c_str(), dtype_name.c_str(), timer.method(), heads, kv_heads, head_dim,
              static_cast<long long>(tokens), out_path.c_str(), points_json.c_str());
  return 0;
}

const Register kRegister("calibrate", "the cost model's kernel-rate table measured on this machine, written as a machine file",
                         run_calibrate);

}  // namespace
}  // namespace longattn::bench
