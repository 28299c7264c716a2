// The kernel launches of a ring step: the plan's calls (partition/ring_plan.hpp: one or a few per
// sequence) grouped into varlen launches. A launch's cost on a GPU barely depends on how short its
// sequences are, so a packed batch of many short sequences would pay one launch per sequence per
// step if the calls ran one by one; grouped, a step costs one launch per mask kind whatever the
// batch. A single call runs alone with no sequence offsets (the kernels' plain path, what cuDNN
// takes best), so a one-sequence ring launches exactly its plan's plain blocks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "common/check.hpp"
#include "partition/plan.hpp"

namespace longattn::runtime {

// One launch: query rows [q_begin, q_begin + q_count) of the rank's shard against key rows
// [k_begin, k_begin + k_count) of the step's key shard. With sequence offsets (cu_q, cu_k: batch + 1
// prefix sums from q_begin and k_begin) each grouped call is one sequence of the varlen launch, and
// the rows between two calls form filler sequences with no keys (their queries see nothing: o = 0,
// lse = -inf, which the merge leaves alone) or with no queries (their keys get no gradient).
struct Launch {
  std::int64_t q_begin = 0, q_count = 0, k_begin = 0, k_count = 0;
  partition::MaskKind mask = partition::MaskKind::none;
  std::vector<std::int32_t> cu_q, cu_k;  // empty: one sequence, the whole rows
  int max_seqlen_q = 0, max_seqlen_k = 0;
  int batch() const { return cu_q.empty() ? 1 : static_cast<int>(cu_q.size()) - 1; }
};

namespace launches_detail {

inline std::int64_t q_end(const partition::KernelCall& c) { return c.q_begin + c.q_count; }
inline std::int64_t k_end(const partition::KernelCall& c) { return c.k_begin + c.k_count; }

// The sequence whose rows hold query row `row`, from the shard's prefix sums.
inline int sequence_of(std::span<const std::int32_t> cu_seqlens, std::int64_t row) {
  const auto it = std::upper_bound(cu_seqlens.begin(), cu_seqlens.end(), row);
  return static_cast<int>(it - cu_seqlens.begin()) - 1;
}

inline Launch launch_of(const std::vector<partition::KernelCall>& calls) {
  const auto& first = calls.front();
  Launch l{first.q_begin, q_end(calls.back()) - first.q_begin, first.k_begin, k_end(calls.back()) - first.k_begin,
           first.mask, {}, {}, 0, 0};
  if (calls.size() == 1) {
    l.max_seqlen_q = static_cast<int>(first.q_count);
    l.max_seqlen_k = static_cast<int>(first.k_count);
    return l;
  }
  l.cu_q = {0};
  l.cu_k = {0};
  auto add_sequence = [&](std::int64_t queries, std::int64_t keys) {
    l.cu_q.push_back(l.cu_q.back() + static_cast<std::int32_t>(queries));
    l.cu_k.push_back(l.cu_k.back() + static_cast<std::int32_t>(keys));
    l.max_seqlen_q = std::max(l.max_seqlen_q, static_cast<int>(queries));
    l.max_seqlen_k = std::max(l.max_seqlen_k, static_cast<int>(keys));
  };
  // A query gap and a key gap need two fillers: one filler holding both would let them meet.
  for (const auto& c : calls) {
    if (const auto gap = c.q_begin - (l.q_begin + l.cu_q.back()); gap > 0) add_sequence(gap, 0);
    if (const auto gap = c.k_begin - (l.k_begin + l.cu_k.back()); gap > 0) add_sequence(0, gap);
    add_sequence(c.q_count, c.k_count);
  }
  return l;
}

}  // namespace launches_detail

// Groups a step's calls into launches. Calls join a group of their mask kind whose last call
// belongs to an earlier sequence and ends before them on both sides (so the group's sequences
// follow each other in the rows); a group never holds two calls of one sequence, so a
// single-sequence step launches its plan's calls unchanged. `own_cu_seqlens`: the prefix sums of
// the rank's shard (batch + 1 entries), which say the sequence of a call's queries.
inline std::vector<Launch> group_into_launches(std::span<const partition::KernelCall> calls,
                                               std::span<const std::int32_t> own_cu_seqlens) {
  using namespace launches_detail;
  struct Group {
    std::vector<partition::KernelCall> calls;
    int last_sequence = -1;
  };
  std::vector<Group> groups;
  for (const auto& c : calls) {
    LONGATTN_REQUIRE(c.mask != partition::MaskKind::causal_by_index || c.causal_offset == 0, ErrorCode::internal,
                     "the ring executor runs causal calls without an offset only, got offset {}", c.causal_offset);
    const int seq = sequence_of(own_cu_seqlens, c.q_begin);
    auto fits = [&](const Group& g) {
      const auto& last = g.calls.back();
      return last.mask == c.mask && g.last_sequence < seq && q_end(last) <= c.q_begin && k_end(last) <= c.k_begin;
    };
    const auto it = std::find_if(groups.begin(), groups.end(), fits);
    Group& g = it != groups.end() ? *it : groups.emplace_back();
    g.calls.push_back(c);
    g.last_sequence = seq;
  }
  std::vector<Launch> out;
  out.reserve(groups.size());
  for (const auto& g : groups) out.push_back(launch_of(g.calls));
  return out;
}

}  // namespace longattn::runtime
