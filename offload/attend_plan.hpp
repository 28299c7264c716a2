// Where the offload client's sequences live on its servers, and how one attend call is cut into
// one request per server and joined back. A sequence lives whole on its home server, or with
// shard_tokens = N its tokens [kN, (k+1)N) live on server (home + k) as a sequence of their own;
// the answers of the shards of one query are joined with the LSE merge. Pure: no I/O, no state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "offload/protocol.hpp"

namespace longattn::offload {

// Server-side sequence ids: the client's id in the high bits, the shard index in the low ones.
inline constexpr int kShardBits = 16;
inline constexpr std::uint64_t kMaxShards = std::uint64_t{1} << kShardBits;
inline constexpr std::uint64_t kMaxSeqId = std::uint64_t{1} << (64 - kShardBits);

inline std::uint64_t server_seq_id(std::uint64_t seq, std::uint64_t shard) { return (seq << kShardBits) | shard; }

struct ShardLayout {
  std::int64_t shard_tokens = 0;  // 0: whole sequences on their home server
  std::size_t servers = 1;

  int server_of(int home, std::uint64_t shard) const {
    return static_cast<int>((static_cast<std::uint64_t>(home) + shard) % servers);
  }
  // The shard that stores token `position` of a sequence.
  std::uint64_t shard_of(std::int64_t position) const {
    return shard_tokens > 0 ? static_cast<std::uint64_t>(position / shard_tokens) : 0;
  }
  // Shards that hold a sequence of `length` tokens (at least one, where an empty one is opened).
  std::uint64_t shards_for(std::int64_t length) const;
  // Tokens of a sequence of `length` tokens held by `shard`.
  std::int64_t tokens_in(std::int64_t length, std::uint64_t shard) const;
  // The first token of `shard` in the whole sequence.
  std::int64_t first_token(std::uint64_t shard) const { return static_cast<std::int64_t>(shard) * shard_tokens; }
};

// One sequence's queries in an attend, with what the client knows of it.
struct QueriedSequence {
  std::uint64_t seq = 0;
  int q_count = 1;
  std::int64_t length = 0;  // tokens of the layer, the queries' own included
  int home = 0;             // server of shard 0
};

// The caller's query rows [first_row, first_row + rows) answered by consecutive rows of a reply.
struct RowSpan {
  std::int64_t first_row = 0;
  int rows = 0;
};

// What one server is asked: its request, the q rows it carries, and where its answer rows go.
struct ServerAttend {
  Attend request;           // request.q left empty: point it at q where the plan stays
  std::vector<float> q;     // [request.total_q, q_heads, head_dim]
  std::vector<RowSpan> rows;
  bool asked() const { return !rows.empty(); }
};

struct AttendPlan {
  int q_heads = 0, head_dim = 0;
  std::int64_t total_q = 0;
  std::vector<ServerAttend> servers;  // by server index; servers not asked have no rows
};

// q: [sum of q_count, q_heads, head_dim] f32, the queries' rows in order. Throws
// Error(invalid_argument) for a q_count outside [1, 256].
AttendPlan plan_attend(const ShardLayout& layout, int layer, int q_heads, int head_dim, std::span<const QueriedSequence> queries,
                       const float* q);

// The append half of an append_attend for one server: for each sequence of its attend request
// (in order), how many of the new tokens land on that shard, and their k, v rows.
struct ServerNewTokens {
  std::vector<std::uint32_t> counts;
  std::vector<std::byte> k, v;
};

// Places each query's new tokens (the q_count tokens at the end of `length`, whose k and v rows
// are those of the query rows, `row_bytes` each) on the shards that store them, following `plan`
// (made by plan_attend from the same queries). Result by server index.
std::vector<ServerNewTokens> place_new_tokens(const ShardLayout& layout, const AttendPlan& plan, std::span<const QueriedSequence> queries,
                                              const void* k, const void* v, std::size_t row_bytes);

// Joins the servers' replies (replies[s] for every asked server s) into o [total_q, q_heads,
// head_dim] and lse [q_heads, total_q]. Throws Error(protocol) for a reply of the wrong shape.
void merge_attend_replies(const AttendPlan& plan, std::span<const AttendReply> replies, float* o, float* lse);

}  // namespace longattn::offload
