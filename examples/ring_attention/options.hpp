// ring_attention's command line: the flags, their defaults, and every check that needs nothing but
// the flags themselves (files, memory and devices are checked later, in setup).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <fmt/format.h>

#include "../common/flags.hpp"
#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/error.hpp"
#include "longattn/layout.hpp"
#include "longattn/parallel_attention.hpp"

namespace longattn::ring_job {

constexpr const char* kUsage = R"(usage: mpirun -np P ring_attention [flags]
  --seq-len N        tokens in the sequence (default 4096; with --load, from the files)
  --heads H          query heads (default 8; with --load, from the files)
  --kv-heads K       key/value heads, H % K == 0 (default = heads; with --load, from the files)
  --head-dim D       head dimension (default 64; with --load, from the files)
  --layout L         contiguous | zigzag | striped (default zigzag; hybrid: over the ring of groups)
  --strategy S       ring | ulysses | hybrid | auto (default ring): a ring over all ranks, an all-to-all
                     over heads, Ulysses groups of U ranks with a ring of R = P / U groups, or U and R
                     picked by the cost model (README, "Choosing a strategy")
  --ulysses-size U   hybrid: ranks per Ulysses group; U divides P and the heads (default 0 = one node)
  --machine-file F   auto: links and kernel rates of this machine, instead of the built-in model and
                     the startup link probe (format: README, "Choosing a strategy")
  --causal           causal mask
  --dtype T          fp32 | bf16 | fp16 (default fp32 on cpu, bf16 on cuda)
  --device D         cpu | cuda (default cuda where GPUs and NCCL exist): one GPU per rank, NCCL ring
  --backend B        local attention backend: auto | cpu | reference | cuda | cudnn (default auto)
  --backward         also run the backward pass
  --grad-transport T f32 | bf16 (default f32): the dtype the backward's partial dK/dV travel the ring
                     in; bf16 halves that traffic and its buffers in transit (its error: README)
  --check            compare with a single-process oracle on rank 0; fail beyond tolerance
  --check-oracle O   auto | reference | cpu: reference (double precision) below ~2e10 FLOPs under auto
  --load DIR         read q.npy [T,H,D], k.npy and v.npy [T,K,D] (and do.npy with --backward), float32,
                     finite values only; shape flags, if given, must match the files
  --dump DIR         write o.npy [T,H,D], lse.npy [H,T] (and dq.npy, dk.npy, dv.npy), float32
  --seed S           random input seed (default 1234)
  --iters N          timed repetitions, the median is reported (default 1)
)";

struct Options {
  std::int64_t seq_len = 4096;
  int heads = 8, kv_heads = 8, head_dim = 64;
  Layout layout = Layout::zigzag;
  Strategy strategy = Strategy::ring;
  int ulysses_size = 0;  // hybrid's U; 0 = the ranks of one node
  std::string machine_file;
  bool causal = false, backward = false, check = false;
  DType dtype = DType::f32;
  DType grad_transport = DType::f32;  // RingOptions::gradient_transport
  std::string backend = "auto", oracle = "auto", load, dump;
  DeviceKind device = DeviceKind::cpu;
  std::uint64_t seed = 1234;
  int iters = 1;
  // Which shape flags the user gave (with --load they must agree with the files).
  bool given_seq_len = false, given_heads = false, given_kv_heads = false, given_head_dim = false;
};

inline examples::Flags read_flags(int argc, char** argv) {
  return examples::Flags(argc, argv,
                         {"seq-len", "heads", "kv-heads", "head-dim", "layout", "strategy", "ulysses-size", "machine-file", "dtype",
                          "grad-transport", "device", "backend", "check-oracle", "load", "dump", "seed", "iters"},
                         {"causal", "backward", "check"});
}

// Why `--device cuda` cannot run here: the build or the machine, said apart so the user knows
// whether to rebuild or to look at the GPUs.
inline std::string cuda_device_unusable_reason() {
#ifndef LONGATTN_HAVE_CUDA
  return "this longattn was built without CUDA (configure found no nvcc, or LONGATTN_CUDA=OFF); rebuild with CUDA, or use --device cpu";
#else
  const auto names = available_backends();
  if (std::find(names.begin(), names.end(), "cuda") == names.end())
    return "no CUDA GPU is visible to this process (check nvidia-smi and CUDA_VISIBLE_DEVICES); use --device cpu";
  return "this longattn was built without NCCL, which --device cuda needs for the ring; rebuild with NCCL, or use --device cpu";
#endif
}

inline Options parse_options(const examples::Flags& f) {
  Options o;
  o.given_seq_len = f.has("seq-len");
  o.given_heads = f.has("heads");
  o.given_kv_heads = f.has("kv-heads");
  o.given_head_dim = f.has("head-dim");
  o.seq_len = f.integer("seq-len", o.seq_len, 1, (1LL << 31) - 1);
  o.heads = static_cast<int>(f.integer("heads", o.heads, 1, 4096));
  o.kv_heads = static_cast<int>(f.integer("kv-heads", o.heads, 1, 4096));
  o.head_dim = static_cast<int>(f.integer("head-dim", o.head_dim, 1, 1024));
  o.layout = parse_layout(f.str("layout", "zigzag"));
  o.strategy = parse_strategy(f.str("strategy", "ring"));
  o.ulysses_size = static_cast<int>(f.integer("ulysses-size", 0, 0, 1 << 20));
  o.machine_file = f.str("machine-file", "");
  // Flags the chosen strategy would ignore are refused: they say the user expects something else.
  if (f.has("ulysses-size") && o.strategy != Strategy::hybrid)
    throw Error(ErrorCode::invalid_argument, fmt::format("--ulysses-size applies to --strategy hybrid only (ring uses U = 1, ulysses "
                                                         "U = all ranks, auto picks U); got --strategy {}",
                                                         to_string(o.strategy)));
  if (f.has("machine-file") && o.strategy != Strategy::automatic)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("--machine-file is read by --strategy auto only; got --strategy {}", to_string(o.strategy)));
  o.causal = f.flag("causal");
  o.backward = f.flag("backward");
  const std::string transport = f.str("grad-transport", "f32");
  if (transport == "bf16") o.grad_transport = DType::bf16;
  else if (transport != "f32")
    throw Error(ErrorCode::invalid_argument, "--grad-transport must be f32 or bf16, got '" + transport + "'");
  if (f.has("grad-transport") && !o.backward)
    throw Error(ErrorCode::invalid_argument, "--grad-transport applies to the backward pass only: add --backward, or leave it out");
  o.check = f.flag("check");
  // The backend name is checked where the backend is made (one list of choices for --backend and
  // LONGATTN_BACKEND alike).
  o.backend = f.str("backend", "auto");
  const std::string device = f.str("device", nccl_available() ? "cuda" : "cpu");
  if (device == "cuda") {
    if (!nccl_available()) throw Error(ErrorCode::unsupported, "--device cuda: " + cuda_device_unusable_reason());
    o.device = DeviceKind::cuda;
  } else if (device != "cpu") {
    throw Error(ErrorCode::invalid_argument, "--device must be cpu or cuda, got '" + device + "'");
  }
  o.dtype = parse_dtype(f.str("dtype", o.device == DeviceKind::cuda ? "bf16" : "fp32"));
  if (o.device == DeviceKind::cuda && o.dtype == DType::f32)
    throw Error(ErrorCode::unsupported, "the GPU kernels take bf16 or fp16 inputs: add --dtype bf16");
  o.oracle = f.str("check-oracle", "auto");
  o.load = f.str("load", "");
  o.dump = f.str("dump", "");
  o.seed = static_cast<std::uint64_t>(f.integer("seed", 1234, 0, (1LL << 62)));
  o.iters = static_cast<int>(f.integer("iters", 1, 1, 1000));
  if (o.oracle != "auto" && o.oracle != "reference" && o.oracle != "cpu")
    throw Error(ErrorCode::invalid_argument, "--check-oracle must be auto, reference or cpu, got '" + o.oracle + "'");
  return o;
}

// The shape every rank checks once the files (if any) have set it.
inline void check_shape(const Options& o) {
  if (o.heads % o.kv_heads != 0)
    throw Error(ErrorCode::invalid_argument, fmt::format("--heads ({}) must be a multiple of --kv-heads ({})", o.heads, o.kv_heads));
}

}  // namespace longattn::ring_job
