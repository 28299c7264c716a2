// Sequence-parallel attention with a choice of strategy: the one front door for a sequence (or a
// packed batch of sequences) sharded over the ranks of a communicator.
//   ring:    key/value shards travel a ring over all ranks (ring.hpp);
//   ulysses: an all-to-all turns sequence shards into head shards, every rank attends whole
//            sequences for heads / P of the heads, a second all-to-all turns the result back;
//   hybrid:  U x R: Ulysses inside groups of U consecutive ranks (a node's GPUs, fast links), a
//            ring across the R groups (the network), the layout (zigzag) over the ring dimension;
//   automatic: U and R from the cost model for this shape and the machine (topology, kernel rates,
//            link speeds), the candidates and their modelled times logged.
// Which tokens a rank holds depends on the strategy: shards() says, and callers shard with it.
//
// What Ulysses groups cost (U > 1), per call and rank, with n the rank's tokens and N its group's:
//   forward:  q, k and v out (n tokens x the other members' heads), o and lse back (the other
//             members' N - n tokens x this rank's heads);
//   backward: q, k, v, o, dO and lse out again (nothing is kept from the forward, so a forward and
//             its backward need not be paired, and no memory is held between them), dQ back, and
//             dK/dV back in fp32.
// GQA/MQA: a member receives only the kv heads its query heads read. With fewer kv heads than
// members (U a multiple of the kv heads), a kv head is replicated onto the U / kv_heads members
// that read it: each of them receives its k and v, and in the backward each computes a partial
// dK/dV of it, which the tokens' home ranks sum (in fp32) on the way back.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/layout.hpp"
#include "longattn/ring.hpp"

namespace longattn {

enum class Strategy { ring, ulysses, hybrid, automatic };
const char* to_string(Strategy s) noexcept;      // "ring", "ulysses", "hybrid", "auto"
Strategy parse_strategy(const std::string& name);  // throws Error(invalid_argument) naming the four

// What is attended: fixed for the object's life, the same on every rank.
struct AttentionProblem {
  std::vector<std::int32_t> cu_seqlens;  // prefix sums of the whole batch (batch + 1 entries)
  int q_heads = 1, kv_heads = 1, head_dim = 64;
  DType dtype = DType::bf16;
  bool causal = false;
  Layout layout = Layout::zigzag;  // over all ranks (ring) or over the ring dimension (hybrid)
};

struct ParallelOptions {
  Strategy strategy = Strategy::ring;
  // Ulysses group size U for hybrid (must divide the ranks and the query heads; the kv heads must
  // divide it or be divisible by it). 0: the ranks of one node (Communicator::topology()).
  // Ignored by ring (U = 1) and ulysses (U = all ranks); chosen by automatic.
  int ulysses_size = 0;
  // A machine model file for automatic (partition/cost_model.hpp's rate table format, see
  // docs); empty: the built-in model of the device, links probed at construction.
  std::string machine_file;
  RingOptions ring;  // causal is taken from the problem; scale, stream, profiling, on_step apply
};

// Timings of the last call, in milliseconds: the ring part's, plus the all-to-alls (whose host
// time on stream-ordered GPU communicators is the time to queue them, not to run them).
struct ParallelStats {
  RingStats ring;
  double exchange_ms = 0;  // host time in the head all-to-alls (Ulysses and hybrid)
  std::size_t exchange_bytes_sent = 0;
  double wall_ms = 0;
};

class ParallelAttention {
 public:
  // Collective: every rank constructs it with the same problem and options (checked). Throws
  // Error(invalid_argument) on every rank, naming the Ulysses sizes that can, when the strategy
  // cannot run the shape: U must divide the ranks and the query heads, and the kv heads must
  // divide U or be divisible by it. Ulysses ignores the layout (its one group holds the batch in
  // order); hybrid spreads the layout over its R groups. Hybrid with ulysses_size 0 needs nodes of
  // one size. The backend runs the local attention; its device is where the tensors live.
  ParallelAttention(Communicator& comm, AttentionProblem problem, ParallelOptions options,
                    std::unique_ptr<AttentionBackend> backend = nullptr);
  ~ParallelAttention();
  ParallelAttention(const ParallelAttention&) = delete;
  ParallelAttention& operator=(const ParallelAttention&) = delete;

  // The tokens every rank holds under the chosen strategy (a two-level plan for Ulysses/hybrid).
  const ShardPlan& shards() const noexcept;
  Strategy strategy() const noexcept;  // never automatic: what automatic chose
  int ulysses_size() const noexcept;   // U; ring size R = ranks / U
  // Why this strategy: for automatic the candidates with modelled times, else the request.
  const std::string& choice_reason() const noexcept;

  // Same tensors and contracts as RingAttention::forward/backward, on shards(): q, k, v in the
  // problem's dtype; o, d_o, dq, dk, dv in it or fp32; lse fp32 [q_heads, n]. Collective. A tensor
  // of the wrong shape or dtype on any rank is one Error(invalid_argument) on every rank, before
  // any exchange (naming the rank).
  void forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse);
  void backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o, TensorView dq,
                TensorView dk, TensorView dv);

  const ParallelStats& last_stats() const noexcept;
  AttentionBackend& backend() noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longattn
