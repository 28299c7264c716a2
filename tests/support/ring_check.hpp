// One distributed-attention check shared by the MPI, in-process (threads) and GPU suites: every
// rank builds the same random global batch, runs the ring (or a ParallelAttention strategy)
// forward and backward on its shard with the given backend, and compares its rows with the
// single-process double-precision reference.
#pragma once

#include <string>
#include <vector>

#include "longattn/communicator.hpp"
#include "longattn/layout.hpp"
#include "longattn/parallel_attention.hpp"
#include "longattn/tensor.hpp"

namespace longattn::test {

struct RingCase {
  Layout layout;
  bool causal;
  std::vector<std::int32_t> cu;  // global batch
  int hq, hkv, d;
  DType dtype;
  DType grad_dtype = DType::f32;  // of dq, dk, dv
};

std::string describe(const RingCase& c);

// Collective over `comm`; records gtest failures (never returns early before a collective).
// `seed` must be the same on every rank. `stream` is the compute stream for GPU backends.
void check_ring_against_reference(Communicator& comm, const RingCase& c, std::uint64_t seed,
                                  const std::string& backend = "cpu", DeviceKind device = DeviceKind::cpu,
                                  void* stream = nullptr);

// A RingCase run through ParallelAttention with this strategy (and Ulysses size, for hybrid).
struct ParallelCase {
  RingCase shape;
  Strategy strategy = Strategy::ring;
  int ulysses_size = 0;
};

std::string describe(const ParallelCase& c);

// As check_ring_against_reference, through ParallelAttention on its shards(). Returns the
// Ulysses size the strategy ran with.
int check_parallel_against_reference(Communicator& comm, const ParallelCase& c, std::uint64_t seed,
                                     const std::string& backend = "cpu", DeviceKind device = DeviceKind::cpu,
                                     void* stream = nullptr);

}  // namespace longattn::test
