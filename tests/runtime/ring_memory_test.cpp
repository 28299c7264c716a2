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
TEST(RingMemory, PositionsOfAtMostTwoShardsAndWorkspacesAsEstimated) {
  auto comm = make_mpi_world_communicator();
  const int world = comm->size(), rank = comm->rank();
  std::uint64_t seed = test::fresh_seed();
  comm->broadcast(&seed, sizeof seed, 0);
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
  RingAttention ring(*comm, plan, opt, std::move(backend));
  ring.forward(q.view, k.view, v.view, o.view, lse.view);
  ring.backward(q.view, k.view, v.view, o.view, lse.view, d_o.view, dq.view, dk.view, dv.view);

  const std::size_t workspaces = RingAttention::workspace_bytes(plan, rank, hq, hkv, d, DType::f32, true);
  // One grouped launch per step here (ring_calls_test): a query and a key offset array, each with a
  // sequence and up to two fillers per sequence.
  const std::size_t offsets = static_cast<std::size_t>(world) * 2 * (3 * (cu.size() - 1) + 1) * 4;
  const std::size_t positions = 2 * static_cast<std::size_t>(n_max) * 4;
  EXPECT_GE(counter->peak, workspaces) << "workspace_bytes promises more than the ring allocates";
  EXPECT_LE(counter->peak, workspaces + offsets + positions)
      << "beyond its workspaces the ring holds more than launch offsets and two shards' positions (" << n_max
      << " tokens per shard, " << world << " ranks)";
}

}  // namespace
}  // namespace longattn
