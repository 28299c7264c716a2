// The varlen plan as data: input checks, the plan's derived views (runs per rank, a group's shard
// plan, step time and imbalance) and the assembly of a plan from one group per sequence.
#include "partition/varlen_planner.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <numeric>
#include <utility>

#include "common/check.hpp"
#include "partition/varlen_cost.hpp"
#include "partition/varlen_groups.hpp"

namespace longattn::partition {

const char* to_string(VarlenTier tier) noexcept {
  switch (tier) {
    case VarlenTier::one_rank: return "one-rank";
    case VarlenTier::one_node: return "one-node";
    case VarlenTier::nodes: return "nodes";
  }
  return "?";
}

const char* to_string(Sharding sharding) noexcept {
  switch (sharding) {
    case Sharding::whole: return "whole";
    case Sharding::zigzag: return "zigzag";
    case Sharding::hybrid: return "hybrid";
    case Sharding::chunks: return "chunks";
  }
  return "?";
}

std::vector<std::int64_t> lengths_from_cu_seqlens(std::span<const std::int32_t> cu_seqlens) {
  LONGATTN_INVALID(cu_seqlens.size() >= 2 && cu_seqlens.front() == 0,
                   "cu_seqlens must start at 0 and hold at least one sequence (batch + 1 entries), got {} entries{}",
                   cu_seqlens.size(), cu_seqlens.empty() ? "" : fmt::format(" starting at {}", cu_seqlens.front()));
  std::vector<std::int64_t> lengths;
  for (std::size_t b = 1; b < cu_seqlens.size(); ++b) {
    LONGATTN_INVALID(cu_seqlens[b] >= cu_seqlens[b - 1],
                     "cu_seqlens must not decrease: entry {} is {} after {}; give prefix sums of the sequence lengths", b,
                     cu_seqlens[b], cu_seqlens[b - 1]);
    lengths.push_back(cu_seqlens[b] - cu_seqlens[b - 1]);
  }
  return lengths;
}

void check_problem(const VarlenProblem& p) {
  LONGATTN_INVALID(p.ranks >= 1 && p.gpus_per_node >= 1, "ranks and GPUs per node must be positive, got {} and {}", p.ranks,
                   p.gpus_per_node);
  LONGATTN_INVALID(p.ranks < p.gpus_per_node || p.ranks % p.gpus_per_node == 0,
                   "{} ranks are not whole nodes of {} GPUs: use a multiple of {}", p.ranks, p.gpus_per_node,
                   p.gpus_per_node);
  LONGATTN_INVALID(p.cap_tokens >= 0, "the token cap must be positive (or 0 for none), got {}", p.cap_tokens);
  const auto& s = p.shape;
  LONGATTN_INVALID(s.query_heads > 0 && s.kv_heads > 0 && s.head_dim > 0 && s.element_bytes > 0 && s.gradient_bytes > 0,
                   "shape: heads, kv heads, head dim and byte sizes must be positive");
  LONGATTN_INVALID(s.query_heads % s.kv_heads == 0, "shape: {} query heads are not a multiple of {} kv heads",
                   s.query_heads, s.kv_heads);
  LONGATTN_INVALID(!p.lengths.empty(), "the batch holds no sequence: give at least one length");
  std::int64_t total = 0;
  constexpr std::int64_t kMaxTotal = std::numeric_limits<std::int32_t>::max();
  for (std::size_t i = 0; i < p.lengths.size(); ++i) {
    const std::int64_t l = p.lengths[i];
    LONGATTN_INVALID(l >= 0, "sequence {} has a negative length {}: lengths count tokens", i, l);
    LONGATTN_INVALID(l <= kMaxTotal - total,
                     "the batch overflows int32 prefix sums at sequence {} ({} tokens after {}): keep the batch under "
                     "{} tokens",
                     i, l, total, kMaxTotal);
    total += l;
  }
  if (p.cap_tokens == 0) return;
  const std::int64_t room = p.cap_tokens * p.ranks;
  for (std::size_t i = 0; i < p.lengths.size(); ++i) {
    const std::int64_t need = zigzag_max_member_tokens(p.lengths[i], p.ranks);
    LONGATTN_INVALID(need <= p.cap_tokens,
                     "sequence {} ({} tokens) does not fit even across all {} ranks: its largest share is {} tokens, "
                     "over the cap of {} per rank; raise the cap or add ranks",
                     i, p.lengths[i], p.ranks, need, p.cap_tokens);
  }
  LONGATTN_INVALID(total <= room,
                   "the batch ({} tokens) does not fit {} ranks x {} tokens = {}: raise the cap or add ranks", total,
                   p.ranks, p.cap_tokens, room);
}

double VarlenPlan::step_seconds() const {
  double slowest = 0;
  for (const auto& c : rank_costs) slowest = std::max(slowest, c.total_seconds());
  return slowest;
}

double VarlenPlan::imbalance() const {
  if (rank_costs.empty()) return 1;
  double sum = 0;
  for (const auto& c : rank_costs) sum += c.total_seconds();
  const double mean = sum / static_cast<double>(rank_costs.size());
  return mean > 0 ? step_seconds() / mean : 1;
}

std::int64_t VarlenPlan::max_rank_tokens() const {
  std::int64_t most = 0;
  for (const auto& c : rank_costs) most = std::max(most, c.tokens);
  return most;
}

ShardPlan VarlenPlan::group_shard_plan(int group) const {
  LONGATTN_INVALID(group >= 0 && group < static_cast<int>(groups.size()), "group {} is outside [0, {})", group,
                   groups.size());
  const auto& g = groups[static_cast<std::size_t>(group)];
  LONGATTN_INVALID(g.sharding != Sharding::chunks,
                   "group {} is chunked (flat-minheap), not a ring: it has no shard plan; read its runs instead", group);
  std::vector<std::int32_t> cu{0};
  for (const int s : g.sequences) cu.push_back(cu.back() + static_cast<std::int32_t>(lengths[static_cast<std::size_t>(s)]));
  if (g.sharding == Sharding::hybrid) return ShardPlan(std::move(cu), Layout::zigzag, g.size, g.ulysses);
  return ShardPlan(std::move(cu), g.size == 1 ? Layout::contiguous : Layout::zigzag, g.size);
}

std::vector<int> VarlenPlan::groups_of_rank(int rank) const {
  LONGATTN_INVALID(rank >= 0 && rank < ranks, "rank {} is outside [0, {})", rank, ranks);
  std::vector<int> member_of;
  for (std::size_t g = 0; g < groups.size(); ++g)
    if (rank >= groups[g].first_rank && rank < groups[g].first_rank + groups[g].size) member_of.push_back(static_cast<int>(g));
  return member_of;
}

std::vector<TokenRun> VarlenPlan::runs(int rank) const {
  LONGATTN_INVALID(rank >= 0 && rank < ranks, "rank {} is outside [0, {})", rank, ranks);
  std::vector<TokenRun> out;
  std::int64_t row = 0;
  for (const int g : groups_of_rank(rank)) {
    const auto& group = groups[static_cast<std::size_t>(g)];
    if (group.sharding == Sharding::chunks) {
      for (const int s : group.sequences) {
        const auto& owners = chunk_owner[static_cast<std::size_t>(s)];
        const std::int64_t length = lengths[static_cast<std::size_t>(s)];
        for (std::size_t c = 0; c < owners.size(); ++c) {
          if (owners[c] != rank) continue;
          const std::int64_t first = static_cast<std::int64_t>(c) * chunk_tokens;
          const std::int64_t count = std::min(chunk_tokens, length - first);
          // Neighbouring chunks of one sequence on one rank are one run.
          if (!out.empty() && out.back().seq == s && out.back().first + out.back().count == first && out.back().stride == 1)
            out.back().count += count;
          else
            out.push_back({s, row, count, static_cast<std::int32_t>(first), 1});
          row += count;
        }
      }
      continue;
    }
    if (group.sequences.empty()) continue;
    for (auto run : group_shard_plan(g).runs(rank - group.first_rank)) {
      run.seq = group.sequences[static_cast<std::size_t>(run.seq)];
      run.row += row;
      out.push_back(run);
    }
    row = out.empty() ? row : out.back().row + out.back().count;
  }
  return out;
}

std::vector<int> candidate_group_sizes(int ranks, int gpus_per_node) {
  const int node = std::min(ranks, gpus_per_node), nodes = ranks / node;
  std::vector<int> sizes;
  for (int s = 1; s < node && node % s == 0; s *= 2) sizes.push_back(s);
  sizes.push_back(node);
  for (int k = 2; k < nodes; k *= 2) sizes.push_back(k * node);
  if (nodes > 1) sizes.push_back(ranks);
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}

std::vector<int> hybrid_ulysses_sizes(const VarlenProblem& problem, int size) {
  const int node = std::min(problem.ranks, problem.gpus_per_node);
  std::vector<int> sizes;
  for (int ulysses = 2; ulysses <= std::min(size, node); ++ulysses)
    if (node % ulysses == 0 && hybrid_group_unsupported_reason(problem.shape, size, ulysses).empty()) sizes.push_back(ulysses);
  return sizes;
}

std::int64_t member_token_bound(const VarlenProblem& problem, std::int64_t length, int size) {
  if (size == 1) return length;
  std::int64_t bound = zigzag_max_member_tokens(length, size);
  for (const int ulysses : hybrid_ulysses_sizes(problem, size)) {
    const std::int64_t group_rows = zigzag_max_member_tokens(length, size / ulysses);
    bound = std::max(bound, (group_rows + ulysses - 1) / ulysses);
  }
  return bound;
}

int groups_of_size(int ranks, int gpus_per_node, int size) {
  const int node = std::min(ranks, gpus_per_node);
  if (size <= node) return ranks / size;
  return (ranks / node) / (size / node);
}

VarlenTier tier_of_group(int size, int gpus_per_node) {
  if (size == 1) return VarlenTier::one_rank;
  return size <= gpus_per_node ? VarlenTier::one_node : VarlenTier::nodes;
}

VarlenPlan assemble_ring_plan(std::string planner, const VarlenProblem& problem, const MachineModel& machine,
                              std::span<const GroupSlot> slot_of_sequence) {
  VarlenPlan plan;
  plan.planner = std::move(planner);
  plan.ranks = problem.ranks;
  plan.gpus_per_node = problem.gpus_per_node;
  plan.lengths = problem.lengths;
  // Largest groups first, then by first rank: one order that every rank can follow.
  std::map<std::pair<int, int>, std::vector<int>> members;
  for (std::size_t s = 0; s < slot_of_sequence.size(); ++s)
    members[{-slot_of_sequence[s].size, slot_of_sequence[s].first_rank}].push_back(static_cast<int>(s));
  plan.group_of.assign(problem.lengths.size(), -1);
  std::vector<std::int64_t> lengths;
  for (auto& [key, sequences] : members) {
    const int size = -key.first;
    for (const int s : sequences) plan.group_of[static_cast<std::size_t>(s)] = static_cast<int>(plan.groups.size());
    VarlenGroup group{key.second, size, 1, tier_of_group(size, problem.gpus_per_node),
                      size == 1 ? Sharding::whole : Sharding::zigzag, std::move(sequences)};
    // The hybrid where the heads allow it and the model finds it faster for these sequences
    // together, with the Ulysses size it finds fastest.
    const auto ulysses_sizes = size > 1 ? hybrid_ulysses_sizes(problem, size) : std::vector<int>{};
    if (!ulysses_sizes.empty()) {
      lengths.clear();
      for (const int s : group.sequences) lengths.push_back(problem.lengths[static_cast<std::size_t>(s)]);
      auto seconds = [&](int ulysses) {
        const auto tiers = group_tiers(group.first_rank, size, ulysses, problem.gpus_per_node);
        return group_member_cost(machine, problem.shape, lengths, size, ulysses, tiers.ring, tiers.all_to_all).total_seconds();
      };
      double fastest = seconds(1);
      for (const int ulysses : ulysses_sizes)
        if (const double t = seconds(ulysses); t < fastest) {
          fastest = t;
          group.sharding = Sharding::hybrid;
          group.ulysses = ulysses;
        }
    }
    plan.groups.push_back(std::move(group));
  }
  price_ring_groups(plan, machine, problem.shape);
  // The planners reserve every sequence's largest share under any sharding, so this only happens
  // where a placement was checked against the zigzag shares alone (every sequence over all ranks).
  if (problem.cap_tokens > 0 && plan.max_rank_tokens() > problem.cap_tokens) {
    for (auto& group : plan.groups)
      if (group.sharding == Sharding::hybrid) {
        group.sharding = Sharding::zigzag;
        group.ulysses = 1;
      }
    price_ring_groups(plan, machine, problem.shape);
  }
  return plan;
}

std::int64_t all_ranks_zigzag_tokens(const VarlenProblem& problem) {
  std::vector<std::int32_t> cu{0};
  for (const auto length : problem.lengths) cu.push_back(cu.back() + static_cast<std::int32_t>(length));
  return ShardPlan(std::move(cu), problem.ranks == 1 ? Layout::contiguous : Layout::zigzag, problem.ranks).max_local_tokens();
}

}  // namespace longattn::partition
