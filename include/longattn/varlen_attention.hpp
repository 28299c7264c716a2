// Attention over a packed batch of sequences of very different lengths, balanced over the ranks:
// short sequences stay whole on one rank (no communication), medium ones run a ring (or a Ulysses x
// ring hybrid) over a group of ranks inside a node, the longest over whole nodes. A BalancedBatch is
// the plan (made by the cost-model planner, the same on every rank); VarlenAttention executes it
// forward and backward; VarlenRemap moves rows between the layout linear layers want (the packed
// batch cut into P equal contiguous slices) and the one attention runs on (the plan's), so a trainer
// calls remap, attention, remap back.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "longattn/layout.hpp"

namespace longattn {

// How a batch is spread over the ranks.
//   hierarchical:        the cost-model planner (one rank, a group inside a node, or whole nodes);
//   per_sequence_zigzag: every sequence cut into 2P chunks over all P ranks, one ring (TE's THD);
//   whole_sequences:     every sequence whole on one rank, longest first onto the least loaded;
//   flat_minheap:        fixed-size chunks placed one by one (MagiAttention-like): planned and
//                        priced only; VarlenAttention refuses to run it.
enum class Balance { hierarchical, per_sequence_zigzag, whole_sequences, flat_minheap };
const char* to_string(Balance balance) noexcept;  // "hierarchical", "per-sequence-zigzag", ...
Balance parse_balance(const std::string& name);   // throws Error(invalid_argument) naming the four

struct BalanceRequest {
  std::vector<std::int64_t> lengths;  // tokens of each sequence in batch order (zeros allowed)
  int ranks = 1;
  int gpus_per_node = 1;        // ranks are numbered node by node
  std::int64_t cap_tokens = 0;  // most tokens one rank may hold; 0: no cap
  int q_heads = 1, kv_heads = 1, head_dim = 64;
  DType dtype = DType::bf16;
  bool causal = true;
  Balance balance = Balance::hierarchical;
  std::string machine = "h100";   // the cost model's built-in machine: h100, h200 or cpu
  std::string machine_file;       // optional: rates and links replacing the built-in machine's
  std::int64_t chunk_tokens = 4096;  // flat_minheap only
};

// Sequence lengths from prefix sums; throws Error(invalid_argument) naming the entry when
// cu_seqlens does not start at 0 or decreases.
std::vector<std::int64_t> lengths_from_cu_seqlens(const std::vector<std::int32_t>& cu_seqlens);

// One group of the plan: ranks [first_rank, first_rank + size) running `sequences` together.
struct BalancedGroup {
  int first_rank = 0, size = 1;
  int ulysses = 1;        // hybrid: ranks per Ulysses group (1 for a plain ring)
  std::string tier;       // "one-rank", "one-node", "nodes"
  std::string sharding;   // "whole", "zigzag", "hybrid", "chunks"
  std::vector<int> sequences;
};

// The plan's modelled figures (cost model, seconds of one layer's forward and backward).
struct BalanceModel {
  double step_seconds = 0;  // the slowest rank
  double imbalance = 1;     // slowest / mean rank
  double bytes_intra_node = 0, bytes_inter_node = 0;
  double planner_ms = 0;    // CPU time of planning
  std::vector<double> rank_seconds;
};

// A batch planned over the ranks. Pure planning (no communication): every rank builds the same one
// from the same request. Throws Error(invalid_argument) saying what to change on negative lengths, a
// batch over int32 prefix sums, ranks that are not whole nodes, a head layout that is not GQA, or a
// sequence (or the batch) that cannot fit under the cap even across all ranks.
class BalancedBatch {
 public:
  explicit BalancedBatch(const BalanceRequest& request);
  ~BalancedBatch();
  BalancedBatch(const BalancedBatch&);
  BalancedBatch& operator=(const BalancedBatch&);

  const BalanceRequest& request() const noexcept;
  int ranks() const noexcept;
  const std::vector<std::int32_t>& cu_seqlens() const noexcept;  // of the whole batch
  std::int64_t total_tokens() const noexcept;

  // The attention layout: `rank`'s tokens in local order, group by group (runs of one sequence).
  std::vector<TokenRun> attention_runs(int rank) const;
  std::int64_t attention_tokens(int rank) const;
  // The linear layout: rank r holds global rows [linear_begin(r), linear_begin(r + 1)), slices
  // differing by at most one token.
  std::int64_t linear_begin(int rank) const;
  std::int64_t linear_tokens(int rank) const { return linear_begin(rank + 1) - linear_begin(rank); }

  std::vector<BalancedGroup> groups() const;  // in the order every rank runs them
  // Attention FLOPs (forward, 4 * head_dim * q_heads per visible query/key pair) `rank` computes: its
  // query rows', or in a hybrid group its 1 / ulysses share (by heads) of its Ulysses group's rows.
  double attention_flops(int rank) const;
  const BalanceModel& model() const noexcept;
  // Empty when VarlenAttention can run this plan, else why not (flat_minheap).
  std::string unexecutable_reason() const;

  struct Impl;
  const Impl& impl() const noexcept { return *impl_; }

 private:
  std::shared_ptr<const Impl> impl_;
};

struct VarlenOptions {
  float scale = 0.0f;      // 0 => 1/sqrt(head_dim)
  void* stream = nullptr;  // compute stream for GPU backends
  DType gradient_transport = DType::f32;  // of the rings' travelling dK/dV (RingOptions)
};

// Measured by the last call on this rank: bytes this rank sent, by whether the receiver shares its
// node (Communicator::topology()), and the host wall time.
struct VarlenStats {
  double wall_ms = 0;
  std::size_t bytes_intra_node = 0, bytes_inter_node = 0;
};

class VarlenAttention {
 public:
  // Collective over `comm` (size == batch.ranks(), same batch on every rank, checked). Makes one
  // sub-communicator per group size by Communicator::split (every rank takes part) and the groups'
  // ring or hybrid attention on them, in the plan's group order. Throws Error(invalid_argument) on
  // every rank when the plan cannot be executed (flat_minheap) or the heads do not fit it. The
  // backend (make_backend("auto") when null) runs every local call; its device holds the tensors.
  VarlenAttention(Communicator& comm, const BalancedBatch& batch, VarlenOptions options = {},
                  std::unique_ptr<AttentionBackend> backend = nullptr);
  ~VarlenAttention();
  VarlenAttention(const VarlenAttention&) = delete;
  VarlenAttention& operator=(const VarlenAttention&) = delete;

  // Tensors in the attention layout (batch.attention_runs(rank) order), n = attention_tokens(rank):
  // q [n, Hq, D], k and v [n, Hkv, D] in the request's dtype; o [n, Hq, D] in it or f32; lse
  // [Hq, n] f32. Collective. A tensor of the wrong shape on any rank is one Error(invalid_argument)
  // on every rank before any communication.
  void forward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse);
  // o and lse from forward; dq [n, Hq, D], dk and dv [n, Hkv, D] in the dtype or f32.
  void backward(TensorView q, TensorView k, TensorView v, TensorView o, TensorView lse, TensorView d_o, TensorView dq,
                TensorView dk, TensorView dv);

  const VarlenStats& last_stats() const noexcept;
  AttentionBackend& backend() noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Moves rows between the linear layout and the attention layout of a batch: one alltoallv each
// way, for rows of any width (q, k, v or any activation in the forward, their gradients in the
// backward: the same exchange). Buffers live on `ops`' device (host or GPU).
class VarlenRemap {
 public:
  // Collective only in its calls; `comm` (size == batch.ranks()) and `ops` must outlive this.
  VarlenRemap(Communicator& comm, const BalancedBatch& batch, DeviceOps& ops);
  ~VarlenRemap();
  VarlenRemap(const VarlenRemap&) = delete;
  VarlenRemap& operator=(const VarlenRemap&) = delete;

  // linear [linear_tokens(rank), ...] -> attention [attention_tokens(rank), ...]; both tensors of
  // one dtype and the same row width. Collective; a wrong shape on any rank is one error on all.
  void to_attention(const TensorView& linear, const TensorView& attention, void* stream = nullptr);
  // attention -> linear: the inverse.
  void to_linear(const TensorView& attention, const TensorView& linear, void* stream = nullptr);

  std::size_t last_bytes_sent() const noexcept;  // to other ranks, by the last call

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longattn
