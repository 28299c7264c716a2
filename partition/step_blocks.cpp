// See step_blocks.hpp. Each side is cut into runs of positions in arithmetic progression with one
// common stride S (1 for contiguous and zigzag shards, P for striped ones). For a query run
// starting at position a and a key run starting at b, query i and key j are visible iff
// b + jS <= a + iS, i.e. j <= i + t with t = floor((a - b) / S):
//   keys j < t are seen by every query (a full block), keys j >= t by query i iff j - t <= i
//   (causal by index after shifting the keys by t); for t < 0 the first -t queries see nothing and
//   the rest are causal by index after shifting the queries.
#include "partition/step_blocks.hpp"

#include <algorithm>

namespace longattn::partition {
namespace {

struct Run {
  std::int64_t begin = 0, count = 0;  // rows
  std::int64_t first = 0;             // position of the first row
};

std::int64_t floor_div(std::int64_t a, std::int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

// Runs of stride `stride` covering pos in order; a stride of 0 means "find one": the whole array
// if it is one progression, else stride-1 runs.
std::vector<Run> runs_of(std::span<const std::int32_t> pos, std::int64_t stride) {
  std::vector<Run> runs;
  for (std::size_t i = 0; i < pos.size(); ++i) {
    if (!runs.empty() && pos[i] == runs.back().first + runs.back().count * stride) {
      ++runs.back().count;
    } else {
      runs.push_back({static_cast<std::int64_t>(i), 1, pos[i]});
    }
  }
  return runs;
}

std::int64_t common_stride(std::span<const std::int32_t> a, std::span<const std::int32_t> b) {
  // The stride of a single progression on either side (striped shards), else 1.
  for (auto pos : {a, b})
    if (pos.size() >= 2) {
      const std::int64_t s = pos[1] - pos[0];
      bool one_run = s > 0;
      for (std::size_t i = 2; i < pos.size() && one_run; ++i) one_run = pos[i] - pos[i - 1] == s;
      if (one_run) return s;
    }
  return 1;
}

void add_pair(const Run& q, const Run& k, std::int64_t stride, std::vector<StepBlock>& out) {
  const std::int64_t t = floor_div(q.first - k.first, stride);
  if (t >= 0) {
    const std::int64_t full = std::min(t, k.count);
    if (full > 0) out.push_back({q.begin, q.count, k.begin, full, false});
    if (t < k.count) out.push_back({q.begin, q.count, k.begin + t, k.count - t, true});
  } else if (-t < q.count) {
    out.push_back({q.begin - t, q.count + t, k.begin, k.count, true});
  }
}

// Joins full blocks that share a side and touch on the other, so zigzag steps become one call.
void merge_full_blocks(std::vector<StepBlock>& blocks) {
  for (bool merged = true; merged;) {
    merged = false;
    for (std::size_t i = 0; i < blocks.size() && !merged; ++i)
      for (std::size_t j = 0; j < blocks.size() && !merged; ++j) {
        if (i == j || blocks[i].causal || blocks[j].causal) continue;
        auto& x = blocks[i];
        const auto& y = blocks[j];
        if (x.k_begin == y.k_begin && x.k_count == y.k_count && x.q_begin + x.q_count == y.q_begin) {
          x.q_count += y.q_count;
          merged = true;
        } else if (x.q_begin == y.q_begin && x.q_count == y.q_count && x.k_begin + x.k_count == y.k_begin) {
          x.k_count += y.k_count;
          merged = true;
        }
        if (merged) blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(j));
      }
  }
}

// Pairs every query run with every key run; nullopt past max_blocks.
std::optional<std::vector<StepBlock>> blocks_of_runs(const std::vector<Run>& qr, const std::vector<Run>& kr, std::int64_t stride,
                                                     int max_blocks) {
  if (static_cast<int>(qr.size() * kr.size()) > 4 * max_blocks) return std::nullopt;
  std::vector<StepBlock> blocks;
  for (const auto& q : qr)
    for (const auto& k : kr) add_pair(q, k, stride, blocks);
  merge_full_blocks(blocks);
  if (static_cast<int>(blocks.size()) > max_blocks) return std::nullopt;
  return blocks;
}

// Whether the runs hold one progression of at least two positions, and its stride.
std::optional<std::int64_t> single_progression(std::span<const TokenRun> runs) {
  std::int64_t first = 0, count = 0, stride = 0;
  for (const auto& r : runs) {
    for (std::int64_t taken = 0; taken < r.count;) {
      const std::int64_t pos = r.first + taken * static_cast<std::int64_t>(r.stride);
      if (count == 0) {
        first = pos;
        count = 1;
        ++taken;
      } else if (count == 1) {
        stride = pos - first;
        count = 2;
        ++taken;
      } else if (pos == first + count * stride) {
        // The rest of this run continues the progression when it has the same stride.
        const std::int64_t rest = r.count - taken;
        if (rest > 1 && r.stride != stride) return std::nullopt;
        count += rest;
        taken = r.count;
      } else {
        return std::nullopt;
      }
    }
  }
  if (count < 2 || stride <= 0) return std::nullopt;
  return stride;
}

// The maximal runs of stride `stride` covering the given runs in order, as runs_of would find them
// from the positions; nullopt when a run of another stride would split into more than `limit`.
std::optional<std::vector<Run>> restride(std::span<const TokenRun> runs, std::int64_t stride, std::size_t limit) {
  std::vector<Run> out;
  auto push = [&](std::int64_t row, std::int64_t count, std::int64_t first) {
    if (!out.empty() && first == out.back().first + out.back().count * stride) out.back().count += count;
    else out.push_back({row, count, first});
  };
  for (const auto& r : runs) {
    if (r.count == 1 || r.stride == stride) {
      push(r.row, r.count, r.first);
      continue;
    }
    if (static_cast<std::size_t>(r.count) > limit) return std::nullopt;
    for (std::int64_t i = 0; i < r.count; ++i) push(r.row + i, 1, r.first + i * static_cast<std::int64_t>(r.stride));
    if (out.size() > limit) return std::nullopt;
  }
  return out;
}

}  // namespace

std::optional<std::vector<StepBlock>> causal_step_blocks(std::span<const std::int32_t> qpos,
                                                         std::span<const std::int32_t> kpos, int max_blocks) {
  std::vector<StepBlock> blocks;
  if (qpos.empty() || kpos.empty()) return blocks;
  // Queries and keys of the same shard: increasing positions make the mask causal by index.
  if (std::equal(qpos.begin(), qpos.end(), kpos.begin(), kpos.end())) {
    blocks.push_back({0, static_cast<std::int64_t>(qpos.size()), 0, static_cast<std::int64_t>(kpos.size()), true});
    return blocks;
  }
  const std::int64_t stride = common_stride(qpos, kpos);
  return blocks_of_runs(runs_of(qpos, stride), runs_of(kpos, stride), stride, max_blocks);
}

std::optional<std::vector<StepBlock>> causal_step_blocks(std::span<const TokenRun> q, std::span<const TokenRun> k,
                                                         int max_blocks) {
  auto tokens = [](std::span<const TokenRun> runs) {
    std::int64_t n = 0;
    for (const auto& r : runs) n += r.count;
    return n;
  };
  const std::int64_t nq = tokens(q), nk = tokens(k);
  std::vector<StepBlock> blocks;
  if (nq == 0 || nk == 0) return blocks;
  // Shards of one sequence share no token, so equal runs mean the same shard (the diagonal step).
  if (std::equal(q.begin(), q.end(), k.begin(), k.end())) {
    blocks.push_back({0, nq, 0, nk, true});
    return blocks;
  }
  // As common_stride: a single progression on either side sets the stride, else 1.
  std::int64_t stride = 1;
  if (const auto s = single_progression(q)) stride = *s;
  else if (const auto t = single_progression(k)) stride = *t;
  const auto limit = static_cast<std::size_t>(4 * max_blocks);
  const auto qr = restride(q, stride, limit), kr = restride(k, stride, limit);
  if (!qr || !kr) return std::nullopt;
  return blocks_of_runs(*qr, *kr, stride, max_blocks);
}

}  // namespace longattn::partition
