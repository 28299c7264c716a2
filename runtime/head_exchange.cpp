// See head_exchange.hpp. A member's own piece never goes through the communicator: it is copied
// straight between the two layouts, and its byte counts are zero on both sides of the all-to-all.
#include "runtime/head_exchange.hpp"

#include <algorithm>
#include <chrono>

#include "common/check.hpp"

namespace longattn::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// A tensor with no rows may come without memory: nothing is read from or written to it then.
char* bytes_at(const TensorView& t, std::size_t offset) { return t.data ? static_cast<char*>(t.data) + offset : nullptr; }

// Bytes of `heads` heads of one token of a [tokens, heads, dim] tensor.
std::size_t head_bytes(const TensorView& t, int heads) {
  return static_cast<std::size_t>(heads) * static_cast<std::size_t>(t.dim(2)) * dtype_size(t.dtype);
}

}  // namespace

HeadExchange::HeadExchange(Communicator& group, DeviceOps& ops, GroupRows rows)
    : group_(group), ops_(ops), rows_(std::move(rows)), me_(group.rank()) {
  const auto members = static_cast<std::size_t>(group.size());
  LONGATTN_REQUIRE(rows_.rows.size() == members && rows_.row_begin.size() == members, ErrorCode::internal,
                   "head exchange: {} row counts for a group of {}", rows_.rows.size(), members);
}

HeadExchange::Pieces HeadExchange::pieces(const std::vector<std::size_t>& bytes) const {
  Pieces p{bytes, std::vector<std::size_t>(bytes.size()), 0};
  for (std::size_t j = 0; j < bytes.size(); ++j) {
    p.offsets[j] = p.total;
    p.total += bytes[j];
  }
  return p;
}

void* HeadExchange::staging(int which, std::size_t bytes) {
  auto& buf = staging_[which];
  if (!buf || buf->bytes() < bytes) buf = ops_.allocate(std::max<std::size_t>(bytes, 64));
  return buf->data();
}

void HeadExchange::alltoallv(const void* send, const Pieces& sent, void* recv, const Pieces& received, void* stream) {
  const auto t = Clock::now();
  group_.alltoallv(send, sent.bytes, sent.offsets, recv, received.bytes, received.offsets, stream);
  ms_ += std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  for (std::size_t j = 0; j < sent.bytes.size(); ++j) bytes_sent_ += sent.bytes[j];
}

void HeadExchange::to_heads(const TensorView& seq, const std::vector<partition::HeadRange>& heads, const TensorView& head,
                            void* stream) {
  const auto members = rows_.rows.size();
  const auto me = static_cast<std::size_t>(me_);
  const auto n = static_cast<std::size_t>(rows_.rows[me]);
  const std::size_t seq_row = head_bytes(seq, static_cast<int>(seq.dim(1)));
  const std::size_t mine = head_bytes(seq, heads[me].count);  // one token of the head side
  std::vector<std::size_t> send(members), recv(members);
  for (std::size_t j = 0; j < members; ++j) {
    if (j == me) continue;
    send[j] = n * head_bytes(seq, heads[j].count);
    recv[j] = static_cast<std::size_t>(rows_.rows[j]) * mine;
  }
  const Pieces sent = pieces(send);
  Pieces received = pieces(recv);
  // Received pieces land in place: member j's rows are the group's rows from row_begin[j].
  for (std::size_t j = 0; j < members; ++j) received.offsets[j] = static_cast<std::size_t>(rows_.row_begin[j]) * mine;
  auto* packed = static_cast<char*>(staging(0, sent.total));
  for (std::size_t j = 0; j < members; ++j) {
    const std::size_t width = head_bytes(seq, heads[j].count);
    const char* src = bytes_at(seq, head_bytes(seq, heads[j].begin));
    char* dst = j == me ? bytes_at(head, static_cast<std::size_t>(rows_.row_begin[me]) * mine) : packed + sent.offsets[j];
    ops_.copy_2d(dst, width, src, seq_row, width, n, stream);
  }
  alltoallv(packed, sent, head.data, received, stream);
}

void HeadExchange::to_sequence(const TensorView& head, const std::vector<partition::HeadRange>& heads, const TensorView& seq,
                               void* stream) {
  const auto members = rows_.rows.size();
  const auto me = static_cast<std::size_t>(me_);
  const auto n = static_cast<std::size_t>(rows_.rows[me]);
  const std::size_t seq_row = head_bytes(seq, static_cast<int>(seq.dim(1)));
  const std::size_t mine = head_bytes(head, heads[me].count);
  std::vector<std::size_t> send(members), recv(members);
  for (std::size_t j = 0; j < members; ++j) {
    if (j == me) continue;
    send[j] = static_cast<std::size_t>(rows_.rows[j]) * mine;
    recv[j] = n * head_bytes(seq, heads[j].count);
  }
  Pieces sent = pieces(send);
  // Member j's rows are a contiguous stretch of the head-side tensor: sent from where they lie.
  for (std::size_t j = 0; j < members; ++j) sent.offsets[j] = static_cast<std::size_t>(rows_.row_begin[j]) * mine;
  const Pieces received = pieces(recv);
  auto* unpacked = static_cast<char*>(staging(1, received.total));
  alltoallv(head.data, sent, unpacked, received, stream);
  for (std::size_t j = 0; j < members; ++j) {
    const std::size_t width = head_bytes(seq, heads[j].count);
    const char* src = j == me ? bytes_at(head, static_cast<std::size_t>(rows_.row_begin[me]) * mine) : unpacked + received.offsets[j];
    ops_.copy_2d(bytes_at(seq, head_bytes(seq, heads[j].begin)), seq_row, src, width, width, n, stream);
  }
}

void HeadExchange::to_sequence_summed(const TensorView& head_f32, const std::vector<partition::HeadRange>& heads,
                                      const TensorView& seq_f32, void* stream) {
  const auto members = rows_.rows.size();
  const auto me = static_cast<std::size_t>(me_);
  const auto n = rows_.rows[me];
  const auto d = seq_f32.dim(2);
  const std::size_t seq_row = head_bytes(seq_f32, static_cast<int>(seq_f32.dim(1)));
  const std::size_t mine = head_bytes(head_f32, heads[me].count);
  std::vector<std::size_t> send(members), recv(members);
  for (std::size_t j = 0; j < members; ++j) {
    if (j == me) continue;
    send[j] = static_cast<std::size_t>(rows_.rows[j]) * mine;
    recv[j] = static_cast<std::size_t>(n) * head_bytes(seq_f32, heads[j].count);
  }
  Pieces sent = pieces(send);
  for (std::size_t j = 0; j < members; ++j) sent.offsets[j] = static_cast<std::size_t>(rows_.row_begin[j]) * mine;
  const Pieces received = pieces(recv);
  auto* unpacked = static_cast<char*>(staging(1, received.total));
  alltoallv(head_f32.data, sent, unpacked, received, stream);

  // Heads are written by their first holder and added to by the others; a stretch of heads already
  // written is summed through a contiguous scratch copy (add_into takes dense tensors).
  int widest = 0;
  for (const auto& h : heads) widest = std::max(widest, h.count);
  auto* scratch = static_cast<float*>(staging(2, 2 * static_cast<std::size_t>(n) * head_bytes(seq_f32, widest)));
  std::vector<bool> written(static_cast<std::size_t>(seq_f32.dim(1)), false);
  for (std::size_t j = 0; j < members; ++j) {
    const char* part = j == me ? bytes_at(head_f32, static_cast<std::size_t>(rows_.row_begin[me]) * mine) : unpacked + received.offsets[j];
    const std::size_t part_row = head_bytes(seq_f32, heads[j].count);
    for (int h = heads[j].begin; h < heads[j].begin + heads[j].count;) {
      const bool summing = written[static_cast<std::size_t>(h)];
      int end = h;
      while (end < heads[j].begin + heads[j].count && written[static_cast<std::size_t>(end)] == summing) ++end;
      const std::size_t width = head_bytes(seq_f32, end - h);
      const char* src = part + head_bytes(seq_f32, h - heads[j].begin);
      char* dst = bytes_at(seq_f32, head_bytes(seq_f32, h));
      if (!summing) {
        ops_.copy_2d(dst, seq_row, src, part_row, width, static_cast<std::size_t>(n), stream);
      } else {
        TensorView sum(scratch, DType::f32, {n, end - h, d}, seq_f32.device);
        TensorView add(scratch + sum.numel(), DType::f32, {n, end - h, d}, seq_f32.device);
        ops_.copy_2d(sum.data, width, dst, seq_row, width, static_cast<std::size_t>(n), stream);
        ops_.copy_2d(add.data, width, src, part_row, width, static_cast<std::size_t>(n), stream);
        ops_.add_into(sum, add, stream);
        ops_.copy_2d(dst, seq_row, sum.data, width, width, static_cast<std::size_t>(n), stream);
      }
      for (int k = h; k < end; ++k) written[static_cast<std::size_t>(k)] = true;
      h = end;
    }
  }
}

void HeadExchange::lse_to_heads(const TensorView& lse_seq, const std::vector<partition::HeadRange>& heads,
                                const TensorView& lse_head, void* stream) {
  const auto members = rows_.rows.size();
  const auto me = static_cast<std::size_t>(me_);
  const auto n = static_cast<std::size_t>(rows_.rows[me]);
  const auto mine = static_cast<std::size_t>(heads[me].count);
  std::vector<std::size_t> send(members), recv(members);
  for (std::size_t j = 0; j < members; ++j) {
    if (j == me) continue;
    send[j] = static_cast<std::size_t>(heads[j].count) * n * 4;
    recv[j] = mine * static_cast<std::size_t>(rows_.rows[j]) * 4;
  }
  // The sequence side is [H, n]: a member's heads are a contiguous block of it.
  Pieces sent = pieces(send);
  for (std::size_t j = 0; j < members; ++j) sent.offsets[j] = static_cast<std::size_t>(heads[j].begin) * n * 4;
  const Pieces received = pieces(recv);
  auto* unpacked = static_cast<char*>(staging(1, received.total));
  alltoallv(lse_seq.data, sent, unpacked, received, stream);
  const std::size_t head_row = static_cast<std::size_t>(rows_.total) * 4;
  for (std::size_t j = 0; j < members; ++j) {
    const std::size_t width = static_cast<std::size_t>(rows_.rows[j]) * 4;
    const char* src = j == me ? bytes_at(lse_seq, static_cast<std::size_t>(heads[me].begin) * n * 4) : unpacked + received.offsets[j];
    ops_.copy_2d(bytes_at(lse_head, static_cast<std::size_t>(rows_.row_begin[j]) * 4), head_row, src, width, width, mine, stream);
  }
}

void HeadExchange::lse_to_sequence(const TensorView& lse_head, const std::vector<partition::HeadRange>& heads,
                                   const TensorView& lse_seq, void* stream) {
  const auto members = rows_.rows.size();
  const auto me = static_cast<std::size_t>(me_);
  const auto n = static_cast<std::size_t>(rows_.rows[me]);
  const auto mine = static_cast<std::size_t>(heads[me].count);
  std::vector<std::size_t> send(members), recv(members);
  for (std::size_t j = 0; j < members; ++j) {
    if (j == me) continue;
    send[j] = mine * static_cast<std::size_t>(rows_.rows[j]) * 4;
    recv[j] = static_cast<std::size_t>(heads[j].count) * n * 4;
  }
  const Pieces sent = pieces(send);
  Pieces received = pieces(recv);
  for (std::size_t j = 0; j < members; ++j) received.offsets[j] = static_cast<std::size_t>(heads[j].begin) * n * 4;
  auto* packed = static_cast<char*>(staging(0, sent.total));
  const std::size_t head_row = static_cast<std::size_t>(rows_.total) * 4;
  for (std::size_t j = 0; j < members; ++j) {
    const std::size_t width = static_cast<std::size_t>(rows_.rows[j]) * 4;
    char* dst = j == me ? bytes_at(lse_seq, static_cast<std::size_t>(heads[me].begin) * n * 4) : packed + sent.offsets[j];
    ops_.copy_2d(dst, width, bytes_at(lse_head, static_cast<std::size_t>(rows_.row_begin[j]) * 4), head_row, width, mine, stream);
  }
  alltoallv(packed, sent, lse_seq.data, received, stream);
}

}  // namespace longattn::runtime
