// The kernel launches a ring step costs (under mpirun -np 1..4), recorded by the counting backend:
// a single-sequence ring runs plain blocks only (never positions), exactly one call per step of the
// shapes the zigzag layout promises; a packed batch of sixteen sequences costs at most one call per
// step, not one per sequence, forward and backward.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <random>

#include "longattn/backend.hpp"
#include "longattn/ring.hpp"
#include "support/counting_backend.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::CountingBackend;
using test::RecordedCall;

// The calls of each step of one forward and one backward.
struct CallsByStep {
  std::vector<std::vector<RecordedCall>> forward, backward;
};

// Runs the ring forward and backward on fresh random shards and splits the recorded calls by step
// (on_step fires after each step).
CallsByStep run_and_record(Communicator& comm, const ShardPlan& plan, bool causal, std::uint64_t seed) {
  constexpr int hq = 4, hkv = 2, d = 16;
  const std::int64_t n = plan.local_tokens(comm.rank());
  std::mt19937_64 rng(seed + static_cast<std::uint64_t>(comm.rank()));
  auto q = test::random_tensor(rng, DType::f32, {n, hq, d}), d_o = test::random_tensor(rng, DType::f32, {n, hq, d});
  auto k = test::random_tensor(rng, DType::f32, {n, hkv, d}), v = test::random_tensor(rng, DType::f32, {n, hkv, d});
  test::HostTensor o(DType::f32, {n, hq, d}), lse(DType::f32, {hq, n}), dq(DType::f32, {n, hq, d}), dk(DType::f32, {n, hkv, d}),
      dv(DType::f32, {n, hkv, d});

  auto backend = std::make_unique<CountingBackend>();
  auto* counting = backend.get();
  CallsByStep out;
  std::size_t taken_forward = 0, taken_backward = 0;
  RingOptions opt;
  opt.causal = causal;
  opt.on_step = [&](const char* phase, int, int) {
    const bool fwd = std::string(phase) == "forward";
    const auto& calls = fwd ? counting->forward_calls : counting->backward_calls;
    auto& taken = fwd ? taken_forward : taken_backward;
    (fwd ? out.forward : out.backward).emplace_back(calls.begin() + static_cast<std::ptrdiff_t>(taken), calls.end());
    taken = calls.size();
  };
  RingAttention ring(comm, plan, opt, std::move(backend));
  ring.forward(q.view, k.view, v.view, o.view, lse.view);
  ring.backward(q.view, k.view, v.view, o.view, lse.view, d_o.view, dq.view, dk.view, dv.view);
  return out;
}

std::string describe(const RecordedCall& c) {
  return fmt::format("{}x{} rows, batch {}, {}{}", c.q_rows, c.k_rows, c.batch, c.causal ? "causal" : "full",
                     c.positions ? ", positions" : "");
}

// One sequence in the zigzag layout: rank r holds chunks r and 2P-1-r (its two runs). The diagonal
// step is causal by index over the whole shard; against an earlier rank's shard every query sees
// that rank's first chunk and nothing of its second; against a later rank's shard only the second
// chunk's queries see keys, all of them. One plain call each, never positions.
TEST(RingCalls, SingleSequenceZigzagRunsOnePlainBlockPerStep) {
  auto comm = make_mpi_world_communicator();
  const int world = comm->size(), rank = comm->rank();
  std::uint64_t seed = test::fresh_seed();
  comm->broadcast(&seed, sizeof seed, 0);
  std::mt19937_64 rng(seed);
  const auto length = static_cast<std::int64_t>(2 * world * (3 + static_cast<int>(rng() % 7)) + 1 + 2 * static_cast<int>(rng() % world));
  const auto plan = ShardPlan::single_sequence(length, Layout::zigzag, world);
  SCOPED_TRACE(fmt::format("{} tokens on {} ranks, rank {}, seed {}", length, world, rank, seed));

  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "full");
    const auto calls = run_and_record(*comm, plan, causal, seed);
    ASSERT_EQ(calls.forward.size(), static_cast<std::size_t>(world));
    ASSERT_EQ(calls.backward.size(), static_cast<std::size_t>(world));
    const auto n = plan.local_tokens(rank);
    for (int step = 0; step < world; ++step) {
      const int src = (rank - step + world) % world;
      RecordedCall want{n, plan.local_tokens(src), 1, causal && step == 0, false};
      if (causal && src < rank) want.k_rows = plan.runs(src).front().count;
      if (causal && src > rank) want.q_rows = plan.runs(rank).back().count;
      for (const auto* phase : {&calls.forward, &calls.backward}) {
        const auto& got = (*phase)[static_cast<std::size_t>(step)];
        ASSERT_EQ(got.size(), 1u) << "step " << step << (phase == &calls.forward ? " forward" : " backward");
        EXPECT_EQ(describe(got.front()), describe(want)) << "step " << step;
      }
    }
  }
}

// Sixteen sequences (an empty one and a one-token one among them) in every layout: at most one
// call per step, forward and backward; and since every layout's steps cut into plain blocks per
// sequence, no call passes positions.
TEST(RingCalls, SixteenSequenceBatchCostsAtMostOneCallPerStep) {
  auto comm = make_mpi_world_communicator();
  const int world = comm->size();
  std::uint64_t seed = test::fresh_seed();
  comm->broadcast(&seed, sizeof seed, 0);
  std::mt19937_64 rng(seed);
  const auto cu = test::random_cu_seqlens(rng, 16, 24 * world);
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped})
    for (bool causal : {false, true}) {
      SCOPED_TRACE(fmt::format("{} {}, {} ranks, rank {}, seed {}", to_string(layout), causal ? "causal" : "full", world,
                               comm->rank(), seed));
      const auto calls = run_and_record(*comm, ShardPlan(cu, layout, world), causal, seed);
      ASSERT_EQ(calls.forward.size(), static_cast<std::size_t>(world));
      for (int step = 0; step < world; ++step) {
        EXPECT_LE(calls.forward[static_cast<std::size_t>(step)].size(), 1u) << "forward step " << step;
        EXPECT_LE(calls.backward[static_cast<std::size_t>(step)].size(), 1u) << "backward step " << step;
        for (const auto& call : calls.forward[static_cast<std::size_t>(step)])
          EXPECT_FALSE(call.positions) << "step " << step << ": " << describe(call);
      }
    }
}

}  // namespace
}  // namespace longattn
