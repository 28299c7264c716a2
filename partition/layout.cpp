// Contiguous, zigzag and striped shard plans. Pure functions of (cu_seqlens, layout, world).
#include "longattn/layout.hpp"

#include <algorithm>
#include <cstring>

#include "common/check.hpp"

namespace longattn {
namespace {

// Size and start of piece c when n items are cut into `pieces` parts differing by at most one.
std::int64_t piece_size(std::int64_t n, std::int64_t pieces, std::int64_t c) { return n / pieces + (c < n % pieces ? 1 : 0); }
std::int64_t piece_start(std::int64_t n, std::int64_t pieces, std::int64_t c) {
  return c * (n / pieces) + std::min(c, n % pieces);
}

// Calls emit(position) for each position of a sequence of length n that `rank` holds, increasing.
template <class Emit>
void for_each_local_position(Layout layout, std::int64_t n, int world, int rank, Emit&& emit) {
  switch (layout) {
    case Layout::contiguous: {
      const auto s = piece_start(n, world, rank), z = piece_size(n, world, rank);
      for (std::int64_t p = s; p < s + z; ++p) emit(p);
      break;
    }
    case Layout::zigzag: {
      const std::int64_t chunks = 2LL * world;
      for (std::int64_t c : {std::int64_t{rank}, chunks - 1 - rank}) {
        const auto s = piece_start(n, chunks, c), z = piece_size(n, chunks, c);
        for (std::int64_t p = s; p < s + z; ++p) emit(p);
      }
      break;
    }
    case Layout::striped:
      for (std::int64_t p = rank; p < n; p += world) emit(p);
      break;
  }
}

std::int64_t local_count(Layout layout, std::int64_t n, int world, int rank) {
  switch (layout) {
    case Layout::contiguous: return piece_size(n, world, rank);
    case Layout::zigzag: return piece_size(n, 2LL * world, rank) + piece_size(n, 2LL * world, 2LL * world - 1 - rank);
    case Layout::striped: return n > rank ? (n - rank + world - 1) / world : 0;
  }
  return 0;
}

}  // namespace

const char* to_string(Layout l) noexcept {
  switch (l) {
    case Layout::contiguous: return "contiguous";
    case Layout::zigzag: return "zigzag";
    case Layout::striped: return "striped";
  }
  return "?";
}

Layout parse_layout(const std::string& name) {
  if (name == "contiguous") return Layout::contiguous;
  if (name == "zigzag") return Layout::zigzag;
  if (name == "striped") return Layout::striped;
  throw Error(ErrorCode::invalid_argument, fmt::format("unknown layout '{}': use contiguous, zigzag or striped", name));
}

ShardPlan::ShardPlan(std::vector<std::int32_t> cu_seqlens, Layout layout, int world)
    : cu_seqlens_(std::move(cu_seqlens)), layout_(layout), world_(world) {
  LONGATTN_INVALID(world >= 1, "the number of ranks must be at least 1, got {}", world);
  LONGATTN_INVALID(cu_seqlens_.size() >= 2 && cu_seqlens_.front() == 0,
                   "cu_seqlens must start at 0 and hold at least one sequence");
  for (std::size_t b = 1; b < cu_seqlens_.size(); ++b)
    LONGATTN_INVALID(cu_seqlens_[b] >= cu_seqlens_[b - 1], "cu_seqlens must be non-decreasing (entry {} is {} < {})", b,
                     cu_seqlens_[b], cu_seqlens_[b - 1]);
}

ShardPlan::ShardPlan(std::vector<std::int32_t> cu_seqlens, Layout layout, int world, int group_size)
    : ShardPlan(std::move(cu_seqlens), layout, world) {
  LONGATTN_INVALID(group_size >= 1 && world % group_size == 0,
                   "a group of {} ranks does not divide the {} ranks into equal groups: use one of {}", group_size, world,
                   [&] {
                     std::string sizes;
                     for (int d = 1; d <= world; ++d)
                       if (world % d == 0) sizes += (sizes.empty() ? "" : ", ") + std::to_string(d);
                     return sizes;
                   }());
  group_size_ = group_size;
}

ShardPlan ShardPlan::group_plan() const { return ShardPlan(cu_seqlens_, layout_, groups()); }

std::int64_t ShardPlan::group_row_begin(int rank) const {
  LONGATTN_INVALID(rank >= 0 && rank < world_, "rank {} is outside [0, {})", rank, world_);
  if (group_size_ == 1) return 0;
  return piece_start(group_plan().local_tokens(rank / group_size_), group_size_, rank % group_size_);
}

ShardPlan ShardPlan::single_sequence(std::int64_t seq_len, Layout layout, int world) {
  LONGATTN_INVALID(seq_len >= 1 && seq_len < (std::int64_t{1} << 31), "sequence length must be in [1, 2^31), got {}", seq_len);
  return ShardPlan({0, static_cast<std::int32_t>(seq_len)}, layout, world);
}

std::int64_t ShardPlan::local_tokens(int rank) const {
  if (group_size_ > 1) return piece_size(group_plan().local_tokens(rank / group_size_), group_size_, rank % group_size_);
  std::int64_t n = 0;
  for (int b = 0; b < batch(); ++b) n += local_count(layout_, cu_seqlens_[b + 1] - cu_seqlens_[b], world_, rank);
  return n;
}

std::int64_t ShardPlan::max_local_tokens() const {
  std::int64_t m = 0;
  for (int r = 0; r < world_; ++r) m = std::max(m, local_tokens(r));
  return m;
}

RankShard ShardPlan::shard(int rank) const {
  LONGATTN_INVALID(rank >= 0 && rank < world_, "rank {} is outside [0, {})", rank, world_);
  if (group_size_ > 1) return shard_from_runs(rank);
  RankShard s;
  const auto n = local_tokens(rank);
  s.global_index.reserve(static_cast<std::size_t>(n));
  s.positions.reserve(static_cast<std::size_t>(n));
  s.cu_seqlens.reserve(cu_seqlens_.size());
  s.cu_seqlens.push_back(0);
  for (int b = 0; b < batch(); ++b) {
    const std::int64_t start = cu_seqlens_[b];
    for_each_local_position(layout_, cu_seqlens_[b + 1] - start, world_, rank, [&](std::int64_t p) {
      s.global_index.push_back(start + p);
      s.positions.push_back(static_cast<std::int32_t>(p));
    });
    s.cu_seqlens.push_back(static_cast<std::int32_t>(s.global_index.size()));
  }
  return s;
}

RankShard ShardPlan::shard_from_runs(int rank) const {
  RankShard s;
  s.cu_seqlens.assign(cu_seqlens_.size(), 0);
  for (const auto& run : runs(rank)) {
    for (std::int64_t i = 0; i < run.count; ++i) {
      const auto p = static_cast<std::int32_t>(run.first + i * run.stride);
      s.global_index.push_back(cu_seqlens_[static_cast<std::size_t>(run.seq)] + p);
      s.positions.push_back(p);
    }
    s.cu_seqlens[static_cast<std::size_t>(run.seq) + 1] += static_cast<std::int32_t>(run.count);
  }
  for (std::size_t b = 1; b < s.cu_seqlens.size(); ++b) s.cu_seqlens[b] += s.cu_seqlens[b - 1];
  return s;
}

// Rows [begin, begin + count) of a list of runs, rebased to start at row 0: runs cut where the
// range cuts them stay arithmetic progressions.
static std::vector<TokenRun> slice_runs(const std::vector<TokenRun>& runs, std::int64_t begin, std::int64_t count) {
  std::vector<TokenRun> out;
  const std::int64_t end = begin + count;
  for (const auto& r : runs) {
    const std::int64_t lo = std::max(begin, r.row), hi = std::min(end, r.row + r.count);
    if (lo >= hi) continue;
    out.push_back({r.seq, lo - begin, hi - lo, static_cast<std::int32_t>(r.first + (lo - r.row) * r.stride), r.stride});
  }
  return out;
}

std::vector<TokenRun> ShardPlan::runs(int rank) const {
  LONGATTN_INVALID(rank >= 0 && rank < world_, "rank {} is outside [0, {})", rank, world_);
  if (group_size_ > 1) return slice_runs(group_plan().runs(rank / group_size_), group_row_begin(rank), local_tokens(rank));
  std::vector<TokenRun> out;
  std::int64_t row = 0;
  auto add = [&](int seq, std::int64_t first, std::int64_t count, std::int64_t stride) {
    if (count <= 0) return;
    out.push_back({seq, row, count, static_cast<std::int32_t>(first), static_cast<std::int32_t>(stride)});
    row += count;
  };
  for (int b = 0; b < batch(); ++b) {
    const std::int64_t n = cu_seqlens_[b + 1] - cu_seqlens_[b];
    switch (layout_) {
      case Layout::contiguous: add(b, piece_start(n, world_, rank), piece_size(n, world_, rank), 1); break;
      case Layout::zigzag:
        for (std::int64_t c : {std::int64_t{rank}, std::int64_t{2} * world_ - 1 - rank})
          add(b, piece_start(n, std::int64_t{2} * world_, c), piece_size(n, std::int64_t{2} * world_, c), 1);
        break;
      case Layout::striped: add(b, rank, local_count(layout_, n, world_, rank), world_); break;
    }
  }
  return out;
}

void shard_rows(const void* global, void* local, std::size_t row_bytes, const RankShard& shard) {
  auto* dst = static_cast<char*>(local);
  const auto* src = static_cast<const char*>(global);
  for (std::size_t i = 0; i < shard.global_index.size(); ++i)
    std::memcpy(dst + i * row_bytes, src + static_cast<std::size_t>(shard.global_index[i]) * row_bytes, row_bytes);
}

void unshard_rows(const void* local, void* global, std::size_t row_bytes, const RankShard& shard) {
  auto* dst = static_cast<char*>(global);
  const auto* src = static_cast<const char*>(local);
  for (std::size_t i = 0; i < shard.global_index.size(); ++i)
    std::memcpy(dst + static_cast<std::size_t>(shard.global_index[i]) * row_bytes, src + i * row_bytes, row_bytes);
}

}  // namespace longattn
