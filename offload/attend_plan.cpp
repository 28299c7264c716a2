// The offload client's shard planning (see attend_plan.hpp).
#include "offload/attend_plan.hpp"

#include <algorithm>
#include <cstring>

#include "common/check.hpp"
#include "kernels/attention_state.hpp"

namespace longattn::offload {

std::uint64_t ShardLayout::shards_for(std::int64_t length) const {
  if (shard_tokens <= 0) return 1;
  return std::max<std::uint64_t>(1, static_cast<std::uint64_t>((length + shard_tokens - 1) / shard_tokens));
}

std::int64_t ShardLayout::tokens_in(std::int64_t length, std::uint64_t shard) const {
  if (shard_tokens <= 0) return length;
  return std::clamp<std::int64_t>(length - first_token(shard), 0, shard_tokens);
}

AttendPlan plan_attend(const ShardLayout& layout, int layer, int q_heads, int head_dim, std::span<const QueriedSequence> queries,
                       const float* q) {
  AttendPlan plan;
  plan.q_heads = q_heads;
  plan.head_dim = head_dim;
  plan.servers.resize(layout.servers);
  bool positions = false;
  for (const auto& qs : queries) {
    LONGATTN_INVALID(qs.q_count >= 1 && qs.q_count <= 256, "attend: q_count {} outside [1, 256]", qs.q_count);
    positions |= qs.q_count > 1;
  }
  const std::size_t q_row = static_cast<std::size_t>(q_heads) * static_cast<std::size_t>(head_dim);
  std::int64_t row = 0;
  for (const auto& qs : queries) {
    const float* q_begin = q + static_cast<std::size_t>(row) * q_row;
    const float* q_end = q + static_cast<std::size_t>(row + qs.q_count) * q_row;
    // Every shard sees all of the sequence's queries: causality is by absolute position.
    for (std::uint64_t k = 0; k < layout.shards_for(qs.length); ++k) {
      auto& part = plan.servers[static_cast<std::size_t>(layout.server_of(qs.home, k))];
      part.request.seqs.push_back({server_seq_id(qs.seq, k), static_cast<std::uint32_t>(qs.q_count), layout.tokens_in(qs.length, k)});
      part.rows.push_back({row, qs.q_count});
      part.q.insert(part.q.end(), q_begin, q_end);
      for (int j = 0; j < qs.q_count; ++j) part.request.positions.push_back(qs.length - qs.q_count + j);
      part.request.total_q += static_cast<std::uint64_t>(qs.q_count);
    }
    row += qs.q_count;
  }
  plan.total_q = row;
  for (auto& part : plan.servers) {
    part.request.layer = static_cast<std::uint32_t>(layer);
    part.request.q_heads = static_cast<std::uint32_t>(q_heads);
    part.request.head_dim = static_cast<std::uint32_t>(head_dim);
    part.request.flags = positions ? kAttendHasPositions : 0;
  }
  return plan;
}

std::vector<ServerNewTokens> place_new_tokens(const ShardLayout& layout, const AttendPlan& plan, std::span<const QueriedSequence> queries,
                                              const void* k, const void* v, std::size_t row_bytes) {
  // The query that starts at each row: the plan names its parts by their first row.
  std::vector<const QueriedSequence*> by_row(static_cast<std::size_t>(plan.total_q), nullptr);
  std::int64_t row = 0;
  for (const auto& qs : queries) {
    by_row[static_cast<std::size_t>(row)] = &qs;
    row += qs.q_count;
  }
  const auto* kb = static_cast<const std::byte*>(k);
  const auto* vb = static_cast<const std::byte*>(v);
  std::vector<ServerNewTokens> out(plan.servers.size());
  for (std::size_t s = 0; s < plan.servers.size(); ++s) {
    const auto& part = plan.servers[s];
    auto& placed = out[s];
    for (std::size_t i = 0; i < part.rows.size(); ++i) {
      const QueriedSequence& qs = *by_row[static_cast<std::size_t>(part.rows[i].first_row)];
      const std::uint64_t shard = part.request.seqs[i].seq & (kMaxShards - 1);
      const std::int64_t first_new = qs.length - qs.q_count;
      std::int64_t lo = first_new, hi = qs.length;
      if (layout.shard_tokens > 0) {
        lo = std::max(lo, layout.first_token(shard));
        hi = std::min(hi, layout.first_token(shard + 1));
      }
      const std::int64_t n = std::max<std::int64_t>(0, hi - lo);
      placed.counts.push_back(static_cast<std::uint32_t>(n));
      if (n == 0) continue;
      const std::size_t from = static_cast<std::size_t>(part.rows[i].first_row + (lo - first_new)) * row_bytes;
      const std::size_t bytes = static_cast<std::size_t>(n) * row_bytes;
      placed.k.insert(placed.k.end(), kb + from, kb + from + bytes);
      placed.v.insert(placed.v.end(), vb + from, vb + from + bytes);
    }
  }
  return out;
}

void merge_attend_replies(const AttendPlan& plan, std::span<const AttendReply> replies, float* o, float* lse) {
  const std::size_t D = static_cast<std::size_t>(plan.head_dim), H = static_cast<std::size_t>(plan.q_heads);
  const std::size_t total_q = static_cast<std::size_t>(plan.total_q);
  LONGATTN_INVALID(replies.size() == plan.servers.size(), "attend: {} replies for {} servers", replies.size(), plan.servers.size());
  // Rows no shard answered stay empty: o = 0, lse = -inf.
  std::fill(o, o + total_q * H * D, 0.0f);
  std::fill(lse, lse + H * total_q, -INFINITY);
  std::vector<float> part_o, part_lse;
  for (std::size_t s = 0; s < plan.servers.size(); ++s) {
    const auto& part = plan.servers[s];
    if (!part.asked()) continue;
    const AttendReply& r = replies[s];
    LONGATTN_REQUIRE(r.total_q == part.request.total_q && r.q_heads == H && r.head_dim == D &&
                         r.o.size() == r.total_q * H * D * sizeof(float) && r.lse.size() == r.total_q * H * sizeof(float),
                     ErrorCode::protocol, "server {} answered an attend of {} rows x {} heads x {} with {} rows x {} heads x {}", s,
                     part.request.total_q, H, D, r.total_q, r.q_heads, r.head_dim);
    // The reply's bytes need not be aligned for float.
    part_o.resize(r.o.size() / sizeof(float));
    part_lse.resize(r.lse.size() / sizeof(float));
    std::memcpy(part_o.data(), r.o.data(), r.o.size());
    std::memcpy(part_lse.data(), r.lse.data(), r.lse.size());
    std::size_t reply_row = 0;
    for (const auto& span : part.rows) {
      for (int j = 0; j < span.rows; ++j, ++reply_row) {
        const std::size_t row = static_cast<std::size_t>(span.first_row + j);
        for (std::size_t h = 0; h < H; ++h) {
          float& acc_lse = lse[h * total_q + row];
          const kernels::ResultMerge m = kernels::merge_results(acc_lse, part_lse[h * r.total_q + reply_row]);
          float* acc_o = o + (row * H + h) * D;
          const float* reply_o = &part_o[(reply_row * H + h) * D];
          for (std::size_t d = 0; d < D; ++d) acc_o[d] = kernels::mix(m.weights, acc_o[d], reply_o[d]);
          acc_lse = m.lse;
        }
      }
    }
  }
}

}  // namespace longattn::offload
