// varlen_attention's command line: the flags, their defaults, and the batch's lengths from
// --seq-lens, --lengths-file or --load DIR/cu_seqlens.npy (checks that need only the flags and files).
#pragma once

#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "../common/flags.hpp"
#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "longattn/npy.hpp"
#include "longattn/varlen_attention.hpp"

namespace longattn::varlen_job {

constexpr const char* kUsage = R"(usage: mpirun -np P varlen_attention [flags]
  The batch (one of the three):
  --seq-lens L,L,... the sequence lengths, in batch order (0 allowed)
  --lengths-file F   one length per line ('#' starts a comment)
  --load DIR         DIR/cu_seqlens.npy: prefix sums [batch + 1] starting at 0 (int32, int64, or float32 up to 2^24)
  How it is spread over the ranks:
  --balance B        hierarchical | per-sequence-zigzag | whole-sequences | flat-minheap (default
                     hierarchical); flat-minheap is planned and priced only (longattn-bench balance)
  --gpus-per-node G  ranks per node for the planner (default: the topology's, LONGATTN_NODE_SIZE)
  --cap-tokens N     most tokens one rank may hold (default 0: no cap)
  --chunk-tokens N   flat-minheap's chunk size (default 4096)
  --machine M        the cost model's machine: h100 | h200 | cpu (default cpu on cpu, h100 on cuda)
  --machine-file F   kernel rates and links replacing the machine's (format: README, "Choosing a strategy")
  The attention:
  --heads H          query heads (default 8)
  --kv-heads K       key/value heads, H % K == 0 (default = heads)
  --head-dim D       head dimension (default 64)
  --causal           causal mask
  --dtype T          fp32 | bf16 | fp16 (default fp32 on cpu, bf16 on cuda)
  --device D         cpu | cuda (default cpu): one GPU per rank over NCCL
  --backward         also run the backward pass
  --check            compare every rank's rows with the double-precision reference; fail beyond tolerance
  --seed S           random input seed (default 1234)
)";

// Throws Error(invalid_argument) with the message when `ok` is false.
template <class... Args>
void require(bool ok, fmt::format_string<Args...> message, Args&&... args) {
  if (!ok) throw Error(ErrorCode::invalid_argument, fmt::format(message, std::forward<Args>(args)...));
}

struct Options {
  std::vector<std::int64_t> lengths;
  Balance balance = Balance::hierarchical;
  int gpus_per_node = 0;  // 0: the topology's
  std::int64_t cap_tokens = 0, chunk_tokens = 4096;
  std::string machine, machine_file;
  int heads = 8, kv_heads = 8, head_dim = 64;
  bool causal = false, backward = false, check = false;
  DType dtype = DType::f32;
  DeviceKind device = DeviceKind::cpu;
  std::uint64_t seed = 1234;
};

inline examples::Flags read_flags(int argc, char** argv) {
  return examples::Flags(argc, argv, kUsage,
                         {"seq-lens", "lengths-file", "load", "balance", "gpus-per-node", "cap-tokens", "chunk-tokens", "machine",
                          "machine-file", "heads", "kv-heads", "head-dim", "dtype", "device", "seed"},
                         {"causal", "backward", "check"});
}

inline std::vector<std::int64_t> read_lengths_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(ErrorCode::io, fmt::format("--lengths-file {}: cannot open it", path));
  std::vector<std::int64_t> lengths;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    line = line.substr(0, line.find('#'));
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    const auto last = line.find_last_not_of(" \t\r");
    const std::string item = line.substr(first, last - first + 1);
    std::size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size())
      throw Error(ErrorCode::io, fmt::format("--lengths-file {}:{}: '{}' is not a length (one integer a line)", path, number, item));
    lengths.push_back(value);
  }
  if (lengths.empty()) throw Error(ErrorCode::io, fmt::format("--lengths-file {}: it holds no length", path));
  return lengths;
}

// int32, int64, or float32 holding exact integers (at most 2^24; a larger float32 prefix sum may
// already be rounded, and is refused).
inline std::vector<std::int64_t> read_cu_seqlens_npy(const std::string& dir) {
  const std::string path = dir + "/cu_seqlens.npy";
  const auto array = load_npy_integers(path);
  if (array.shape.size() != 1)
    throw Error(ErrorCode::io, fmt::format("{}: cu_seqlens must be one-dimensional [batch + 1], got {} dimensions", path, array.shape.size()));
  std::vector<std::int32_t> cu;
  for (std::size_t i = 0; i < array.data.size(); ++i) {
    const std::int64_t x = array.data[i];
    if (x < 0 || x > std::numeric_limits<std::int32_t>::max())
      throw Error(ErrorCode::io, fmt::format("{}: entry {} is {}, outside [0, 2^31): packed batches use int32 prefix sums", path,
                                             i, x));
    cu.push_back(static_cast<std::int32_t>(x));
  }
  try {
    return lengths_from_cu_seqlens(cu);
  } catch (const Error& e) {
    throw Error(e.code(), fmt::format("{}: {}", path, e.what()));
  }
}

inline Options parse_options(const examples::Flags& f) {
  Options o;
  constexpr long long kMaxInt = std::numeric_limits<std::int32_t>::max();
  const int sources = f.has("seq-lens") + f.has("lengths-file") + f.has("load");
  require(sources == 1, "give the batch with exactly one of --seq-lens, --lengths-file or --load (got {})", sources);
  if (f.has("seq-lens"))
    for (const long long l : f.integers("seq-lens", {}, std::numeric_limits<long long>::min(), std::numeric_limits<long long>::max()))
      o.lengths.push_back(l);
  else if (f.has("lengths-file"))
    o.lengths = read_lengths_file(f.str("lengths-file", ""));
  else
    o.lengths = read_cu_seqlens_npy(f.str("load", ""));
  o.balance = parse_balance(f.str("balance", "hierarchical"));
  o.gpus_per_node = static_cast<int>(f.integer("gpus-per-node", 0, 1, kMaxInt));
  o.cap_tokens = f.integer("cap-tokens", 0, 0, kMaxInt);
  o.chunk_tokens = f.integer("chunk-tokens", 4096, 1, kMaxInt);
  o.heads = static_cast<int>(f.integer("heads", 8, 1, 4096));
  o.kv_heads = static_cast<int>(f.integer("kv-heads", o.heads, 1, 4096));
  o.head_dim = static_cast<int>(f.integer("head-dim", 64, 1, 1024));
  require(o.heads % o.kv_heads == 0, "--heads {} must be a multiple of --kv-heads {}", o.heads, o.kv_heads);
  const std::string device = f.str("device", "cpu");
  require(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '{}'", device);
  o.device = device == "cuda" ? DeviceKind::cuda : DeviceKind::cpu;
  o.dtype = parse_dtype(f.str("dtype", o.device == DeviceKind::cuda ? "bf16" : "fp32"));
  o.machine = f.str("machine", o.device == DeviceKind::cuda ? "h100" : "cpu");
  o.machine_file = f.str("machine-file", "");
  o.causal = f.flag("causal");
  o.backward = f.flag("backward");
  o.check = f.flag("check");
  o.seed = static_cast<std::uint64_t>(f.integer("seed", 1234, 0, std::numeric_limits<long long>::max()));
  return o;
}

inline BalanceRequest balance_request(const Options& o, int ranks, int topology_gpus_per_node) {
  BalanceRequest r;
  r.lengths = o.lengths;
  r.ranks = ranks;
  r.gpus_per_node = o.gpus_per_node > 0 ? o.gpus_per_node : topology_gpus_per_node;
  r.cap_tokens = o.cap_tokens;
  r.q_heads = o.heads;
  r.kv_heads = o.kv_heads;
  r.head_dim = o.head_dim;
  r.dtype = o.dtype;
  r.causal = o.causal;
  r.balance = o.balance;
  r.machine = o.machine;
  r.machine_file = o.machine_file;
  r.chunk_tokens = o.chunk_tokens;
  return r;
}

}  // namespace longattn::varlen_job
