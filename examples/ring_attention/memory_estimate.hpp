// What a ring_attention run needs in memory, worked out from the shapes alone before anything the
// size of the sequence exists, so an impossible run is refused at once with the numbers instead of
// growing until the machine runs out.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>

#include <fmt/format.h>

#include "longattn/error.hpp"
#include "longattn/layout.hpp"
#include "longattn/ring.hpp"
#include "options.hpp"

namespace longattn::ring_job {

struct MemoryNeed {
  double tensors = 0;     // one rank's q, k, v, o, lse (and dO, dq, dk, dv) on its device
  double workspaces = 0;  // one rank's ring workspaces on its device
  double host_rank = 0;   // host memory of every rank besides its device: loaded rows, staging
  double host_rank0 = 0;  // rank 0's extra host memory for --check and --dump (whole tensors)
};

// The most kv heads one member of a Ulysses group of `ulysses` reads: its query heads' kv heads,
// a kv head replicated onto every member whose query heads share it (GQA/MQA).
inline int kv_heads_per_member(int heads, int kv_heads, int ulysses) {
  const int per_member = heads / ulysses, group = heads / kv_heads;
  int most = 0;
  for (int u = 0; u < ulysses; ++u) most = std::max(most, ((u + 1) * per_member - 1) / group - u * per_member / group + 1);
  return most;
}

// `ulysses`: the Ulysses group size U of the strategy (1 for a ring, the ranks for Ulysses).
inline MemoryNeed estimate_memory(const Options& o, int nranks, int ulysses = 1) {
  const ShardPlan plan({0, static_cast<std::int32_t>(o.seq_len)}, o.layout, nranks, ulysses);
  const double n = static_cast<double>(plan.max_local_tokens()), T = static_cast<double>(o.seq_len);
  const double H = o.heads, K = o.kv_heads, D = o.head_dim, es = static_cast<double>(dtype_size(o.dtype));
  const double q_rows = H * D, kv_rows = K * D;
  MemoryNeed m;
  m.tensors = n * (2 * q_rows + 2 * kv_rows) * es + n * H * 4;
  if (o.backward) m.tensors += n * (2 * q_rows + 2 * kv_rows) * es;
  // The ring runs over the groups, on each member's heads: with U > 1 a member also holds its
  // group's rows of q, k, v, o, lse (and dO, dq, dk, dv, the dk/dv sums) for its heads.
  const ShardPlan ring_plan = ulysses > 1 ? plan.group_plan() : plan;
  const int member_heads = o.heads / ulysses, member_kv_heads = kv_heads_per_member(o.heads, o.kv_heads, ulysses);
  int fullest = 0;
  for (int r = 0; r < ring_plan.world(); ++r)
    if (ring_plan.local_tokens(r) > ring_plan.local_tokens(fullest)) fullest = r;
  m.workspaces = static_cast<double>(RingAttention::workspace_bytes(ring_plan, fullest, member_heads, member_kv_heads, o.head_dim,
                                                                    o.dtype, o.backward, o.grad_transport));
  if (ulysses > 1) {
    const double group_rows = static_cast<double>(ring_plan.max_local_tokens());
    const double member_q = member_heads * D, member_kv = member_kv_heads * D;
    m.tensors += group_rows * (2 * member_q + 2 * member_kv) * es + group_rows * member_heads * 4;
    if (o.backward) m.tensors += group_rows * (2 * member_q + 4 * member_kv) * es + group_rows * 2 * member_kv * 4;
  }
  // With --load a rank keeps its own rows of the files (read through a 32 MiB piece); filling the
  // device stages 32 MiB at most; the shard's index lists cost 12 bytes a token.
  const double file_values = T * (2 * q_rows + 2 * kv_rows) + (o.backward ? T * q_rows : 0);
  const double own_values = n * (2 * q_rows + 2 * kv_rows) + (o.backward ? n * q_rows : 0);
  m.host_rank = (o.load.empty() ? 0 : 4 * own_values + 32.0 * (1 << 20)) + 32.0 * (1 << 20) + 12 * n;
  // Rank 0 gathers o, lse (and dq, dk, dv) whole; --check also builds q, k, v (and dO) whole in the
  // dtype and as f32, and the oracle's own outputs.
  const double outputs = T * (q_rows + H) + (o.backward ? T * (q_rows + 2 * kv_rows) : 0);
  if (o.check || !o.dump.empty()) m.host_rank0 += 2 * 4 * outputs;
  if (o.check) m.host_rank0 += file_values * (es + 4) + 4 * outputs;
  return m;
}

// MemAvailable of /proc/meminfo in bytes; 0 where it cannot be read (then nothing is refused).
inline double host_memory_available() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return 0;
}

inline std::string gib(double bytes) { return fmt::format("{:.1f} GiB", bytes / (1024.0 * 1024 * 1024)); }

// Throws with the numbers when the ranks sharing this host need more host memory than it has
// available. On GPUs the tensors and workspaces live in device memory, whose allocation fails
// cleanly; on CPUs they are host memory too.
inline void require_memory(const Options& o, int nranks, int ulysses, int ranks_on_host, bool rank0_here) {
  const MemoryNeed m = estimate_memory(o, nranks, ulysses);
  const bool on_host = o.device == DeviceKind::cpu;
  const double per_rank = m.host_rank + (on_host ? m.tensors + m.workspaces : 0);
  const double need = ranks_on_host * per_rank + (rank0_here ? m.host_rank0 : 0);
  const double available = host_memory_available();
  if (available <= 0 || need <= available) return;
  std::string parts = fmt::format("{} rank{} x {} (", ranks_on_host, ranks_on_host == 1 ? "" : "s", gib(per_rank));
  if (on_host) parts += fmt::format("tensors {}, ring workspaces {}, ", gib(m.tensors), gib(m.workspaces));
  parts += fmt::format("inputs and staging {})", gib(m.host_rank));
  if (rank0_here && m.host_rank0 > 0) parts += fmt::format(" + {} on rank 0 for --check/--dump", gib(m.host_rank0));
  throw Error(ErrorCode::out_of_capacity,
              fmt::format("this run needs about {} of memory on this host ({}) but {} is available; use more ranks or hosts, a "
                          "shorter --seq-len or fewer heads{}",
                          gib(need), parts, gib(available), o.check ? ", or leave out --check" : ""));
}

}  // namespace longattn::ring_job
