// The cost model's arithmetic: rate lookups and the rate-file format, FLOP counts, link times and
// the overlap of a step's compute with its transfer.
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

}  // namespace longattn::partition
