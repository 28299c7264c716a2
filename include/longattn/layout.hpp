// How the tokens of a batch of sequences are spread over P ranks for sequence parallelism.
//   contiguous: rank r holds the r-th of P equal slices of each sequence (causal work unbalanced);
//   zigzag:     each sequence is cut into 2P chunks, rank r holds chunks r and 2P-1-r, so under a
//               causal mask every rank has the same work at every ring step;
//   striped:    token t of a sequence lives on rank t mod P (also balanced).
// Lengths need not divide evenly: chunks differ by at most one token.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace longattn {

enum class Layout { contiguous, zigzag, striped };
const char* to_string(Layout l) noexcept;
Layout parse_layout(const std::string& name);  // throws on an unknown name

// The tokens one rank holds, in local order (sequence by sequence, positions increasing).
struct RankShard {
  std::vector<std::int64_t> global_index;  // packed index in the full batch of each local token
  std::vector<std::int32_t> positions;     // position of each local token inside its sequence
  std::vector<std::int32_t> cu_seqlens;    // local prefix sums, batch + 1 entries
  std::int64_t tokens() const noexcept { return static_cast<std::int64_t>(global_index.size()); }
};

// A stretch of one rank's tokens in arithmetic progression: local rows [row, row + count) hold the
// tokens at positions first, first + stride, ... of sequence `seq`. A shard is at most two runs per
// sequence whatever the length, so planning from runs costs nothing per token.
struct TokenRun {
  int seq = 0;
  std::int64_t row = 0, count = 0;
  std::int32_t first = 0, stride = 1;
  bool operator==(const TokenRun&) const = default;
};

class ShardPlan {
 public:
  // cu_seqlens: prefix sums of the global batch (batch + 1 entries, starting at 0).
  ShardPlan(std::vector<std::int32_t> cu_seqlens, Layout layout, int world);
  // A two-level plan, what the Ulysses and hybrid strategies run on: the ranks form
  // world / group_size groups of group_size consecutive ranks (a node's GPUs); `layout` spreads the
  // tokens over the groups (group g holds what rank g of the world / group_size-rank plan holds),
  // and inside a group its tokens, in the group's local order, are cut into group_size contiguous
  // slices differing by at most one token (rank g * group_size + u holds slice u). An all-to-all
  // inside the group therefore gathers the group's tokens in order by concatenating the members'
  // rows. group_size 1 is the one-level plan; group_size == world puts the whole batch, in global
  // order, in one group. group_size must divide world.
  ShardPlan(std::vector<std::int32_t> cu_seqlens, Layout layout, int world, int group_size);
  static ShardPlan single_sequence(std::int64_t seq_len, Layout layout, int world);

  RankShard shard(int rank) const;
  std::vector<TokenRun> runs(int rank) const;  // the shard in local order, as runs (none empty)
  std::int64_t local_tokens(int rank) const;  // without building the index lists
  std::int64_t max_local_tokens() const;
  int world() const noexcept { return world_; }
  int group_size() const noexcept { return group_size_; }
  int groups() const noexcept { return world_ / group_size_; }
  // The one-level plan over the groups: its rank g holds group g's tokens in the group's order.
  ShardPlan group_plan() const;
  // Where rank's slice starts among its group's rows (0 for one-level plans).
  std::int64_t group_row_begin(int rank) const;
  Layout layout() const noexcept { return layout_; }
  int batch() const noexcept { return static_cast<int>(cu_seqlens_.size()) - 1; }
  std::int64_t total_tokens() const noexcept { return cu_seqlens_.back(); }
  const std::vector<std::int32_t>& cu_seqlens() const noexcept { return cu_seqlens_; }

 private:
  RankShard shard_from_runs(int rank) const;
  std::vector<std::int32_t> cu_seqlens_;
  Layout layout_;
  int world_;
  int group_size_ = 1;
};

// Gather the rows (row_bytes each) a rank holds out of the full batch, and scatter them back.
void shard_rows(const void* global, void* local, std::size_t row_bytes, const RankShard& shard);
void unshard_rows(const void* local, void* global, std::size_t row_bytes, const RankShard& shard);

}  // namespace longattn
