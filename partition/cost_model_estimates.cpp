// Estimates built from the cost model's pieces: ring, Ulysses and U x R hybrid steps in closed form
// for the strategy choice, and plans priced call by call.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/ranges.h>

#include "common/check.hpp"
#include "partition/cost_model.hpp"
#include "partition/hybrid_plan.hpp"
#include "partition/ulysses_plan.hpp"

namespace longattn::partition {
// ---- strategies ------------------------------------------------------------------------------

std::string StrategyEstimate::name() const {
  if (ring == 1 && ulysses > 1) return "ulysses";
  if (ulysses == 1) return "ring";
  return fmt::format("hybrid {} x {}", ulysses, ring);
}

namespace {

void check_shape(const AttentionShape& shape, const NodeLayout& layout) {
  LONGATTN_INVALID(layout.ranks > 0 && layout.gpus_per_node > 0, "layout: ranks and GPUs per node must be positive, got {} and {}",
                   layout.ranks, layout.gpus_per_node);
  LONGATTN_INVALID(shape.seq_len > 0 && shape.query_heads > 0 && shape.kv_heads > 0 && shape.head_dim > 0 &&
                       shape.element_bytes > 0 && shape.gradient_bytes > 0,
                   "shape: sequence length, heads, kv heads, head dim and byte sizes must be positive");
}

std::vector<int> valid_degrees(const AttentionShape& shape, const NodeLayout& layout) {
  std::vector<int> degrees;
  for (int u = 1; u <= layout.ranks; ++u)
    if (hybrid_unsupported_reason(shape, layout, u).empty()) degrees.push_back(u);
  return degrees;
}

}  // namespace

std::string hybrid_unsupported_reason(const AttentionShape& shape, const NodeLayout& layout, int ulysses) {
  if (ulysses <= 0 || layout.ranks % ulysses != 0)
    return fmt::format("Ulysses size {} does not divide the {} ranks", ulysses, layout.ranks);
  // The plans' own rule, so that the model never offers a degree the plans refuse.
  return hybrid_heads_unsupported_reason(shape.query_heads, shape.kv_heads, ulysses);
}

StrategyEstimate estimate_strategy(const MachineModel& m, const AttentionShape& shape, const NodeLayout& layout,
                                   int ulysses) {
  check_shape(shape, layout);
  if (const auto reason = hybrid_unsupported_reason(shape, layout, ulysses); !reason.empty())
    throw Error(ErrorCode::invalid_argument,
                fmt::format("{}; valid Ulysses sizes here: {}", reason, fmt::join(valid_degrees(shape, layout), ", ")));

  const int P = layout.ranks, G = layout.gpus_per_node, U = ulysses, R = P / U;
  StrategyEstimate e{.ulysses = U, .ring = R};
  // Ulysses groups are U consecutive ranks; ring r links member r of every group. A group steps at
  // the pace of its slowest link.
  e.all_to_all_tier = Tier::intra_node;
  for (int g = 0; g < R; ++g)
    if (group_tier(g * U, U, 1, G) == Tier::inter_node) e.all_to_all_tier = Tier::inter_node;
  e.ring_tier = Tier::intra_node;
  for (int member = 0; member < U; ++member)
    if (group_tier(member, R, U, G) == Tier::inter_node) e.ring_tier = Tier::inter_node;

  const double d = shape.head_dim, eb = shape.element_bytes, gb = shape.gradient_bytes;
  const double local_tokens = static_cast<double>(shape.seq_len) / P;  // per rank, sequence layout
  const std::int64_t group_tokens = std::max<std::int64_t>(1, shape.seq_len / R);  // per rank, head layout
  const int heads = shape.query_heads / U;
  // Fewer kv heads than ranks in a group: each rank keeps a copy of the one kv head its query heads read.
  const int kv_heads = std::max(1, shape.kv_heads / U);

  // All-to-all: each rank sends the other U-1 ranks their heads of its local tokens.
  const double peers = U - 1;
  auto all_to_all = [&](double bytes_per_token_and_peer) {
    return U == 1 ? 0.0 : m.transfer_seconds(peers * local_tokens * bytes_per_token_and_peer, e.all_to_all_tier, U - 1);
  };
  const double qkv_in = all_to_all((heads + 2.0 * kv_heads) * d * eb);
  const double o_out = all_to_all(heads * (d * eb + 4.0));           // o and its lse
  const double dout_in = all_to_all(heads * (d * eb + 4.0));         // dO and rowsum(dO * O)
  const double grads_out = all_to_all((heads + 2.0 * kv_heads) * d * eb);  // dq, dk, dv

  // Ring steps over R shards of group_tokens; causal shards are zigzag pairs, so step 0 is the
  // diagonal (causal by index) and every other step sees half of a full block.
  std::vector<double> forward_compute, backward_compute;
  for (int s = 0; s < R; ++s) {
    const bool diagonal = s == 0 && shape.causal;
    const std::int64_t keys = (shape.causal && s > 0) ? std::max<std::int64_t>(1, group_tokens / 2) : group_tokens;
    forward_compute.push_back(m.forward_seconds(group_tokens, keys, diagonal, shape.head_dim, heads));
    backward_compute.push_back(m.backward_seconds(group_tokens, keys, diagonal, shape.head_dim, heads));
  }
  const double kv_bytes = 2.0 * group_tokens * kv_heads * d * eb;
  const double dkv_bytes = 2.0 * group_tokens * kv_heads * d * gb;
  // The shard for step s+1 moves during step s; nothing moves during the last step.
  std::vector<double> forward_transfer(R, 0.0), backward_transfer(R, 0.0);
  for (int s = 0; s + 1 < R; ++s) {
    forward_transfer[s] = m.transfer_seconds(kv_bytes, e.ring_tier, 2);
    backward_transfer[s] = m.transfer_seconds(kv_bytes + dkv_bytes, e.ring_tier, 4);
  }
  // The backward's dK/dV take one more hop home after the last step, with nothing to hide behind.
  const double gradients_home = R > 1 ? m.transfer_seconds(dkv_bytes, e.ring_tier, 2) : 0.0;

  const auto tokens = static_cast<std::int64_t>(std::ceil(local_tokens));
  const double linear_forward = m.linear_forward_seconds(tokens);
  e.linear_seconds = 3 * linear_forward;
  for (std::size_t s = 0; s < forward_compute.size(); ++s)
    e.attention_compute_seconds += forward_compute[s] + backward_compute[s];
  e.forward_seconds = qkv_in + overlapped_steps_seconds(forward_compute, forward_transfer) + o_out + linear_forward;
  e.backward_seconds = dout_in + overlapped_steps_seconds(backward_compute, backward_transfer, 0, gradients_home) +
                       grads_out + 2 * linear_forward;
  return e;
}

std::vector<StrategyEstimate> rank_strategies(const MachineModel& machine, const AttentionShape& shape,
                                              const NodeLayout& layout) {
  check_shape(shape, layout);
  std::vector<StrategyEstimate> ranked;
  for (int u : valid_degrees(shape, layout)) ranked.push_back(estimate_strategy(machine, shape, layout, u));
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const StrategyEstimate& a, const StrategyEstimate& b) { return a.total_seconds() < b.total_seconds(); });
  return ranked;
}

// ---- plans ---------------------------------------------------------------------------------

namespace {

double call_seconds(const MachineModel& m, const KernelCall& call, int head_dim, bool backward) {
  if (call.q_count == 0 || call.k_count == 0 || call.heads.count == 0) return 0;
  double pairs = 0;
  bool causal = true;
  switch (call.mask) {
    case MaskKind::none:
      pairs = visible_pairs(call.q_count, call.k_count, false);
      causal = false;
      break;
    case MaskKind::causal_by_index:
      pairs = visible_pairs_with_offset(call.q_count, call.k_count, call.causal_offset);
      causal = pairs < static_cast<double>(call.q_count) * static_cast<double>(call.k_count);
      break;
    case MaskKind::positions: pairs = visible_pairs(call.q_count, call.k_count, false) / 2; break;
  }
  const double flops = 4.0 * pairs * head_dim * call.heads.count;
  return backward ? kBackwardFlopFactor * flops / (m.rates.backward_tflops(call.q_count, call.k_count, causal, head_dim) * 1e12)
                  : flops / (m.rates.forward_tflops(call.q_count, call.k_count, causal, head_dim) * 1e12);
}

double all_to_all_seconds(const MachineModel& m, const AllToAll& exchange, int rank, const PlanCostInputs& in) {
  const double bytes_per_count = exchange.tensor == PlanTensor::lse ? 4.0 : static_cast<double>(in.head_dim) * in.element_bytes;
  double bytes[2] = {0, 0};
  int messages[2] = {0, 0};
  for (std::size_t peer = 0; peer < exchange.send_counts.size(); ++peer) {
    const auto count = std::max(exchange.send_counts[peer], exchange.recv_counts[peer]);
    if (static_cast<int>(peer) == rank || count == 0) continue;
    const int tier = static_cast<int>(tier_between(rank, static_cast<int>(peer), in.gpus_per_node));
    bytes[tier] += static_cast<double>(count) * bytes_per_count;
    ++messages[tier];
  }
  double seconds = 0;
  for (const Tier tier : {Tier::intra_node, Tier::inter_node}) {
    const int t = static_cast<int>(tier);
    if (messages[t] > 0) seconds = std::max(seconds, m.transfer_seconds(bytes[t], tier, messages[t]));
  }
  return seconds;
}

// Rows of the key/value shard a ring step names: a rank's shard, or for RowSpace::group the rows
// of the group, its members' shards together.
double shard_rows(const Plan& plan, RowSpace rows, int shard, int rank, const PlanCostInputs& in) {
  const int width = rows == RowSpace::group ? plan.group_size : 1;
  const auto first = static_cast<std::size_t>(shard) * static_cast<std::size_t>(width);
  LONGATTN_INVALID(shard >= 0 && first + static_cast<std::size_t>(width) <= in.shard_tokens.size(),
                   "plan cost: a ring step of rank {} reads shard {} of {} rank(s), but shard_tokens has {} entries; "
                   "give one per rank",
                   rank, shard, width, in.shard_tokens.size());
  std::int64_t total = 0;
  for (int m = 0; m < width; ++m) total += in.shard_tokens[first + static_cast<std::size_t>(m)];
  return static_cast<double>(total);
}

// The kv heads a rank's ring carries: all of them, or in a group only those its query heads read.
int ring_kv_heads(const Plan& plan, int rank) {
  if (plan.group_size <= 1) return plan.kv_heads;
  return ulysses_kv_heads(plan.q_heads, plan.kv_heads, plan.group_size, rank % plan.group_size).count;
}

}  // namespace

namespace {

// The forward as the plan says; the backward mirrors it: the same exchanges carry gradients (dO and
// rowsum(dO * O) in, dq, dk, dv out), the calls run at the backward rate, every ring transfer
// carries the travelling dK/dV with the shard, and after the last step they take one more hop home.
PlanEstimate estimate_plan(const MachineModel& m, const Plan& plan, const PlanCostInputs& in, bool backward) {
  LONGATTN_INVALID(in.head_dim > 0 && in.element_bytes > 0 && in.gradient_bytes > 0 && in.gpus_per_node > 0,
                   "plan cost: head dim, element and gradient bytes and GPUs per node must be positive");
  LONGATTN_INVALID(static_cast<int>(plan.ranks.size()) == plan.world,
                   "plan cost: the plan has {} rank plans for a world of {}", plan.ranks.size(), plan.world);
  PlanEstimate e;
  // Ranks go in lockstep (a step's receive waits for its sender's send), so the plan takes, step by
  // step, the slowest rank's time.
  std::vector<double> slowest_step;
  for (int rank = 0; rank < plan.world; ++rank) {
    double total = 0, compute_total = 0;
    const auto& steps = plan.ranks[rank].steps;
    if (slowest_step.size() < steps.size()) slowest_step.resize(steps.size(), 0.0);
    for (std::size_t s = 0; s < steps.size(); ++s) {
      const Step& step = steps[s];
      double step_total = 0;
      for (const auto& exchange : step.all_to_all) step_total += all_to_all_seconds(m, exchange, rank, in);
      double compute = 0;
      for (const auto& call : step.calls) compute += call_seconds(m, call, in.head_dim, backward);
      double transfer = 0;
      const double kv_bytes_per_token = 2.0 * ring_kv_heads(plan, rank) * in.head_dim;  // k and v (or dK and dV)
      if (step.ring) {
        const auto& ring = *step.ring;
        const double per_token = kv_bytes_per_token * (in.element_bytes + (backward ? in.gradient_bytes : 0));
        const int messages = backward ? 4 : 2;
        const double sent = m.transfer_seconds(shard_rows(plan, step.rows, ring.send_shard, rank, in) * per_token,
                                               tier_between(rank, ring.send_to, in.gpus_per_node), messages);
        const double received = m.transfer_seconds(shard_rows(plan, step.rows, ring.recv_shard, rank, in) * per_token,
                                                   tier_between(rank, ring.recv_from, in.gpus_per_node), messages);
        transfer = std::max(sent, received);
      }
      step_total += std::max(compute, transfer);
      // The last ring step (no transfer after it) on a shard from elsewhere leaves that shard's
      // dK/dV one hop from home, with nothing left to hide behind.
      const bool grouped = step.rows == RowSpace::group;
      const int own_shard = grouped ? rank / plan.group_size : rank;
      const bool ends_away = step.rows != RowSpace::gathered && !step.ring && step.key_shard >= 0 && step.key_shard != own_shard;
      if (backward && ends_away) {
        const int home = grouped ? step.key_shard * plan.group_size + rank % plan.group_size : step.key_shard;
        const double gradient_bytes =
            kv_bytes_per_token * in.gradient_bytes * shard_rows(plan, step.rows, step.key_shard, rank, in);
        step_total += m.transfer_seconds(gradient_bytes, tier_between(rank, home, in.gpus_per_node), 2);
      }
      slowest_step[s] = std::max(slowest_step[s], step_total);
      total += step_total;
      compute_total += compute;
    }
    e.rank_seconds.push_back(total);
    e.rank_compute_seconds.push_back(compute_total);
  }
  for (const double t : slowest_step) e.step_seconds += t;
  return e;
}

}  // namespace

PlanEstimate estimate_plan_forward(const MachineModel& machine, const Plan& plan, const PlanCostInputs& inputs) {
  return estimate_plan(machine, plan, inputs, false);
}

PlanEstimate estimate_plan_backward(const MachineModel& machine, const Plan& plan, const PlanCostInputs& inputs) {
  return estimate_plan(machine, plan, inputs, true);
}

}  // namespace longattn::partition
