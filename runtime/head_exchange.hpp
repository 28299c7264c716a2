// The all-to-alls of a Ulysses group: they turn [tokens, heads, dim] tensors sharded by sequence
// (member j holds its slice of the group's rows, all heads) into tensors sharded by heads (every
// member holds all the group's rows for its share of the heads), and back. Members' slices are
// consecutive stretches of the group's rows in member order (ShardPlan's two-level plans), so the
// pieces a member receives concatenate into the group's rows without any permutation.
//
// Packing is a strided copy (DeviceOps::copy_2d) on the tensors' device and the exchange is
// Communicator::alltoallv, so the same code runs on host memory over MPI and on GPUs over a
// stream-ordered communicator (NCCL): everything is queued on the caller's stream.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "longattn/communicator.hpp"
#include "longattn/device_ops.hpp"
#include "partition/plan.hpp"

namespace longattn::runtime {

// Which of the group's rows each member holds on the sequence side.
struct GroupRows {
  std::vector<std::int64_t> rows;       // [members]: tokens of member j
  std::vector<std::int64_t> row_begin;  // [members]: where member j's slice starts among the group's rows
  std::int64_t total = 0;               // the group's rows
};

class HeadExchange {
 public:
  // `group`: the members, in member order (rank j of `group` is member j). Both must outlive this.
  HeadExchange(Communicator& group, DeviceOps& ops, GroupRows rows);

  // seq [rows[me], H, D] -> head [total, heads[me].count, D]: member j receives heads[j] of every
  // member's rows. Ranges may overlap (a GQA kv head read by several members is sent to each).
  void to_heads(const TensorView& seq, const std::vector<partition::HeadRange>& heads, const TensorView& head,
                void* stream);
  // head [total, heads[me].count, D] -> seq [rows[me], H, D]; the ranges must not overlap.
  void to_sequence(const TensorView& head, const std::vector<partition::HeadRange>& heads, const TensorView& seq,
                   void* stream);
  // Like to_sequence for fp32 partial sums whose ranges may overlap (the dK/dV of a kv head that
  // several members read): a head held by several members is the sum of their parts.
  void to_sequence_summed(const TensorView& head_f32, const std::vector<partition::HeadRange>& heads,
                          const TensorView& seq_f32, void* stream);
  // lse-shaped fp32 tensors: seq [H, rows[me]] <-> head [heads[me].count, total]; ranges must not overlap.
  void lse_to_heads(const TensorView& lse_seq, const std::vector<partition::HeadRange>& heads, const TensorView& lse_head,
                    void* stream);
  void lse_to_sequence(const TensorView& lse_head, const std::vector<partition::HeadRange>& heads, const TensorView& lse_seq,
                       void* stream);

  // Host time spent in the exchanges and bytes sent to other members since the last reset.
  double exchange_ms() const noexcept { return ms_; }
  std::size_t bytes_sent() const noexcept { return bytes_sent_; }
  void reset_stats() noexcept { ms_ = 0, bytes_sent_ = 0; }

 private:
  struct Pieces {
    std::vector<std::size_t> bytes, offsets;
    std::size_t total = 0;
  };
  Pieces pieces(const std::vector<std::size_t>& bytes) const;
  void* staging(int which, std::size_t bytes);
  void alltoallv(const void* send, const Pieces& sent, void* recv, const Pieces& received, void* stream);

  Communicator& group_;
  DeviceOps& ops_;
  GroupRows rows_;
  int me_;
  std::unique_ptr<DeviceBuffer> staging_[3];  // send, receive, and a scratch block for the sums
  double ms_ = 0;
  std::size_t bytes_sent_ = 0;
};

}  // namespace longattn::runtime
