// Local moves after the greedy: the greedy puts each sequence in the smallest group that meets the
// target, which on small batches can leave one rank well above the others; moving or swapping one
// sequence at a time off the slowest rank closes most of that gap.
#include <algorithm>
#include <limits>
#include <vector>

#include "partition/varlen_cost.hpp"
#include "partition/varlen_groups.hpp"

namespace longattn::partition {
namespace {

class LocalSearch {
 public:
  LocalSearch(const VarlenProblem& problem, SequenceGroupCosts& costs, SlotPlacement& placement)
      : problem_(problem), costs_(costs), slots_(placement.slots) {
    cap_ = problem.cap_tokens > 0 ? problem.cap_tokens : std::numeric_limits<std::int64_t>::max();
    const auto& sizes = costs.sizes();
    for (std::size_t i = 0; i < sizes.size(); ++i) size_index_[sizes[i]] = static_cast<int>(i);
    loads_.assign(static_cast<std::size_t>(problem.ranks), 0.0);
    tokens_.assign(static_cast<std::size_t>(problem.ranks), 0);
    sequences_of_.assign(static_cast<std::size_t>(problem.ranks), {});
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
      if (move_elsewhere(s, limit)) return true;
    // A swap pairs every sequence here with every whole sequence elsewhere: only on small batches.
    if (here.size() * slots_.size() > kMaxSwapPairs) return false;
    for (const int s : here)
      if (slots_[static_cast<std::size_t>(s)].size == 1 && swap_whole(s, slowest, limit)) return true;
    return false;
  }

 private:
  // Smaller gains are not worth a move: they would only trade places between near-equal ranks.
  static constexpr double kMinGain = 1e-9;
  static constexpr std::size_t kMaxSwapPairs = std::size_t{1} << 16;

  double cost(int s, int size) { return costs_(s, size_index_.at(size)); }
  std::int64_t member_tokens(int s, int size) const {
    return member_token_bound(problem_, problem_.lengths[static_cast<std::size_t>(s)], size);
  }

  void add(int s, GroupSlot slot, int sign) {
    const double seconds = cost(s, slot.size);
    for (int u = 0; u < slot.size; ++u) {
      const auto r = static_cast<std::size_t>(slot.first_rank + u);
      loads_[r] += sign * seconds;
      tokens_[r] += sign * member_tokens(s, slot.size);
      auto& list = sequences_of_[r];
      if (sign > 0) {
        list.push_back(s);
      } else {
        list.erase(std::find(list.begin(), list.end(), s));
      }
    }
  }

  bool in_slot(int rank, GroupSlot slot) const { return rank >= slot.first_rank && rank < slot.first_rank + slot.size; }

  bool move_elsewhere(int s, double limit) {
    const GroupSlot current = slots_[static_cast<std::size_t>(s)];
    const double now = cost(s, current.size);
    for (const int size : costs_.sizes()) {
      const double then = cost(s, size);
      if (then >= limit) continue;
      const int groups = groups_of_size(problem_.ranks, problem_.gpus_per_node, size);
      for (int g = 0; g < groups; ++g) {
        const GroupSlot candidate{g * size, size};
        if (candidate.first_rank == current.first_rank && size == current.size) continue;
        bool fits = true;
        for (int u = 0; u < size && fits; ++u) {
          const int rank = candidate.first_rank + u;
          const auto r = static_cast<std::size_t>(rank);
          const bool leaving = in_slot(rank, current);
          const double load = loads_[r] - (leaving ? now : 0) + then;
          const std::int64_t tokens = tokens_[r] - (leaving ? member_tokens(s, current.size) : 0) +
                                      member_tokens(s, size);
          fits = load < limit && tokens <= cap_;
        }
        if (!fits) continue;
        add(s, current, -1);
        add(s, candidate, +1);
        slots_[static_cast<std::size_t>(s)] = candidate;
        return true;
      }
    }
    return false;
  }

  bool swap_whole(int s, int slowest, double limit) {
    const double mine = cost(s, 1);
    const std::int64_t my_tokens = problem_.lengths[static_cast<std::size_t>(s)];
    for (int rank = 0; rank < problem_.ranks; ++rank) {
      if (rank == slowest) continue;
      const auto r = static_cast<std::size_t>(rank);
      for (const int other : sequences_of_[r]) {
        if (slots_[static_cast<std::size_t>(other)].size != 1) continue;
        const double theirs = cost(other, 1);
        if (theirs >= mine) continue;
        const std::int64_t their_tokens = problem_.lengths[static_cast<std::size_t>(other)];
        const double slowest_after = loads_[static_cast<std::size_t>(slowest)] - mine + theirs;
        const double other_after = loads_[r] - theirs + mine;
        if (slowest_after >= limit || other_after >= limit) continue;
        if (tokens_[static_cast<std::size_t>(slowest)] - my_tokens + their_tokens > cap_ ||
            tokens_[r] - their_tokens + my_tokens > cap_)
          continue;
        add(s, {slowest, 1}, -1);
        add(other, {rank, 1}, -1);
        add(s, {rank, 1}, +1);
        add(other, {slowest, 1}, +1);
        slots_[static_cast<std::size_t>(s)] = {rank, 1};
        slots_[static_cast<std::size_t>(other)] = {slowest, 1};
        return true;
      }
    }
    return false;
  }

  const VarlenProblem& problem_;
  SequenceGroupCosts& costs_;
  std::vector<GroupSlot>& slots_;
  std::int64_t cap_ = 0;
  std::vector<int> size_index_ = std::vector<int>(static_cast<std::size_t>(problem_.ranks) + 1, -1);
  std::vector<double> loads_;
  std::vector<std::int64_t> tokens_;
  std::vector<std::vector<int>> sequences_of_;  // [rank]: the sequences it holds a share of
};

}  // namespace

void improve_placement(const VarlenProblem& problem, SequenceGroupCosts& costs, SlotPlacement& placement, int max_moves) {
  LocalSearch search(problem, costs, placement);
  for (int move = 0; move < max_moves && search.step(); ++move) {
  }
  placement.makespan = search.makespan();
}

}  // namespace longattn::partition
