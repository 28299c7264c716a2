// Ring attention: exact attention over a sequence (or a batch of sequences) sharded over the ranks
// of a communicator. Each rank keeps its query shard; key/value shards travel around the ring, the
// next one in flight while the current one is computed. No rank ever holds the whole sequence.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/layout.hpp"

namespace longattn {

struct RingOptions {
  bool causal = false;
  float scale = 0.0f;             // 0 => 1/sqrt(head_dim)
  void* stream = nullptr;         // compute stream for GPU backends
  // Time each local step on its own (synchronizing the device after it) to report compute_ms on
  // GPUs. Costs the overlap of that run; CPU backends are synchronous and always report it.
  bool profile_steps = false;
  // Called after each ring step on every rank: (phase "forward"/"backward", step, steps).
  std::function<void(const char*, int, int)> on_step;
  // The dtype in which the backward's partial dK/dV travel the ring: f32, or bf16 to halve that
  // traffic and the buffers in transit (each hop still adds in f32; README.md's ring section gives
  // the error this adds). The same on every rank.
  DType gradient_transport = DType::f32;
};

// Timings of the last call, in milliseconds (host wall clock; on GPUs measured with events).
struct RingStats {
  double wall_ms = 0;     // the whole call
  double compute_ms = 0;  // sum of local kernel (and merge) time; on GPUs only with profile_steps
  double wait_ms = 0;     // host time blocked waiting for transfers (CPU/MPI)
  int steps = 0;
  int skipped_steps = 0;  // steps where the causal mask hid every key
  std::size_t bytes_sent = 0;
};

class RingAttention {
 public:
  // `plan` says which tokens every rank holds (same plan on all ranks); the backend runs the local
  // steps (make_backend("auto") when null). The communicator must outlive this object.
  RingAttention(Communicator& comm, ShardPlan plan, RingOptions options, std::unique_ptr<AttentionBackend> backend = nullptr);
  ~RingAttention();
  RingAttention(const RingAttention&) = delete;
  RingAttention& operator=(const RingAttention&) = delete;

  // Local shards in the plan's layout: q [n, Hq, D]; k, v [n, Hkv, D]; o [n, Hq, D] (q's dtype or
  // fp32); lse [Hq, n] fp32, where n = plan.local_tokens(rank). Collective: every rank calls it.
  void forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse);
  // o and lse from forward; gradients dq [n,Hq,D], dk/dv [n,Hkv,D] in q's dtype or fp32.
  void backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o, TensorView dq,
                TensorView dk, TensorView dv);

  // Device bytes of workspace forward (and backward) allocate on `rank` for these shapes, without
  // allocating anything: to refuse a run that cannot fit before building it. gradient_transport as
  // in RingOptions.
  static std::size_t workspace_bytes(const ShardPlan& plan, int rank, int heads, int kv_heads, int head_dim, DType dtype,
                                     bool backward, DType gradient_transport = DType::f32);

  const RingStats& last_stats() const noexcept;
  AttentionBackend& backend() noexcept;
  const ShardPlan& plan() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longattn
