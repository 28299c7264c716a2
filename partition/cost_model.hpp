// The cost model: how long attention work takes on a given machine, from a kernel-rate table,
// per-tier link speeds and a linear-layer coefficient. It ranks strategies (ring, Ulysses, U x R
// hybrid) for the `auto` choice and prices sequences for the variable-length planner. Pure
// arithmetic: no devices, no communication; every estimate is in seconds.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "partition/plan.hpp"

namespace longattn::partition {

// ---- kernel rates ----------------------------------------------------------------------------

// Achieved rates of one local attention call on square blocks of `length` queries x `length` keys,
// in TFLOP/s counted as forward_flops / backward_flops below.
struct RatePoint {
  std::int64_t length = 0;
  double forward_tflops = 0;
  double backward_tflops = 0;
  bool operator==(const RatePoint&) const = default;
};

// Rates by block size for each (causal, head_dim) measured. Lookups interpolate linearly in
// log(length) between points and clamp to the end points outside them.
class KernelRateTable {
 public:
  // Adds a measured point; points of one curve may come in any order. Refuses a length or rate <= 0
  // and a head dim <= 0, and a second point at the same length of the same curve.
  void add(bool causal, int head_dim, RatePoint point);
  bool empty() const noexcept { return curves_.empty(); }

  // Rate of a query_rows x key_rows block. Rectangular blocks are looked up at the geometric mean
  // of their sides, which is exact for the square blocks the table holds. The curve is the one of
  // this causality and the nearest head dim; a causality never measured falls back to the other.
  double forward_tflops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim) const;
  double backward_tflops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim) const;

  // The text form, one point a line: `causal|full <head_dim> <length> <forward_tflops>
  // <backward_tflops>`; blank lines and lines starting with '#' are skipped. What a calibration
  // bench writes and load_rate_table reads back.
  void write(std::ostream& out) const;

  struct Curve {
    bool causal = false;
    int head_dim = 0;
    std::vector<RatePoint> points;  // increasing length
  };
  const std::vector<Curve>& curves() const noexcept { return curves_; }

 private:
  const Curve& curve_for(bool causal, int head_dim) const;
  std::vector<Curve> curves_;
};

// Reads a table in KernelRateTable::write's form. `source_name` names the text in errors
// ("<source_name>:<line>: ..."). Throws Error(io) on a malformed line or when no point is given.
KernelRateTable parse_rate_table(std::istream& in, const std::string& source_name);
KernelRateTable load_rate_table(const std::string& path);

// ---- FLOPs -----------------------------------------------------------------------------------

// (query, key) pairs a block computes: all of them, or, causal by index (key j visible to query i
// iff j <= i), the lower triangle: about half on a square diagonal block.
double visible_pairs(std::int64_t query_rows, std::int64_t key_rows, bool causal);
// Causal by index with an offset: key j visible to query i iff j <= i + causal_offset.
double visible_pairs_with_offset(std::int64_t query_rows, std::int64_t key_rows, std::int64_t causal_offset);
// Forward: two products of 2 * d FLOPs per visible pair and query head (QK^T and PV).
double forward_flops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim, int query_heads);
// The backward does five such products where the forward does two (FlashAttention's count, the
// one bench/results/ uses): 2.5x the forward.
inline constexpr double kBackwardFlopFactor = 2.5;
double backward_flops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim, int query_heads);

// ---- links -----------------------------------------------------------------------------------

struct Link {
  double bytes_per_second = 0;  // per GPU, one direction
  double latency_seconds = 0;   // per message
};

enum class Tier { intra_node, inter_node };
const char* to_string(Tier tier) noexcept;

// The tier a message between two ranks takes when ranks are numbered node by node, gpus_per_node
// to a node.
Tier tier_between(int rank_a, int rank_b, int gpus_per_node);
// The slowest tier among a group of `group_size` ranks first, first + stride, ...: what a ring or
// an all-to-all over that group runs at, since all its members step together.
Tier group_tier(int first_rank, int group_size, int stride, int gpus_per_node);

// ---- the machine -----------------------------------------------------------------------------

struct MachineModel {
  std::string name;
  KernelRateTable rates;
  Link intra_node;
  Link inter_node;
  // Linear layers (QKV/output projections, MLP) of one transformer layer, forward, per token; the
  // backward costs twice the forward (two GEMMs per forward GEMM).
  double linear_seconds_per_token = 0;

  const Link& link(Tier tier) const noexcept { return tier == Tier::intra_node ? intra_node : inter_node; }
  // bytes / bandwidth + messages x latency on the tier's link.
  double transfer_seconds(double bytes, Tier tier, int messages = 1) const;
  double forward_seconds(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim, int query_heads) const;
  double backward_seconds(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim, int query_heads) const;
  double linear_forward_seconds(std::int64_t tokens) const { return linear_seconds_per_token * static_cast<double>(tokens); }
};

// Forward seconds per token of one layer's linear layers for a model of this hidden size (four
// hidden^2 projections and an MLP of 4x width: 12 hidden^2 weights, 2 FLOPs each) at a GEMM rate.
double linear_seconds_per_token(std::int64_t hidden, double gemm_tflops);

// Built-in machines: "h100", "h200" and "cpu" (one thread of the CPU backend; sources beside their
// definitions, cost_model_machines.cpp).
// Throws Error(invalid_argument) naming the known machines for any other name.
MachineModel default_machine(std::string_view name);
std::vector<std::string> default_machine_names();

// ---- overlap ---------------------------------------------------------------------------------

// Steps whose transfer runs behind the step's compute: sum over steps of max(compute, transfer),
// plus what cannot hide (a transfer before the first step, one after the last). Spans of equal size.
double overlapped_steps_seconds(std::span<const double> compute, std::span<const double> transfer,
                                double exposed_before = 0, double exposed_after = 0);

// ---- strategies ------------------------------------------------------------------------------

struct AttentionShape {
  std::int64_t seq_len = 0;  // tokens of one sequence, sharded over all ranks
  int query_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  bool causal = true;
  int element_bytes = 2;   // q, k, v, o on the wire (bf16/fp16)
  int gradient_bytes = 4;  // dK/dV travelling around the ring (accumulated in fp32)
};

struct NodeLayout {
  int ranks = 0;
  int gpus_per_node = 0;
};

// One candidate: Ulysses groups of `ulysses` consecutive ranks, a ring over the `ring` groups.
// ulysses == ranks is pure Ulysses, ulysses == 1 a pure ring.
struct StrategyEstimate {
  int ulysses = 1;
  int ring = 1;
  double forward_seconds = 0;
  double backward_seconds = 0;
  double attention_compute_seconds = 0;  // forward + backward local calls alone
  double linear_seconds = 0;             // forward + backward linear layers of the rank's tokens
  Tier ring_tier = Tier::intra_node;
  Tier all_to_all_tier = Tier::intra_node;
  double total_seconds() const noexcept { return forward_seconds + backward_seconds; }
  std::string name() const;  // "ring", "ulysses" or "hybrid U x R"
};

// Why ulysses cannot run this shape on this layout, or empty when it can: it must divide the ranks
// and the query heads, and the kv heads must divide it or be divisible by it.
std::string hybrid_unsupported_reason(const AttentionShape& shape, const NodeLayout& layout, int ulysses);

// The modelled forward and backward step of one attention layer (plus its linear layers) with
// Ulysses degree `ulysses`: the all-to-alls exposed, the ring's transfers behind its steps (zigzag
// over the ring dimension for causal shapes). Throws Error(invalid_argument) with the reason above
// and the valid degrees when ulysses cannot run the shape.
StrategyEstimate estimate_strategy(const MachineModel& machine, const AttentionShape& shape, const NodeLayout& layout,
                                   int ulysses);

// Every Ulysses degree that can run the shape, fastest (forward + backward) first; ties go to the
// smaller degree. Throws Error(invalid_argument) on a layout or shape that is not positive.
std::vector<StrategyEstimate> rank_strategies(const MachineModel& machine, const AttentionShape& shape,
                                              const NodeLayout& layout);

// ---- plans ---------------------------------------------------------------------------------

// What a plan leaves out and its cost needs.
struct PlanCostInputs {
  int head_dim = 0;
  int element_bytes = 2;
  int gpus_per_node = 0;
  std::vector<std::int64_t> shard_tokens;  // [world]: rows of each rank's key/value shard (ring transfers)
  int gradient_bytes = 4;                  // dK/dV travelling around a ring in the backward
};

struct PlanEstimate {
  std::vector<double> rank_seconds;          // [world]
  std::vector<double> rank_compute_seconds;  // [world]: the local calls alone
  double step_seconds = 0;                   // sum over steps of the slowest rank's step (lockstep)
};

// The forward of a plan, rank by rank: per step, the all-to-alls exposed (each rank's exchanges
// over NVLink and the network at once, so the slower of the two), then the calls with the ring
// transfer behind them. Calls with explicit positions are counted as half their pairs at the
// causal rate: the plan does not say which pairs their positions leave visible.
PlanEstimate estimate_plan_forward(const MachineModel& machine, const Plan& plan, const PlanCostInputs& inputs);
// The backward of the same plan: its exchanges carry the gradients the other way (dO and
// rowsum(dO * O) in, dq, dk, dv out: the same counts), its calls run at the backward rate (2.5x the
// FLOPs), each ring transfer carries the shard's dK/dV (gradient_bytes) with it, and a rank whose
// last step read another rank's shard sends those dK/dV home after it, exposed.
PlanEstimate estimate_plan_backward(const MachineModel& machine, const Plan& plan, const PlanCostInputs& inputs);

}  // namespace longattn::partition
