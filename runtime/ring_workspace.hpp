// The bytes of each workspace the ring allocates on a rank, from the shapes alone: what the ring
// allocates (ring_attention.cpp) and what RingAttention::workspace_bytes reports, so a job can
// check a run fits before building it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "longattn/tensor.hpp"

namespace longattn::runtime {

// A rank holding n tokens when the fullest rank holds n_max (a travelling shard must fit the
// largest one). The backward's dK/dV of a key shard travel with it: in f32 the buffer a step
// computes into is the one sent on, so two alternate while the third receives; with a 16-bit
// transport a step computes into one f32 buffer, rounds it into the one 16-bit buffer it sends,
// and receives into another.
struct RingWorkspaceSizes {
  std::size_t kv_shard, kv_grad, kv_grad_transport, q_f32, q_input, rows_f32;
  DType transport;

  RingWorkspaceSizes(std::int64_t n, std::int64_t n_max, int hq, int hkv, int d, DType dtype, DType gradient_transport)
      : transport(gradient_transport) {
    const auto kv_elems = static_cast<std::size_t>(n_max) * static_cast<std::size_t>(hkv) * static_cast<std::size_t>(d);
    const auto q_elems = static_cast<std::size_t>(n) * static_cast<std::size_t>(hq) * static_cast<std::size_t>(d);
    auto at_least = [](std::size_t bytes) { return std::max<std::size_t>(bytes, 64); };
    kv_shard = at_least(2 * kv_elems * dtype_size(dtype));                        // [k | v]
    kv_grad = at_least(2 * kv_elems * 4);                                         // [dk | dv] in f32
    kv_grad_transport = at_least(2 * kv_elems * dtype_size(gradient_transport));  // [dk | dv] as sent
    q_f32 = at_least(q_elems * 4);
    q_input = at_least(q_elems * dtype_size(dtype));
    rows_f32 = at_least(static_cast<std::size_t>(n) * static_cast<std::size_t>(hq) * 4);
  }
  std::size_t gradients() const { return transport == DType::f32 ? 3 * kv_grad : kv_grad + 2 * kv_grad_transport; }
  std::size_t total(bool backward) const {
    const std::size_t forward = 2 * kv_shard + q_f32 + q_input + 2 * rows_f32;
    return backward ? forward + 2 * rows_f32 + q_f32 + gradients() : forward;
  }
};

}  // namespace longattn::runtime
