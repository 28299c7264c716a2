// The ring's device memory on each rank (under mpirun -np 1..4): its workspaces, exactly what
// RingAttention::workspace_bytes says (jobs refuse runs that cannot fit with it), plus the sequence
// offsets of the steps' grouped launches and at most two shards' positions; never every shard's
// positions, nothing that grows with the whole sequence.
#include <gtest/gtest.h>

#include <random>

#include "longattn/backend.hpp"
#include "longattn/ring.hpp"
#include "support/counting_backend.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::CountingBackend;

// A causal varlen batch in the striped layout: every step groups the batch's sequences into one
// launch with offsets of its own, and a step whose shards did not cut into plain blocks would pass
// positions (only ever two shards' worth on the device).
void expect_memory_as_estimated(Communicator& comm, DType gradient_transport) {
  SCOPED_TRACE(std::string("gradient transport ") + to_string(gradient_transport));
  const int world = comm.size(), rank = comm.rank();
  std::uint64_t seed = test::fresh_seed();
  comm.broadcast(&seed, sizeof seed, 0);
  std::mt19937_64 rng(seed);
  std::vector<std::int32_t> cu{0};
  for (int b = 0; b < 3; ++b) cu.push_back(cu.back() + world * 400 + static_cast<std::int32_t>(rng() % 97));
  const ShardPlan plan(cu, Layout::striped, world);
  constexpr int hq = 2, hkv = 1, d = 8;
  const std::int64_t n = plan.local_tokens(rank), n_max = plan.max_local_tokens();

  std::mt19937_64 data_rng(seed + static_cast<std::uint64_t>(rank));
  auto q = test::random_tensor(data_rng, DType::f32, {n, hq, d}), d_o = test::random_tensor(data_rng, DType::f32, {n, hq, d});
  auto k = test::random_tensor(data_rng, DType::f32, {n, hkv, d}), v = test::random_tensor(data_rng, DType::f32, {n, hkv, d});
  test::HostTensor o(DType::f32, {n, hq, d}), lse(DType::f32, {hq, n}), dq(DType::f32, {n, hq, d}), dk(DType::f32, {n, hkv, d}),
      dv(DType::f32, {n, hkv, d});
  auto backend = std::make_unique<CountingBackend>();
  auto* counter = &backend->counter();
  RingOptions opt;
  opt.causal = true;
  opt.gradient_transport = gradient_transport;
  RingAttention ring(comm, plan, opt, std::move(backend));
  ring.forward(q.view, k.view, v.view, o.view, lse.view);
  ring.backward(q.view, k.view, v.view, o.view, lse.view, d_o.view, dq.view, dk.view, dv.view);

  const std::size_t workspaces = RingAttention::workspace_bytes(plan, rank, hq, hkv, d, DType::f32, true, gradient_transport);
  // One grouped launch per step here (ring_calls_test): a query and a key offset array, each with a
  // sequence and up to two fillers per sequence.
  const std::size_t offsets = static_cast<std::size_t>(world) * 2 * (3 * (cu.size() - 1) + 1) * 4;
  const std::size_t positions = 2 * static_cast<std::size_t>(n_max) * 4;
  EXPECT_GE(counter->peak, workspaces) << "workspace_bytes promises more than the ring allocates";
  EXPECT_LE(counter->peak, workspaces + offsets + positions)
      << "beyond its workspaces the ring holds more than launch offsets and two shards' positions (" << n_max
      << " tokens per shard, " << world << " ranks)";
}

TEST(RingMemory, PositionsOfAtMostTwoShardsAndWorkspacesAsEstimated) {
  auto comm = make_mpi_world_communicator();
  expect_memory_as_estimated(*comm, DType::f32);
  expect_memory_as_estimated(*comm, DType::bf16);
}

// The travelling dK/dV: with an f32 transport two alternating f32 buffers and an f32 receive
// buffer; with bf16 one f32 buffer, a bf16 send and a bf16 receive buffer: one f32 [dk | dv] of the
// fullest shard less. The forward holds no gradients.
TEST(RingMemory, Bf16GradientTransportSavesOneF32GradientBuffer) {
  auto comm = make_mpi_world_communicator();
  const ShardPlan plan(std::vector<std::int32_t>{0, 1000 * comm->size() + 7}, Layout::zigzag, comm->size());
  constexpr int hq = 8, hkv = 2, d = 64;
  auto bytes = [&](bool backward, DType transport) {
    return RingAttention::workspace_bytes(plan, comm->rank(), hq, hkv, d, DType::bf16, backward, transport);
  };
  EXPECT_EQ(bytes(true, DType::f32) - bytes(true, DType::bf16), 2 * static_cast<std::size_t>(plan.max_local_tokens()) * hkv * d * 4);
  EXPECT_EQ(bytes(false, DType::f32), bytes(false, DType::bf16));
}

}  // namespace
}  // namespace longattn
