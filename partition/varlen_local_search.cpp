// Local moves after the greedy: the greedy puts each sequence in the smallest group that meets the
// target, which on small batches can leave one rank well above the others. Moves lower the slowest
// rank one at a time: a sequence of it to another group, two sequences trading groups, or (on small
// batches) an ejection chain: a sequence into a group that it would overload, and one sequence of
// that group out to a third.
#include <algorithm>
#include <limits>
#include <array>
#include <span>
#include <vector>

#include "partition/varlen_cost.hpp"
#include "partition/varlen_groups.hpp"

namespace longattn::partition {
namespace {

struct Reassign {
  int sequence = 0;
  GroupSlot to;
};

class LocalSearch {
 public:
  LocalSearch(const VarlenProblem& problem, SequenceGroupCosts& costs, SlotPlacement& placement, int chain_depth)
      : problem_(problem), costs_(costs), slots_(placement.slots), chain_depth_(chain_depth) {
    cap_ = problem.cap_tokens > 0 ? problem.cap_tokens : std::numeric_limits<std::int64_t>::max();
    const auto& sizes = costs.sizes();
    for (std::size_t i = 0; i < sizes.size(); ++i) size_index_[static_cast<std::size_t>(sizes[i])] = static_cast<int>(i);
    const auto P = static_cast<std::size_t>(problem.ranks);
    loads_.assign(P, 0.0);
    tokens_.assign(P, 0);
    delta_load_.assign(P, 0.0);
    delta_tokens_.assign(P, 0);
    is_touched_.assign(P, 0);
    sequences_of_.assign(P, {});
    for (const int size : sizes)
      for (int g = 0; g < groups_of_size(problem.ranks, problem.gpus_per_node, size); ++g) all_slots_.push_back({g * size, size});
    // Small batches try many moves per step: every sequence's costs up front, in one array.
    if (slots_.size() * all_slots_.size() <= kSmallBatchWork) {
      for (std::size_t s = 0; s < slots_.size(); ++s)
        for (std::size_t i = 0; i < sizes.size(); ++i) {
          dense_costs_.push_back(costs_(static_cast<int>(s), static_cast<int>(i)));
          dense_tokens_.push_back(costs_.member_tokens(static_cast<int>(s), static_cast<int>(i)));
        }
      small_ = true;
    }
    for (std::size_t s = 0; s < slots_.size(); ++s) add(static_cast<int>(s), slots_[s], +1);
  }

  double makespan() const { return *std::max_element(loads_.begin(), loads_.end()); }

  // One move that lowers the slowest rank without raising any rank to its load; false if none.
  bool step() {
    const int slowest = static_cast<int>(std::max_element(loads_.begin(), loads_.end()) - loads_.begin());
    const double limit = loads_[static_cast<std::size_t>(slowest)] * (1 - kMinGain);
    auto here = sequences_of_[static_cast<std::size_t>(slowest)];
    std::sort(here.begin(), here.end());
    for (const int s : here)
      for (const GroupSlot to : all_slots_)
        if (cost(s, to.size) < limit && try_apply(std::array{Reassign{s, to}}, limit)) return true;
    // A swap pairs every sequence here with every sequence elsewhere: only on small batches, or
    // whole sequences with whole ones on batches of moderate size.
    const bool all_pairs = here.size() * slots_.size() <= kMaxSwapPairs;
    if (!all_pairs) return false;
    for (const int s : here)
      for (std::size_t o = 0; o < slots_.size(); ++o) {
        const GroupSlot mine = slots_[static_cast<std::size_t>(s)], theirs = slots_[o];
        if (static_cast<int>(o) == s || mine == theirs) continue;
        if (!small_ && (mine.size != 1 || theirs.size != 1)) continue;
        if (try_apply(std::array{Reassign{s, theirs}, Reassign{static_cast<int>(o), mine}}, limit)) return true;
      }
    return small_ && (merge(slowest, limit) || split(slowest, limit) || (chain_depth_ > 0 && eject(here, limit)));
  }

 private:
  // Smaller gains are not worth a move: they would only trade places between near-equal ranks.
  static constexpr double kMinGain = 1e-9;
  static constexpr std::size_t kMaxSwapPairs = std::size_t{1} << 16;
  // Sequences x slots up to which every pair swap and ejection chain is tried.
  static constexpr std::size_t kSmallBatchWork = 128;
  // A group's sequences dealt between it and its halves: 3^n deals.
  static constexpr std::size_t kMaxDealtSequences = 6;
  // Chains one search may try, over all its steps.
  static constexpr long kMaxChains = 4000;

  double cost(int s, int size) {
    const int i = size_index_[static_cast<std::size_t>(size)];
    return small_ ? dense_costs_[static_cast<std::size_t>(s) * costs_.sizes().size() + static_cast<std::size_t>(i)] : costs_(s, i);
  }
  std::int64_t member_tokens(int s, int size) {
    const int i = size_index_[static_cast<std::size_t>(size)];
    return small_ ? dense_tokens_[static_cast<std::size_t>(s) * costs_.sizes().size() + static_cast<std::size_t>(i)]
                  : costs_.member_tokens(s, i);
  }

  void add(int s, GroupSlot slot, int sign) {
    const double seconds = cost(s, slot.size);
    const std::int64_t tokens = member_tokens(s, slot.size);
    for (int u = 0; u < slot.size; ++u) {
      const auto r = static_cast<std::size_t>(slot.first_rank + u);
      loads_[r] += sign * seconds;
      tokens_[r] += sign * tokens;
      auto& list = sequences_of_[r];
      if (sign > 0) {
        list.push_back(s);
      } else {
        list.erase(std::find(list.begin(), list.end(), s));
      }
    }
  }

  // The loads and tokens the ranks would have after `changes`, as deltas on the touched ranks.
  void stage(std::span<const Reassign> changes) {
    for (const auto& [s, to] : changes) {
      const GroupSlot from = slots_[static_cast<std::size_t>(s)];
      for (const auto& [slot, sign] : {std::pair{from, -1}, std::pair{to, +1}}) {
        const double seconds = cost(s, slot.size);
        const std::int64_t tokens = member_tokens(s, slot.size);
        for (int u = 0; u < slot.size; ++u) {
          const int rank = slot.first_rank + u;
          const auto r = static_cast<std::size_t>(rank);
          if (!is_touched_[r]) {
            is_touched_[r] = 1;
            touched_.push_back(rank);
          }
          delta_load_[r] += sign * seconds;
          delta_tokens_[r] += sign * tokens;
        }
      }
    }
  }

  void unstage() {
    for (const int rank : touched_) {
      delta_load_[static_cast<std::size_t>(rank)] = 0;
      delta_tokens_[static_cast<std::size_t>(rank)] = 0;
      is_touched_[static_cast<std::size_t>(rank)] = 0;
    }
    touched_.clear();
  }

  // Every touched rank ends below `limit` and within the cap.
  bool staged_fits(double limit) const {
    for (const int rank : touched_) {
      const auto r = static_cast<std::size_t>(rank);
      if (loads_[r] + delta_load_[r] >= limit || tokens_[r] + delta_tokens_[r] > cap_) return false;
    }
    return true;
  }

  bool in_slot(int rank, GroupSlot slot) const { return rank >= slot.first_rank && rank < slot.first_rank + slot.size; }

  // One sequence moving: the new group's members checked one by one, stopping at the first that
  // fails (most candidate groups do, and large ones are costly to stage).
  bool single_move_fits(const Reassign& change, double limit) {
    const GroupSlot from = slots_[static_cast<std::size_t>(change.sequence)], to = change.to;
    const double now = cost(change.sequence, from.size), then = cost(change.sequence, to.size);
    const std::int64_t tokens_now = member_tokens(change.sequence, from.size), tokens_then = member_tokens(change.sequence, to.size);
    for (int u = 0; u < to.size; ++u) {
      const int rank = to.first_rank + u;
      const auto r = static_cast<std::size_t>(rank);
      const bool leaving = in_slot(rank, from);
      if (loads_[r] - (leaving ? now : 0) + then >= limit) return false;
      if (tokens_[r] - (leaving ? tokens_now : 0) + tokens_then > cap_) return false;
    }
    return true;
  }

  bool try_apply(std::span<const Reassign> changes, double limit) {
    for (const auto& [s, to] : changes)
      if (slots_[static_cast<std::size_t>(s)] == to) return false;
    if (changes.size() == 1) {
      // Ranks the sequence leaves only get lighter, so the new group's members decide.
      if (!single_move_fits(*changes.begin(), limit)) return false;
      apply(changes);
      return true;
    }
    stage(changes);
    const bool fits = staged_fits(limit);
    unstage();
    if (fits) apply(changes);
    return fits;
  }

  void apply(std::span<const Reassign> changes) {
    for (const auto& [s, to] : changes) {
      add(s, slots_[static_cast<std::size_t>(s)], -1);
      add(s, to, +1);
      slots_[static_cast<std::size_t>(s)] = to;
    }
  }

  // Every sequence inside a larger group holding the slowest rank into that group: ranks that each
  // run their own sequences whole can balance better as a pair sharing them all.
  bool merge(int slowest, double limit) {
    for (const GroupSlot to : all_slots_) {
      if (to.size == 1 || !in_slot(slowest, to)) continue;
      std::vector<Reassign> changes;
      for (std::size_t s = 0; s < slots_.size(); ++s) {
        const GroupSlot from = slots_[s];
        if (from != to && from.first_rank >= to.first_rank && from.first_rank + from.size <= to.first_rank + to.size)
          changes.push_back({static_cast<int>(s), to});
      }
      if (changes.size() >= 2 && try_apply(changes, limit)) return true;
    }
    return false;
  }

  // The sequences of a group holding the slowest rank and of its two halves dealt anew between
  // the three: the best such deal, if it lowers the slowest rank.
  bool split(int slowest, double limit) {
    for (const GroupSlot whole : all_slots_) {
      if (whole.size == 1 || !in_slot(slowest, whole)) continue;
      const int half = whole.size / 2;
      const std::array<GroupSlot, 3> options{whole, GroupSlot{whole.first_rank, half}, GroupSlot{whole.first_rank + half, half}};
      std::vector<int> dealt;
      for (std::size_t s = 0; s < slots_.size(); ++s)
        if (std::find(options.begin(), options.end(), slots_[s]) != options.end()) dealt.push_back(static_cast<int>(s));
      if (dealt.size() < 2 || dealt.size() > kMaxDealtSequences) continue;
      std::size_t deals = 1;
      for (std::size_t i = 0; i < dealt.size(); ++i) deals *= options.size();
      std::vector<Reassign> changes, best;
      double best_load = limit;
      for (std::size_t deal = 0; deal < deals; ++deal) {
        changes.clear();
        for (std::size_t i = 0, code = deal; i < dealt.size(); ++i, code /= options.size()) {
          const GroupSlot to = options[code % options.size()];
          if (slots_[static_cast<std::size_t>(dealt[i])] != to) changes.push_back({dealt[i], to});
        }
        if (changes.empty()) continue;
        stage(changes);
        double slowest_after = 0;
        bool fits = true;
        for (const int rank : touched_) {
          const auto r = static_cast<std::size_t>(rank);
          slowest_after = std::max(slowest_after, loads_[r] + delta_load_[r]);
          fits = fits && tokens_[r] + delta_tokens_[r] <= cap_;
        }
        unstage();
        if (fits && slowest_after < best_load) {
          best_load = slowest_after;
          best = changes;
        }
      }
      if (!best.empty()) {
        apply(best);
        return true;
      }
    }
    return false;
  }

  // A sequence of the slowest rank into a group it overloads, then sequences holding a share of
  // a rank left at or above the limit out to other groups, up to `chain_depth_` of them.
  bool eject(const std::vector<int>& here, double limit) {
    std::vector<Reassign> changes;
    for (const int s : here)
      for (const GroupSlot to : all_slots_) {
        // Only worth it where the sequence itself would run below the limit.
        if (slots_[static_cast<std::size_t>(s)] == to || cost(s, to.size) >= limit) continue;
        changes.assign(1, {s, to});
        stage_one(changes.back(), +1);
        const bool found = chain(changes, {}, chain_depth_, limit);
        stage_one(changes.back(), -1);
        if (found) {
          apply(changes);
          return true;
        }
      }
    return false;
  }

  // With `changes` staged: true, leaving them in `changes`, if they or up to `depth` more moves of
  // sequences off the ranks left overloaded bring every rank below the limit. Only ranks that were
  // overloaded or that the last move added to can be overloaded now.
  bool chain(std::vector<Reassign>& changes, const std::vector<int>& were_overloaded, int depth, double limit) {
    // Long chains grow as (sequences x groups)^depth: a budget of tried chains bounds the search.
    if (++chains_tried_ > kMaxChains) return false;
    auto over = [&](int rank) {
      const auto r = static_cast<std::size_t>(rank);
      return loads_[r] + delta_load_[r] >= limit || tokens_[r] + delta_tokens_[r] > cap_;
    };
    std::vector<int> overloaded;
    for (const int rank : were_overloaded)
      if (over(rank)) overloaded.push_back(rank);
    const GroupSlot last = changes.back().to;
    for (int rank = last.first_rank; rank < last.first_rank + last.size; ++rank)
      if (over(rank) && std::find(overloaded.begin(), overloaded.end(), rank) == overloaded.end()) overloaded.push_back(rank);
    if (overloaded.empty()) return true;
    if (depth == 0) return false;
    auto moved = [&](int o) {
      return std::any_of(changes.begin(), changes.end(), [&](const Reassign& c) { return c.sequence == o; });
    };
    std::vector<int> displaced;
    for (const int rank : overloaded)
      for (const int o : sequences_of_[static_cast<std::size_t>(rank)])
        if (!moved(o) && std::find(displaced.begin(), displaced.end(), o) == displaced.end()) displaced.push_back(o);
    std::sort(displaced.begin(), displaced.end());
    for (const int o : displaced)
      for (const GroupSlot away : all_slots_) {
        if (slots_[static_cast<std::size_t>(o)] == away || cost(o, away.size) >= limit) continue;
        changes.push_back({o, away});
        stage_one(changes.back(), +1);
        const bool found = chain(changes, overloaded, depth - 1, limit);
        stage_one(changes.back(), -1);
        if (found) return true;
        changes.pop_back();
      }
    return false;
  }

  // Adds (sign +1) or takes back (-1) one move's deltas, without tracking touched ranks.
  void stage_one(const Reassign& change, int sign) {
    const GroupSlot from = slots_[static_cast<std::size_t>(change.sequence)];
    for (const auto& [slot, way] : {std::pair{from, -1}, std::pair{change.to, +1}}) {
      const double seconds = cost(change.sequence, slot.size);
      const std::int64_t tokens = member_tokens(change.sequence, slot.size);
      for (int u = 0; u < slot.size; ++u) {
        const auto r = static_cast<std::size_t>(slot.first_rank + u);
        delta_load_[r] += sign * way * seconds;
        delta_tokens_[r] += sign * way * tokens;
      }
    }
  }

  const VarlenProblem& problem_;
  SequenceGroupCosts& costs_;
  std::vector<GroupSlot>& slots_;
  std::vector<GroupSlot> all_slots_;  // every aligned group of every candidate size
  bool small_ = false;
  std::vector<double> dense_costs_;          // small batches: [sequence][size index]
  std::vector<std::int64_t> dense_tokens_;   // small batches: [sequence][size index]
  int chain_depth_ = 1;  // sequences an ejection chain moves after the first
  long chains_tried_ = 0;
  std::int64_t cap_ = 0;
  std::vector<int> size_index_ = std::vector<int>(static_cast<std::size_t>(problem_.ranks) + 1, -1);
  std::vector<double> loads_;
  std::vector<std::int64_t> tokens_;
  std::vector<double> delta_load_;
  std::vector<std::int64_t> delta_tokens_;
  std::vector<int> touched_;
  std::vector<char> is_touched_;
  std::vector<std::vector<int>> sequences_of_;  // [rank]: the sequences it holds a share of
};

}  // namespace

void improve_placement(const VarlenProblem& problem, SequenceGroupCosts& costs, SlotPlacement& placement, int max_moves,
                       int chain_depth) {
  LocalSearch search(problem, costs, placement, chain_depth);
  for (int move = 0; move < max_moves && search.step(); ++move) {
  }
  placement.makespan = search.makespan();
}

}  // namespace longattn::partition
