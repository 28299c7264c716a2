// The cost model's arithmetic: rate lookups, FLOP counts, link times, overlap, and the estimate of
// ring, Ulysses and hybrid steps built from them. The built-in machines are at the end of the file.
#include "partition/cost_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <istream>
#include <ostream>
#include <sstream>

#include <fmt/ranges.h>

#include "common/check.hpp"

namespace longattn::partition {

// ---- kernel rates ----------------------------------------------------------------------------

void KernelRateTable::add(bool causal, int head_dim, RatePoint point) {
  LONGATTN_INVALID(head_dim > 0, "kernel rate: head dim must be positive, got {}", head_dim);
  LONGATTN_INVALID(point.length > 0, "kernel rate: block length must be positive, got {}", point.length);
  LONGATTN_INVALID(point.forward_tflops > 0 && point.backward_tflops > 0 && std::isfinite(point.forward_tflops) &&
                       std::isfinite(point.backward_tflops),
                   "kernel rate: rates must be positive and finite, got {} / {} TFLOP/s", point.forward_tflops,
                   point.backward_tflops);
  auto curve = std::find_if(curves_.begin(), curves_.end(),
                            [&](const Curve& c) { return c.causal == causal && c.head_dim == head_dim; });
  if (curve == curves_.end()) curve = curves_.insert(curves_.end(), Curve{causal, head_dim, {}});
  auto at = std::lower_bound(curve->points.begin(), curve->points.end(), point.length,
                             [](const RatePoint& p, std::int64_t length) { return p.length < length; });
  LONGATTN_INVALID(at == curve->points.end() || at->length != point.length,
                   "kernel rate: a second point at length {} for {} head dim {}; give each length once",
                   point.length, causal ? "causal" : "full", head_dim);
  curve->points.insert(at, point);
}

const KernelRateTable::Curve& KernelRateTable::curve_for(bool causal, int head_dim) const {
  LONGATTN_REQUIRE(!curves_.empty(), ErrorCode::invalid_argument,
                   "kernel rate table is empty: load one or use a built-in machine ({})",
                   fmt::join(default_machine_names(), ", "));
  const bool have_causality = std::any_of(curves_.begin(), curves_.end(), [&](const Curve& c) { return c.causal == causal; });
  const Curve* best = nullptr;
  for (const auto& c : curves_) {
    if (have_causality && c.causal != causal) continue;
    if (!best || std::abs(c.head_dim - head_dim) < std::abs(best->head_dim - head_dim)) best = &c;
  }
  return *best;
}

namespace {

// Linear in log(length) between the two points around `length`; the end points outside them.
template <class Rate>
double interpolate(const std::vector<RatePoint>& points, double length, Rate rate) {
  if (length <= static_cast<double>(points.front().length)) return rate(points.front());
  if (length >= static_cast<double>(points.back().length)) return rate(points.back());
  auto upper = std::upper_bound(points.begin(), points.end(), length,
                                [](double l, const RatePoint& p) { return l < static_cast<double>(p.length); });
  auto lower = upper - 1;
  const double t = (std::log(length) - std::log(static_cast<double>(lower->length))) /
                   (std::log(static_cast<double>(upper->length)) - std::log(static_cast<double>(lower->length)));
  return rate(*lower) + t * (rate(*upper) - rate(*lower));
}

double block_length(std::int64_t query_rows, std::int64_t key_rows) {
  LONGATTN_INVALID(query_rows > 0 && key_rows > 0, "kernel rate: block sides must be positive, got {} x {}", query_rows,
                   key_rows);
  return std::sqrt(static_cast<double>(query_rows) * static_cast<double>(key_rows));
}

}  // namespace

double KernelRateTable::forward_tflops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim) const {
  return interpolate(curve_for(causal, head_dim).points, block_length(query_rows, key_rows),
                     [](const RatePoint& p) { return p.forward_tflops; });
}

double KernelRateTable::backward_tflops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim) const {
  return interpolate(curve_for(causal, head_dim).points, block_length(query_rows, key_rows),
                     [](const RatePoint& p) { return p.backward_tflops; });
}

void KernelRateTable::write(std::ostream& out) const {
  out << "# causal|full head_dim length forward_tflops backward_tflops\n";
  for (const auto& c : curves_)
    for (const auto& p : c.points)
      out << fmt::format("{} {} {} {} {}\n", c.causal ? "causal" : "full", c.head_dim, p.length, p.forward_tflops,
                         p.backward_tflops);
}

KernelRateTable parse_rate_table(std::istream& in, const std::string& source_name) {
  KernelRateTable table;
  std::string line;
  for (int line_number = 1; std::getline(in, line); ++line_number) {
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos || line[first] == '#') continue;
    std::istringstream fields(line);
    std::string kind, extra;
    int head_dim = 0;
    RatePoint point;
    const bool parsed = static_cast<bool>(fields >> kind >> head_dim >> point.length >> point.forward_tflops >>
                                          point.backward_tflops) &&
                        !(fields >> extra) && (kind == "causal" || kind == "full");
    LONGATTN_REQUIRE(parsed, ErrorCode::io,
                     "{}:{}: expected `causal|full <head_dim> <length> <forward_tflops> <backward_tflops>`, got `{}`; "
                     "fix or delete the line",
                     source_name, line_number, line);
    try {
      table.add(kind == "causal", head_dim, point);
    } catch (const Error& e) {
      throw Error(ErrorCode::io, fmt::format("{}:{}: {}", source_name, line_number, e.what()));
    }
  }
  LONGATTN_REQUIRE(!table.empty(), ErrorCode::io,
                   "{}: no kernel-rate points in it; write one `causal|full <head_dim> <length> <forward_tflops> "
                   "<backward_tflops>` line per measured block size",
                   source_name);
  return table;
}

KernelRateTable load_rate_table(const std::string& path) {
  std::ifstream file(path);
  LONGATTN_REQUIRE(file.is_open(), ErrorCode::io, "cannot open kernel-rate table {}: check the path and its permissions",
                   path);
  return parse_rate_table(file, path);
}

// ---- FLOPs -----------------------------------------------------------------------------------

double visible_pairs(std::int64_t query_rows, std::int64_t key_rows, bool causal) {
  LONGATTN_INVALID(query_rows >= 0 && key_rows >= 0, "block sides must not be negative, got {} x {}", query_rows, key_rows);
  const double q = static_cast<double>(query_rows), k = static_cast<double>(key_rows);
  if (!causal) return q * k;
  // Query i sees keys 0..min(i, k-1): a triangle of the first min(q, k) rows, then full rows.
  const double m = std::min(q, k);
  return m * (m + 1) / 2 + (q - m) * k;
}

double visible_pairs_with_offset(std::int64_t query_rows, std::int64_t key_rows, std::int64_t causal_offset) {
  LONGATTN_INVALID(query_rows >= 0 && key_rows >= 0, "block sides must not be negative, got {} x {}", query_rows, key_rows);
  // Row i sees min(k, max(0, i + offset + 1)) keys: none before row `first`, a growing count up
  // to row `full`, all k from there on.
  const double q = static_cast<double>(query_rows), k = static_cast<double>(key_rows), offset = static_cast<double>(causal_offset);
  const double first = std::clamp(-offset, 0.0, q);
  const double full = std::clamp(k - offset - 1, first, q);
  const double growing = (full - first) * (offset + 1) + (first + full - 1) * (full - first) / 2;
  return growing + (q - full) * k;
}

double forward_flops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim, int query_heads) {
  return 4.0 * visible_pairs(query_rows, key_rows, causal) * head_dim * query_heads;
}

double backward_flops(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim, int query_heads) {
  return kBackwardFlopFactor * forward_flops(query_rows, key_rows, causal, head_dim, query_heads);
}

// ---- links -----------------------------------------------------------------------------------

const char* to_string(Tier tier) noexcept { return tier == Tier::intra_node ? "intra-node" : "inter-node"; }

Tier tier_between(int rank_a, int rank_b, int gpus_per_node) {
  LONGATTN_INVALID(gpus_per_node > 0, "GPUs per node must be positive, got {}", gpus_per_node);
  return rank_a / gpus_per_node == rank_b / gpus_per_node ? Tier::intra_node : Tier::inter_node;
}

Tier group_tier(int first_rank, int group_size, int stride, int gpus_per_node) {
  for (int i = 1; i < group_size; ++i)
    if (tier_between(first_rank, first_rank + i * stride, gpus_per_node) == Tier::inter_node) return Tier::inter_node;
  return Tier::intra_node;
}

double MachineModel::transfer_seconds(double bytes, Tier tier, int messages) const {
  const Link& l = link(tier);
  LONGATTN_INVALID(l.bytes_per_second > 0, "{} link bandwidth must be positive, got {} bytes/s", to_string(tier),
                   l.bytes_per_second);
  return bytes / l.bytes_per_second + messages * l.latency_seconds;
}

double MachineModel::forward_seconds(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim,
                                     int query_heads) const {
  if (query_rows == 0 || key_rows == 0) return 0;
  return forward_flops(query_rows, key_rows, causal, head_dim, query_heads) /
         (rates.forward_tflops(query_rows, key_rows, causal, head_dim) * 1e12);
}

double MachineModel::backward_seconds(std::int64_t query_rows, std::int64_t key_rows, bool causal, int head_dim,
                                      int query_heads) const {
  if (query_rows == 0 || key_rows == 0) return 0;
  return backward_flops(query_rows, key_rows, causal, head_dim, query_heads) /
         (rates.backward_tflops(query_rows, key_rows, causal, head_dim) * 1e12);
}

double linear_seconds_per_token(std::int64_t hidden, double gemm_tflops) {
  LONGATTN_INVALID(hidden > 0 && gemm_tflops > 0, "linear layers: hidden size and GEMM rate must be positive, got {} and {}",
                   hidden, gemm_tflops);
  const double h = static_cast<double>(hidden);
  return 2.0 * 12.0 * h * h / (gemm_tflops * 1e12);
}

// ---- overlap ---------------------------------------------------------------------------------

double overlapped_steps_seconds(std::span<const double> compute, std::span<const double> transfer, double exposed_before,
                                double exposed_after) {
  LONGATTN_INVALID(compute.size() == transfer.size(), "overlap: {} compute steps but {} transfers; give one of each per step",
                   compute.size(), transfer.size());
  double total = exposed_before + exposed_after;
  for (std::size_t s = 0; s < compute.size(); ++s) total += std::max(compute[s], transfer[s]);
  return total;
}

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
  if (shape.query_heads % ulysses != 0)
    return fmt::format("Ulysses size {} does not divide the {} query heads", ulysses, shape.query_heads);
  if (shape.kv_heads % ulysses != 0 && ulysses % shape.kv_heads != 0)
    return fmt::format("Ulysses size {} and the {} kv heads do not divide one another", ulysses, shape.kv_heads);
  return {};
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

double call_seconds(const MachineModel& m, const KernelCall& call, int head_dim) {
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
  return 4.0 * pairs * head_dim * call.heads.count /
         (m.rates.forward_tflops(call.q_count, call.k_count, causal, head_dim) * 1e12);
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

}  // namespace

PlanEstimate estimate_plan_forward(const MachineModel& m, const Plan& plan, const PlanCostInputs& in) {
  LONGATTN_INVALID(in.head_dim > 0 && in.element_bytes > 0 && in.gpus_per_node > 0,
                   "plan cost: head dim, element bytes and GPUs per node must be positive");
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
      for (const auto& call : step.calls) compute += call_seconds(m, call, in.head_dim);
      double transfer = 0;
      if (step.ring) {
        const auto& ring = *step.ring;
        LONGATTN_INVALID(ring.send_shard >= 0 && ring.recv_shard >= 0 &&
                             std::max(ring.send_shard, ring.recv_shard) < static_cast<int>(in.shard_tokens.size()),
                         "plan cost: a ring step of rank {} moves shard {} / {}, but shard_tokens has {} entries; give one "
                         "per rank",
                         rank, ring.send_shard, ring.recv_shard, in.shard_tokens.size());
        const double per_token = 2.0 * plan.kv_heads * in.head_dim * in.element_bytes;  // k and v
        const double sent = m.transfer_seconds(static_cast<double>(in.shard_tokens[ring.send_shard]) * per_token,
                                               tier_between(rank, ring.send_to, in.gpus_per_node), 2);
        const double received = m.transfer_seconds(static_cast<double>(in.shard_tokens[ring.recv_shard]) * per_token,
                                                   tier_between(rank, ring.recv_from, in.gpus_per_node), 2);
        transfer = std::max(sent, received);
      }
      step_total += std::max(compute, transfer);
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

// ---- built-in machines -----------------------------------------------------------------------

namespace {

// Backward rate from a forward rate and a combined forward+backward rate, both counted with the
// backward as kBackwardFlopFactor x forward FLOPs (how ../shared/DEVICE.md reports them).
double backward_from_combined(double forward_tflops, double combined_tflops) {
  return kBackwardFlopFactor / ((1 + kBackwardFlopFactor) / combined_tflops - 1 / forward_tflops);
}

struct CombinedPoint {
  std::int64_t length;
  double forward_tflops, forward_backward_tflops;
};

// cuDNN through PyTorch SDPA, causal, bf16, 32 heads, head dim 128, one H200: the table "Causal
// attention efficiency by sequence length" of ../shared/DEVICE.md (2026-12-05), forward / forward+
// backward. It is the only curve that reaches short blocks, so the other curves borrow its shape.
constexpr CombinedPoint kH200CausalD128[] = {
    {128, 138, 58},     {256, 269, 115},    {512, 381, 200},    {1024, 487, 300},
    {2048, 545, 378},   {4096, 557, 448},   {8192, 572, 495},   {16384, 577, 518},
    {32768, 592, 534},  {65536, 593, 544},  {131072, 547, 535},
};
constexpr std::int64_t kShapeAnchorLength = 8192;

std::vector<RatePoint> h200_causal_d128() {
  std::vector<RatePoint> points;
  for (const auto& p : kH200CausalD128)
    points.push_back({p.length, p.forward_tflops, backward_from_combined(p.forward_tflops, p.forward_backward_tflops)});
  return points;
}

struct MeasuredCurve {
  bool causal;
  int head_dim;
  RatePoint at_8k, at_32k, at_128k;
};

// The longattn `cudnn` backend on one H100, bf16, 32 heads: bench/results/gpu_kernels_h100_2026-11-23.md,
// section "Update, 21:22 UTC", column "ours cudnn" (forward / backward, backward counted 2.5x).
constexpr MeasuredCurve kH100Cudnn[] = {
    {true, 128, {8192, 586, 504}, {32768, 659, 576}, {131072, 558, 536}},
    {false, 128, {8192, 629, 558}, {32768, 635, 572}, {131072, 608, 547}},
    {true, 64, {8192, 446, 412}, {32768, 495, 436}, {131072, 446, 417}},
    {false, 64, {8192, 482, 470}, {32768, 506, 489}, {131072, 444, 432}},
};

// Below 8k no H100 point was measured: those lengths take the H200 causal curve scaled to meet the
// H100 curve at 8k. Full attention has no diagonal tiles and likely loses less at short lengths, so
// this is pessimistic for it until a calibration run measures the short end.
void add_h100_curve(KernelRateTable& table, const MeasuredCurve& measured) {
  const auto shape = h200_causal_d128();
  const auto anchor = std::find_if(shape.begin(), shape.end(), [](const RatePoint& p) { return p.length == kShapeAnchorLength; });
  const double forward_scale = measured.at_8k.forward_tflops / anchor->forward_tflops;
  const double backward_scale = measured.at_8k.backward_tflops / anchor->backward_tflops;
  for (const auto& p : shape)
    if (p.length < kShapeAnchorLength)
      table.add(measured.causal, measured.head_dim,
                {p.length, p.forward_tflops * forward_scale, p.backward_tflops * backward_scale});
  for (const auto& p : {measured.at_8k, measured.at_32k, measured.at_128k}) table.add(measured.causal, measured.head_dim, p);
}

// NVLink inside a node: NCCL send/recv per direction per GPU measured on the H200 pair
// (../shared/DEVICE.md, "Ceilings measured there"); H100 and H200 share NVLink 4, so H100 takes the
// same. Across nodes: one 400 Gb/s NIC per GPU, the top of the range issue 13 names and the figure
// issue 14's first estimate uses; override it where the cluster is slower. Latencies are
// typical NCCL small-message figures, not measured here: a startup probe should replace them.
constexpr Link kNvlink{348e9, 5e-6};
constexpr Link kNetwork{50e9, 10e-6};

// Linear layers of a hidden-4096 layer (32 heads x 128) at the bf16 GEMM rate of ../shared/DEVICE.md
// ("Ceilings measured there"): a lower bound on their time until a trainer gives its own coefficient.
constexpr std::int64_t kDefaultHidden = 4096;

}  // namespace

std::vector<std::string> default_machine_names() { return {"h100", "h200"}; }

MachineModel default_machine(std::string_view name) {
  MachineModel m;
  m.name = std::string(name);
  m.intra_node = kNvlink;
  m.inter_node = kNetwork;
  if (name == "h200") {
    // Only causal d128 was measured by length; full attention and other head dims fall back to it.
    for (const auto& p : h200_causal_d128()) m.rates.add(true, 128, p);
    m.linear_seconds_per_token = linear_seconds_per_token(kDefaultHidden, 790);
  } else if (name == "h100") {
    for (const auto& c : kH100Cudnn) add_h100_curve(m.rates, c);
    m.linear_seconds_per_token = linear_seconds_per_token(kDefaultHidden, 761);
  } else {
    throw Error(ErrorCode::invalid_argument, fmt::format("unknown machine `{}`: use one of {}, or load a kernel-rate table",
                                                         name, fmt::join(default_machine_names(), ", ")));
  }
  return m;
}

}  // namespace longattn::partition
