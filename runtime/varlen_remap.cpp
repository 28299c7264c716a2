// The remap between a balanced batch's two layouts (varlen_attention.hpp). Both are lists of
// global row ranges per rank: the linear layout one contiguous slice, the attention layout the
// plan's runs (every sharding here keeps a run's tokens consecutive in the batch). What rank a
// sends rank b is the intersection of a's ranges in the source layout with b's in the destination,
// in b's local order; so one side packs its pieces in that order, one alltoallv moves them, and the
// other side unpacks them in the same order. The map is built once from the plan; the way back is
// the same exchange with the roles of packing and unpacking swapped.
#include <algorithm>

#include "common/check.hpp"
#include "runtime/varlen_batch.hpp"

namespace longattn {

namespace {

// Consecutive local rows of one tensor: [row, row + count).
struct Piece {
  std::int64_t row = 0, count = 0;
};

void append(std::vector<Piece>& pieces, std::int64_t row, std::int64_t count) {
  if (count <= 0) return;
  if (!pieces.empty() && pieces.back().row + pieces.back().count == row)
    pieces.back().count += count;
  else
    pieces.push_back({row, count});
}

// A rank's attention layout as global ranges: (global first row, local row, count).
struct Range {
  std::int64_t global = 0, row = 0, count = 0;
};

std::vector<Range> attention_ranges(const BalancedBatch& batch, int rank) {
  std::vector<Range> out;
  const auto& cu = batch.cu_seqlens();
  for (const auto& run : batch.attention_runs(rank)) {
    LONGATTN_REQUIRE(run.stride == 1 || run.count <= 1, ErrorCode::internal,
                     "the remap expects consecutive tokens per run, got stride {}", run.stride);
    out.push_back({cu[static_cast<std::size_t>(run.seq)] + run.first, run.row, run.count});
  }
  return out;
}

}  // namespace

struct VarlenRemap::Impl {
  Communicator& comm;
  BalancedBatch batch;
  DeviceOps& ops;
  // To the attention layout: linear rows to pack for each destination, attention rows to fill
  // from each source, both in the destination's local order.
  std::vector<std::vector<Piece>> linear_pieces, attention_pieces;
  std::vector<std::int64_t> linear_rows_to, attention_rows_from;  // per peer
  std::unique_ptr<DeviceBuffer> send_buffer, recv_buffer;
  std::size_t bytes_sent = 0;

  Impl(Communicator& c, const BalancedBatch& b, DeviceOps& o) : comm(c), batch(b), ops(o) {
    const int P = batch.ranks();
    LONGATTN_INVALID(comm.size() == P, "the batch was planned for {} ranks but the communicator has {}: plan it for {}", P,
                     comm.size(), comm.size());
    const int me = comm.rank();
    linear_pieces.resize(static_cast<std::size_t>(P));
    attention_pieces.resize(static_cast<std::size_t>(P));
    linear_rows_to.assign(static_cast<std::size_t>(P), 0);
    attention_rows_from.assign(static_cast<std::size_t>(P), 0);
    const std::int64_t my_begin = batch.linear_begin(me), my_end = batch.linear_begin(me + 1);
    for (int p = 0; p < P; ++p)
      for (const auto& r : attention_ranges(batch, p)) {
        const auto lo = std::max(r.global, my_begin), hi = std::min(r.global + r.count, my_end);
        append(linear_pieces[static_cast<std::size_t>(p)], lo - my_begin, hi - lo);
        linear_rows_to[static_cast<std::size_t>(p)] += std::max<std::int64_t>(hi - lo, 0);
      }
    for (const auto& r : attention_ranges(batch, me)) {
      // Split by the linear slices it overlaps, in order.
      std::int64_t g = r.global;
      while (g < r.global + r.count) {
        int src = owner_of(g);
        const auto end = std::min(r.global + r.count, batch.linear_begin(src + 1));
        append(attention_pieces[static_cast<std::size_t>(src)], r.row + (g - r.global), end - g);
        attention_rows_from[static_cast<std::size_t>(src)] += end - g;
        g = end;
      }
    }
  }

  // The rank whose linear slice holds global row g.
  int owner_of(std::int64_t g) const {
    int lo = 0, hi = batch.ranks() - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (batch.linear_begin(mid) <= g) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  static std::string shape_problem(const TensorView& t, const char* name, std::int64_t rows) {
    if (t.ndim >= 1 && t.dim(0) == rows && t.is_contiguous() && (t.data != nullptr || t.numel() == 0)) return {};
    return fmt::format("{} must be a contiguous tensor of {} rows on this rank, got {}", name, rows, t.describe());
  }

  // Moves rows of `from` (packed by `pack`, `pack_rows` per destination) into `to` (unpacked by
  // `unpack`, `unpack_rows` per source).
  void exchange(const TensorView& from, const char* from_name, std::int64_t from_rows, const std::vector<std::vector<Piece>>& pack,
                const std::vector<std::int64_t>& pack_rows, const TensorView& to, const char* to_name, std::int64_t to_rows,
                const std::vector<std::vector<Piece>>& unpack, const std::vector<std::int64_t>& unpack_rows, void* stream) {
    std::string problem = shape_problem(from, from_name, from_rows);
    if (problem.empty()) problem = shape_problem(to, to_name, to_rows);
    const auto width = [](const TensorView& t) { return t.numel() / std::max<std::int64_t>(t.dim(0), 1); };
    if (problem.empty() && (from.dtype != to.dtype || (from_rows && to_rows && width(from) != width(to))))
      problem = fmt::format("{} and {} must have one dtype and row width, got {} and {}", from_name, to_name, from.describe(),
                            to.describe());
    refuse_on_every_rank_if_any(comm, problem);
    // Row width agreed on by every rank (a rank with no rows cannot tell it from its own tensors).
    std::int64_t row_elems = from_rows ? width(from) : to_rows ? width(to) : 0;
    comm.allreduce(&row_elems, 1, ReduceType::i64, ReduceOp::max);
    const std::size_t row_bytes = static_cast<std::size_t>(row_elems) * dtype_size(from.dtype);

    const auto P = static_cast<std::size_t>(comm.size());
    std::vector<std::size_t> send_bytes(P), send_offsets(P), recv_bytes(P), recv_offsets(P);
    std::size_t send_total = 0, recv_total = 0;
    for (std::size_t p = 0; p < P; ++p) {
      send_offsets[p] = send_total;
      send_bytes[p] = static_cast<std::size_t>(pack_rows[p]) * row_bytes;
      send_total += send_bytes[p];
      recv_offsets[p] = recv_total;
      recv_bytes[p] = static_cast<std::size_t>(unpack_rows[p]) * row_bytes;
      recv_total += recv_bytes[p];
    }
    if (!send_buffer || send_buffer->bytes() < send_total) send_buffer = ops.allocate(std::max<std::size_t>(send_total, 64));
    if (!recv_buffer || recv_buffer->bytes() < recv_total) recv_buffer = ops.allocate(std::max<std::size_t>(recv_total, 64));
    char* send = static_cast<char*>(send_buffer->data());
    char* recv = static_cast<char*>(recv_buffer->data());
    const auto* src = static_cast<const char*>(from.data);
    auto* dst = static_cast<char*>(to.data);
    for (std::size_t p = 0; p < P; ++p) {
      std::size_t at = send_offsets[p];
      for (const auto& piece : pack[p]) {
        const auto bytes = static_cast<std::size_t>(piece.count) * row_bytes;
        ops.copy_bytes(send + at, src + static_cast<std::size_t>(piece.row) * row_bytes, bytes, stream);
        at += bytes;
      }
    }
    comm.alltoallv(send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets, stream);
    for (std::size_t p = 0; p < P; ++p) {
      std::size_t at = recv_offsets[p];
      for (const auto& piece : unpack[p]) {
        const auto bytes = static_cast<std::size_t>(piece.count) * row_bytes;
        ops.copy_bytes(dst + static_cast<std::size_t>(piece.row) * row_bytes, recv + at, bytes, stream);
        at += bytes;
      }
    }
    ops.synchronize(stream);
    bytes_sent = send_total - send_bytes[static_cast<std::size_t>(comm.rank())];
  }
};

VarlenRemap::VarlenRemap(Communicator& comm, const BalancedBatch& batch, DeviceOps& ops)
    : impl_(std::make_unique<Impl>(comm, batch, ops)) {}
VarlenRemap::~VarlenRemap() = default;

void VarlenRemap::to_attention(const TensorView& linear, const TensorView& attention, void* stream) {
  auto& m = *impl_;
  const int me = m.comm.rank();
  m.exchange(linear, "the linear-layout tensor", m.batch.linear_tokens(me), m.linear_pieces, m.linear_rows_to, attention,
             "the attention-layout tensor", m.batch.attention_tokens(me), m.attention_pieces, m.attention_rows_from, stream);
}

void VarlenRemap::to_linear(const TensorView& attention, const TensorView& linear, void* stream) {
  auto& m = *impl_;
  const int me = m.comm.rank();
  m.exchange(attention, "the attention-layout tensor", m.batch.attention_tokens(me), m.attention_pieces, m.attention_rows_from,
             linear, "the linear-layout tensor", m.batch.linear_tokens(me), m.linear_pieces, m.linear_rows_to, stream);
}

std::size_t VarlenRemap::last_bytes_sent() const noexcept { return impl_->bytes_sent; }

}  // namespace longattn
