// The hierarchical planner: a target step time searched upward from a lower bound, and for each
// target a greedy placement, longest sequence first, into the smallest group that keeps its ranks
// under the target; then local moves. Also the per-sequence group costs the planners share.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <queue>
#include <random>
#include <set>
#include <utility>

#include "common/check.hpp"
#include "partition/varlen_cost.hpp"
#include "partition/varlen_groups.hpp"
#include "partition/varlen_planner.hpp"
#include "partition/varlen_timer.hpp"

namespace longattn::partition {

SequenceGroupCosts::SequenceGroupCosts(const VarlenProblem& problem, const MachineModel& machine)
    : problem_(problem),
      machine_(machine),
      sizes_(candidate_group_sizes(problem.ranks, problem.gpus_per_node)),
      cache_(problem.lengths.size() * sizes_.size(), -1.0),
      tokens_cache_(problem.lengths.size() * sizes_.size(), -1) {}

std::int64_t SequenceGroupCosts::member_tokens(int sequence, int size_index) {
  std::int64_t& cached = tokens_cache_[static_cast<std::size_t>(sequence) * sizes_.size() + static_cast<std::size_t>(size_index)];
  if (cached < 0)
    cached = member_token_bound(problem_, problem_.lengths[static_cast<std::size_t>(sequence)],
                                sizes_[static_cast<std::size_t>(size_index)]);
  return cached;
}

double SequenceGroupCosts::operator()(int sequence, int size_index) {
  double& cached = cache_[static_cast<std::size_t>(sequence) * sizes_.size() + static_cast<std::size_t>(size_index)];
  if (cached < 0) {
    const int size = sizes_[static_cast<std::size_t>(size_index)];
    const std::int64_t length = problem_.lengths[static_cast<std::size_t>(sequence)];
    const auto lengths = std::span<const std::int64_t>(&length, 1);
    // Groups are aligned to their size, so the tiers of the first group are every group's.
    const auto ring = group_tiers(0, size, 1, problem_.gpus_per_node);
    cached = group_member_cost(machine_, problem_.shape, lengths, size, 1, ring.ring, ring.all_to_all).total_seconds();
    for (const int ulysses : size > 1 ? hybrid_ulysses_sizes(problem_, size) : std::vector<int>{}) {
      const auto hybrid = group_tiers(0, size, ulysses, problem_.gpus_per_node);
      cached = std::min(cached, group_member_cost(machine_, problem_.shape, lengths, size, ulysses, hybrid.ring,
                                                  hybrid.all_to_all)
                                    .total_seconds());
    }
  }
  return cached;
}

std::vector<int> longest_first(const std::vector<std::int64_t>& lengths) {
  std::vector<int> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return lengths[static_cast<std::size_t>(a)] > lengths[static_cast<std::size_t>(b)];
  });
  return order;
}

namespace {

// Which group takes a sequence: of the smallest size that meets the target, the least loaded one
// (keeps room everywhere) or the most loaded one that stays under the target (best fit: keeps whole
// ranks free for what comes later); or, of any size, the one that finishes soonest (spreads a
// sequence wider when that leaves a better fit for the next ones). None wins on every batch.
enum class Fit { least_loaded, best, earliest_finish };

// Loads (modelled seconds) and tokens of every rank while sequences are placed, with the most
// loaded member of every aligned group of every size kept up to date (loads only grow) and the
// ranks ordered by load.
class Placer {
 public:
  Placer(const VarlenProblem& problem, SequenceGroupCosts& costs, const std::vector<int>& order, Fit fit)
      : problem_(problem), costs_(costs), order_(order), fit_(fit) {
    cap_ = problem.cap_tokens > 0 ? problem.cap_tokens : std::numeric_limits<std::int64_t>::max();
    for (const int size : costs.sizes()) counts_.push_back(groups_of_size(problem.ranks, problem.gpus_per_node, size));
  }

  // Places every sequence with no rank above `target`; false when some sequence finds no group.
  bool place(double target, SlotPlacement& out) {
    reset();
    // Best fit needs a target to fit under; without one every fit is least loaded.
    best_fit_ = fit_ == Fit::best && std::isfinite(target);
    out.slots.assign(problem_.lengths.size(), GroupSlot{});
    for (const int s : order_) {
      const std::int64_t length = problem_.lengths[static_cast<std::size_t>(s)];
      if (length == 0) {
        out.slots[static_cast<std::size_t>(s)] = {rank_with_room(0, 0), 1};
        continue;
      }
      // The smallest group size that meets the target, or under earliest finish the group (of any
      // size) whose slowest member ends soonest.
      GroupSlot chosen{-1, 0};
      double chosen_finish = 0, chosen_seconds = 0;
      std::int64_t chosen_tokens = 0;
      for (std::size_t i = 0; i < costs_.sizes().size(); ++i) {
        const double seconds = costs_(s, static_cast<int>(i));
        if (seconds > target) continue;
        const int size = costs_.sizes()[i];
        int first = -1;
        double load = 0;
        if (size == 1) {
          first = rank_with_room(length, target - seconds);
          if (first >= 0) load = loads_[static_cast<std::size_t>(first)];
        } else {
          // No group is less loaded than the least loaded rank: skip the scan when even that is too full.
          if (least_load() + seconds > target) continue;
          const std::int64_t share = costs_.member_tokens(s, static_cast<int>(i));
          for (int b = 0; b < counts_[i]; ++b) {
            const auto block = static_cast<std::size_t>(b);
            if (block_tokens_[i][block] > cap_ - share) continue;
            const double l = block_load_[i][block];
            const bool better = best_fit_ && l + seconds <= target ? (first < 0 || load + seconds > target || l > load)
                                                                             : (first < 0 || l < load);
            if (better) {
              first = b * size;
              load = block_load_[i][block];
            }
          }
        }
        if (first < 0 || load + seconds > target) continue;
        if (chosen.first_rank < 0 || load + seconds < chosen_finish) {
          chosen = {first, size};
          chosen_finish = load + seconds;
          chosen_seconds = seconds;
          chosen_tokens = costs_.member_tokens(s, static_cast<int>(i));
        }
        if (fit_ != Fit::earliest_finish) break;
      }
      if (chosen.first_rank < 0) return false;
      assign(chosen.first_rank, chosen.size, chosen_seconds, chosen_tokens);
      out.slots[static_cast<std::size_t>(s)] = chosen;
    }
    out.makespan = *std::max_element(loads_.begin(), loads_.end());
    return true;
  }

 private:
  void reset() {
    const auto P = static_cast<std::size_t>(problem_.ranks);
    loads_.assign(P, 0.0);
    tokens_.assign(P, 0);
    block_load_.assign(counts_.size(), {});
    block_tokens_.assign(counts_.size(), {});
    for (std::size_t i = 0; i < counts_.size(); ++i) {
      block_load_[i].assign(static_cast<std::size_t>(counts_[i]), 0.0);
      block_tokens_[i].assign(static_cast<std::size_t>(counts_[i]), 0);
    }
    by_load_.clear();
    least_loaded_ = {};
    parked_ = {};
    for (int r = 0; r < problem_.ranks; ++r) {
      if (fit_ == Fit::best) by_load_.insert({0.0, r});
      least_loaded_.push({0.0, r});
    }
  }

  double least_load() {
    while (least_loaded_.top().first != loads_[static_cast<std::size_t>(least_loaded_.top().second)]) least_loaded_.pop();
    return least_loaded_.top().first;
  }

  bool has_room(int rank, std::int64_t length) const { return tokens_[static_cast<std::size_t>(rank)] <= cap_ - length; }

  // A rank that can take `length` more tokens, or -1: the least loaded (lowest number on ties), or
  // under best fit the most loaded whose load stays at most `load_limit`, else the least loaded.
  int rank_with_room(std::int64_t length, double load_limit) {
    if (best_fit_) {
      for (auto it = by_load_.upper_bound({load_limit, problem_.ranks}); it != by_load_.begin();) {
        --it;
        if (has_room(it->second, length)) return it->second;
      }
    }
    // Parked ranks whose room fits this length come back (their room may have shrunk since).
    while (!parked_.empty() && parked_.top().first >= length) {
      const int rank = parked_.top().second;
      parked_.pop();
      const std::int64_t room = cap_ - tokens_[static_cast<std::size_t>(rank)];
      if (room >= length)
        least_loaded_.push({loads_[static_cast<std::size_t>(rank)], rank});
      else
        parked_.push({room, rank});
    }
    // The lazy heap's current entries, least loaded first; a rank without room is parked.
    while (!least_loaded_.empty()) {
      const auto [load, rank] = least_loaded_.top();
      if (load == loads_[static_cast<std::size_t>(rank)]) {
        if (has_room(rank, length)) return rank;
        parked_.push({cap_ - tokens_[static_cast<std::size_t>(rank)], rank});
      }
      least_loaded_.pop();
    }
    return -1;
  }

  void assign(int first, int size, double seconds, std::int64_t member_tokens) {
    for (int u = 0; u < size; ++u) {
      const int rank = first + u;
      const auto r = static_cast<std::size_t>(rank);
      if (fit_ == Fit::best) by_load_.erase({loads_[r], rank});
      loads_[r] += seconds;
      if (fit_ == Fit::best) by_load_.insert({loads_[r], rank});
      if (seconds > 0) least_loaded_.push({loads_[r], rank});
      tokens_[r] += member_tokens;
      for (std::size_t i = 1; i < counts_.size(); ++i) {
        const auto block = static_cast<std::size_t>(rank / costs_.sizes()[i]);
        if (block >= block_load_[i].size()) continue;
        block_load_[i][block] = std::max(block_load_[i][block], loads_[r]);
        block_tokens_[i][block] = std::max(block_tokens_[i][block], tokens_[r]);
      }
    }
  }

  const VarlenProblem& problem_;
  SequenceGroupCosts& costs_;
  const std::vector<int>& order_;
  Fit fit_;
  bool best_fit_ = false;
  std::int64_t cap_ = 0;
  std::vector<int> counts_;  // [size index]: aligned groups of that size
  std::vector<double> loads_;
  std::vector<std::int64_t> tokens_;
  std::vector<std::vector<double>> block_load_;          // [size index][group]: its most loaded member
  std::vector<std::vector<std::int64_t>> block_tokens_;  // [size index][group]: its fullest member
  using Entry = std::pair<double, int>;  // (load, rank)
  std::set<Entry> by_load_;              // best fit only
  // Least loaded first; an entry is current while its load is still the rank's load.
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> least_loaded_;
  // Ranks too full for the length being placed, most room first. Lengths only shrink (longest
  // first), so a rank waits here until one fits, instead of being passed over again and again.
  std::priority_queue<std::pair<std::int64_t, int>> parked_;
};

// The search for a target stops when it is known to within this ratio.
constexpr double kTargetTolerance = 2e-3;
constexpr int kMaxProbes = 40;
// Local moves after the greedy: enough to settle a small batch, bounded for large ones.
constexpr int kMaxLocalMoves = 64;
// Sequences x ranks up to which the earliest-finish placement is tried as well.
constexpr std::size_t kEarliestFinishWork = std::size_t{1} << 14;
// Other sequence orders tried on batches of at most so many sequences, and the seed they are drawn from.
constexpr std::size_t kOrderAttemptSequences = 64;
constexpr int kOrderAttempts = 8;
constexpr std::uint64_t kOrderSeed = 0x5eed;
// Small batches: how many of the best placements get ejection chains this long.
constexpr std::size_t kDeepSearchPlacements = 2;
constexpr int kDeepChainDepth = 2;

// The least target step time the greedy meets, searched between a lower bound and the whole-sequence
// packing; none when even that packing breaks the cap in this order.
std::optional<SlotPlacement> search_target(const VarlenProblem& problem, SequenceGroupCosts& costs,
                                           const std::vector<int>& order, Fit fit,
                                           const std::optional<SlotPlacement>& fallback) {
  Placer placer(problem, costs, order, fit);
  // With no target every sequence stays whole on the least loaded rank with room (the whole-sequence
  // packing), splitting only what the cap forces: the plan to beat. Where the cap leaves that packing
  // no room, the placement found by packing tokens first is.
  SlotPlacement best;
  if (!placer.place(std::numeric_limits<double>::infinity(), best)) {
    if (!fallback) return std::nullopt;
    best = *fallback;
  }
  // No target below the longest sequence's best share can be met, nor one below the mean whole-sequence
  // work per rank unless splitting saves work, which it rarely does (shorter blocks run slower and
  // rings add transfers).
  double lower = 0, whole_work = 0;
  const std::size_t longest = std::min<std::size_t>(order.size(), 4);
  for (std::size_t j = 0; j < order.size(); ++j) {
    whole_work += costs(order[j], 0);
    if (j >= longest) continue;
    double share = std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < costs.sizes().size(); ++i) share = std::min(share, costs(order[j], static_cast<int>(i)));
    lower = std::max(lower, share);
  }
  lower = std::max(lower, whole_work / problem.ranks);
  // Most batches balance within a fraction of a percent of the bound: probe upward from it in
  // doubling steps until a target is met, then bisect.
  double upper = best.makespan, gallop = kTargetTolerance;
  bool galloping = true;
  SlotPlacement trial;
  for (int step = 0; step < kMaxProbes && lower > 0 && upper > lower * (1 + kTargetTolerance); ++step) {
    const double middle = std::sqrt(lower * upper);
    const double target = galloping ? std::min(lower * (1 + gallop), middle) : middle;
    if (placer.place(target, trial)) {
      galloping = false;
      upper = std::min(target, trial.makespan);
      if (trial.makespan < best.makespan) std::swap(best, trial);
    } else {
      lower = target;
      gallop *= 2;
    }
  }
  return best;
}

// Under a tight cap: any placement that fits, found by packing tokens rather than time. Longest
// first, each sequence whole on the rank whose room it fills best, else over the smallest group
// with room in every member (the fullest such); failing that, every sequence over all ranks.
std::optional<SlotPlacement> pack_tokens_first(const VarlenProblem& problem, SequenceGroupCosts& costs,
                                               const std::vector<int>& order) {
  const std::int64_t cap = problem.cap_tokens > 0 ? problem.cap_tokens : std::numeric_limits<std::int64_t>::max();
  const auto P = static_cast<std::size_t>(problem.ranks);
  std::vector<std::int64_t> tokens(P, 0);
  std::vector<double> loads(P, 0.0);
  std::set<std::pair<std::int64_t, int>> by_tokens;  // (tokens, rank)
  for (int r = 0; r < problem.ranks; ++r) by_tokens.insert({0, r});
  SlotPlacement out;
  out.slots.assign(problem.lengths.size(), GroupSlot{});
  bool packed = true;
  for (const int s : order) {
    GroupSlot chosen{-1, 0};
    for (std::size_t i = 0; i < costs.sizes().size() && chosen.first_rank < 0; ++i) {
      const int size = costs.sizes()[i];
      const std::int64_t share = costs.member_tokens(s, static_cast<int>(i));
      if (size == 1) {
        auto it = by_tokens.upper_bound({cap - share, problem.ranks});
        if (it != by_tokens.begin()) chosen = {(--it)->second, 1};
        continue;
      }
      std::int64_t chosen_tokens = -1;
      for (int first = 0; first + size <= problem.ranks; first += size) {
        const std::int64_t fullest = *std::max_element(tokens.begin() + first, tokens.begin() + first + size);
        if (fullest <= cap - share && fullest > chosen_tokens) {
          chosen = {first, size};
          chosen_tokens = fullest;
        }
      }
    }
    if (chosen.first_rank < 0) {
      packed = false;
      break;
    }
    const int index = static_cast<int>(std::find(costs.sizes().begin(), costs.sizes().end(), chosen.size) - costs.sizes().begin());
    for (int u = 0; u < chosen.size; ++u) {
      const auto r = static_cast<std::size_t>(chosen.first_rank + u);
      by_tokens.erase({tokens[r], chosen.first_rank + u});
      tokens[r] += costs.member_tokens(s, index);
      loads[r] += costs(s, index);
      by_tokens.insert({tokens[r], chosen.first_rank + u});
    }
    out.slots[static_cast<std::size_t>(s)] = chosen;
  }
  if (packed) {
    out.makespan = *std::max_element(loads.begin(), loads.end());
    return out;
  }
  // Every sequence zigzagged over all ranks (TE's plan) holds the fewest tokens per rank any plan
  // can, up to rounding; assembling keeps such a group a zigzag where a hybrid would break the cap.
  if (all_ranks_zigzag_tokens(problem) > cap) return std::nullopt;
  const int all = static_cast<int>(costs.sizes().size()) - 1;
  out.slots.assign(problem.lengths.size(), GroupSlot{0, problem.ranks});
  out.makespan = 0;
  for (std::size_t s = 0; s < problem.lengths.size(); ++s) out.makespan += costs(static_cast<int>(s), all);
  return out;
}

}  // namespace

std::vector<SlotPlacement> hierarchical_placements(const VarlenProblem& problem, SequenceGroupCosts& costs) {
  const auto order = longest_first(problem.lengths);
  std::optional<SlotPlacement> fallback;
  auto first = search_target(problem, costs, order, Fit::least_loaded, fallback);
  if (!first) {
    fallback = pack_tokens_first(problem, costs, order);
    first = search_target(problem, costs, order, Fit::least_loaded, fallback);
  }
  LONGATTN_INVALID(first.has_value(),
                   "no placement of the {} sequences keeps every rank under the cap of {} tokens: raise the cap or add "
                   "ranks",
                   problem.lengths.size(), problem.cap_tokens);
  // Small batches: few sequences on few ranks are sensitive to which one claims a group first, so
  // several starts are tried, each finished by local moves, and all of them are kept; large ones
  // keep the best start, finished by the moves.
  const bool small = problem.lengths.size() <= kOrderAttemptSequences &&
                     problem.lengths.size() * static_cast<std::size_t>(problem.ranks) <= kEarliestFinishWork;
  std::vector<SlotPlacement> kept;
  // Starts often repeat (several orders and fits reach one packing), and so do their ends: each
  // start is improved once, each end kept once.
  std::set<std::vector<std::pair<int, int>>> starts, ends;
  auto is_new = [](std::set<std::vector<std::pair<int, int>>>& seen, const SlotPlacement& placement) {
    std::vector<std::pair<int, int>> key;
    for (const auto& slot : placement.slots) key.emplace_back(slot.first_rank, slot.size);
    return seen.insert(std::move(key)).second;
  };
  auto consider = [&](std::optional<SlotPlacement> start) {
    if (!start) return;
    if (!small) {
      if (kept.empty() || start->makespan < kept.front().makespan) kept.assign(1, std::move(*start));
      return;
    }
    if (!is_new(starts, *start)) return;
    improve_placement(problem, costs, *start, kMaxLocalMoves, 0);
    if (is_new(ends, *start)) kept.push_back(std::move(*start));
  };
  consider(std::move(first));
  for (const Fit fit : {Fit::best, Fit::earliest_finish}) {
    // Earliest finish scans every group size for every sequence: worth it on small batches, where
    // a few sequences must share few ranks, and too slow on large ones.
    if (fit == Fit::earliest_finish && problem.lengths.size() * static_cast<std::size_t>(problem.ranks) > kEarliestFinishWork)
      continue;
    consider(search_target(problem, costs, order, fit, fallback));
  }
  if (small) {
    // Other orders, drawn from a fixed seed so the plan stays a function of the input.
    std::mt19937_64 shuffler(kOrderSeed);
    for (int attempt = 0; attempt < kOrderAttempts; ++attempt) {
      // Fisher-Yates by hand: std::shuffle's draws differ between standard libraries, and every
      // rank must make the same plan.
      auto shuffled = order;
      for (std::size_t i = shuffled.size(); i > 1; --i) std::swap(shuffled[i - 1], shuffled[shuffler() % i]);
      for (const Fit fit : {Fit::least_loaded, Fit::earliest_finish})
        consider(search_target(problem, costs, shuffled, fit, fallback));
    }
  } else {
    improve_placement(problem, costs, kept.front(), kMaxLocalMoves);
  }
  auto by_makespan = [](const SlotPlacement& a, const SlotPlacement& b) { return a.makespan < b.makespan; };
  std::stable_sort(kept.begin(), kept.end(), by_makespan);
  if (small) {
    // The best few go on with longer ejection chains: a few sequences on few ranks can need three
    // moved at once (a rotation between groups) to reach a better plan.
    for (std::size_t i = 0; i < std::min<std::size_t>(kept.size(), kDeepSearchPlacements); ++i)
      improve_placement(problem, costs, kept[i], kMaxLocalMoves, kDeepChainDepth);
    std::stable_sort(kept.begin(), kept.end(), by_makespan);
  }
  return kept;
}

SlotPlacement hierarchical_placement(const VarlenProblem& problem, SequenceGroupCosts& costs) {
  return std::move(hierarchical_placements(problem, costs).front());
}

VarlenPlan plan_hierarchical(const VarlenProblem& problem, const MachineModel& machine) {
  const PlannerTimer timer;
  check_problem(problem);
  SequenceGroupCosts costs(problem, machine);
  const auto placements = hierarchical_placements(problem, costs);
  const auto& placement = placements.front();
  auto plan = assemble_ring_plan("hierarchical", problem, machine, placement.slots);
  auto keep_if_faster = [&](std::span<const GroupSlot> slots) {
    auto other = assemble_ring_plan("hierarchical", problem, machine, slots);
    if (other.step_seconds() < plan.step_seconds()) plan = std::move(other);
  };
  // A finished plan runs each group's sequences as one ring with one Ulysses size, which the
  // placements' per-sequence sums only approximate: the other candidates are priced as plans too.
  for (std::size_t i = 1; i < placements.size(); ++i) keep_if_faster(placements[i].slots);
  // The executable baselines are plans of these groups too, so the plan is never slower than the
  // faster of them. Whole sequences: the placement started from that packing and only got faster,
  // unless a ring's sequences together prefer another Ulysses size than each alone (a finished plan
  // runs one per group); then the packing is priced as a plan of its own.
  if (plan.step_seconds() > placement.makespan) {
    SlotPlacement whole;
    const auto order = longest_first(problem.lengths);
    if (Placer(problem, costs, order, Fit::least_loaded).place(std::numeric_limits<double>::infinity(), whole))
      keep_if_faster(whole.slots);
  }
  // Per-sequence zigzag: every sequence over all ranks, priced first as one member's share (every
  // member has the same) and assembled only where it wins.
  if (problem.ranks > 1) {
    const bool fits = problem.cap_tokens == 0 || all_ranks_zigzag_tokens(problem) <= problem.cap_tokens;
    double fastest = std::numeric_limits<double>::infinity();
    auto ulysses_sizes = hybrid_ulysses_sizes(problem, problem.ranks);
    ulysses_sizes.insert(ulysses_sizes.begin(), 1);
    for (const int ulysses : fits ? ulysses_sizes : std::vector<int>{}) {
      const auto tiers = group_tiers(0, problem.ranks, ulysses, problem.gpus_per_node);
      fastest = std::min(fastest, group_member_cost(machine, problem.shape, problem.lengths, problem.ranks, ulysses,
                                                    tiers.ring, tiers.all_to_all)
                                      .total_seconds());
    }
    if (fastest < plan.step_seconds())
      keep_if_faster(std::vector<GroupSlot>(problem.lengths.size(), GroupSlot{0, problem.ranks}));
  }
  plan.planner_ms = timer.elapsed_ms();
  return plan;
}

}  // namespace longattn::partition
