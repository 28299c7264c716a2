// Ranks as threads of one process (make_local_communicators): the communicator's semantics, and
// ring attention with P = 1..5 against the reference, without mpirun.
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <thread>

#include "longattn/communicator.hpp"
#include "longattn/config.hpp"
#include "longattn/error.hpp"
#include "longattn/backend.hpp"
#include "longattn/layout.hpp"
#include "longattn/ring.hpp"
#include "support/counting_backend.hpp"
#include "support/delegating_backend.hpp"
#include "support/ring_check.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

// Runs fn(comm) on one thread per rank and joins them.
template <class Fn>
void on_ranks(int ranks, Fn fn) {
  auto comms = make_local_communicators(ranks);
  std::vector<std::thread> threads;
  for (auto& c : comms) threads.emplace_back([&fn, &c] { fn(*c); });
  for (auto& t : threads) t.join();
}

TEST(LocalCommunicator, PointToPointCollectivesAndSplit) {
  on_ranks(4, [](Communicator& c) {
    const int r = c.rank(), p = c.size();
    std::vector<int> out(1000, r), in(1000, -1);
    auto rq = c.irecv(in.data(), in.size() * 4, (r + p - 1) % p, 3);
    auto sq = c.isend(out.data(), out.size() * 4, (r + 1) % p, 3);
    rq->wait();
    sq->wait();
    EXPECT_EQ(in[999], (r + p - 1) % p);
    std::int64_t sum = r;
    c.allreduce(&sum, 1, ReduceType::i64, ReduceOp::sum);
    EXPECT_EQ(sum, 6);
    double mx = r * 1.5;
    c.allreduce(&mx, 1, ReduceType::f64, ReduceOp::max);
    EXPECT_EQ(mx, 4.5);
    int root_value = r == 2 ? 77 : 0;
    c.broadcast(&root_value, 4, 2);
    EXPECT_EQ(root_value, 77);
    auto sub = c.split(r % 2, -r);  // reverse order by key
    EXPECT_EQ(sub->size(), 2);
    EXPECT_EQ(sub->rank(), r < 2 ? 1 : 0);
    std::int64_t s = r;
    sub->allreduce(&s, 1, ReduceType::i64, ReduceOp::sum);
    EXPECT_EQ(s, r % 2 == 0 ? 2 : 4);
    c.barrier();
  });
}

TEST(LocalCommunicator, SizeMismatchAndMissingPeerAreErrors) {
  on_ranks(2, [](Communicator& c) {
    int buf[4] = {1, 2, 3, 4};
    if (c.rank() == 0) {
      EXPECT_THROW(c.isend(buf, 16, 1, 9)->wait(), Error);
    } else {
      EXPECT_THROW(c.irecv(buf, 8, 0, 9)->wait(), Error);
    }
    c.barrier();
  });
  auto comms = make_local_communicators(2);
  comms[0]->set_timeout(std::chrono::seconds(1));
  int x = 0;
  try {
    comms[0]->irecv(&x, 4, 1, 5)->wait();
    FAIL() << "no timeout";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::timeout);
  }
}

// The timeout is a setting of the communicator (no environment juggling around calls): a wait
// gives up after it, a split inherits it, and a limit below one second is refused.
TEST(LocalCommunicator, TimeoutIsASettingThatSplitsInherit) {
  std::mt19937_64 rng(test::fresh_seed());
  const auto limit = std::chrono::seconds(1 + static_cast<int>(rng() % 2));
  auto comms = make_local_communicators(2);
  EXPECT_EQ(comms[0]->timeout(), std::chrono::seconds(env_int("LONGATTN_COMM_TIMEOUT_S")));
  EXPECT_THROW(comms[0]->set_timeout(std::chrono::seconds(0)), Error);
  for (auto& c : comms) c->set_timeout(limit);
  std::unique_ptr<Communicator> halves[2];
  {
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) threads.emplace_back([&, r] { halves[r] = comms[static_cast<std::size_t>(r)]->split(r, 0); });
    for (auto& t : threads) t.join();
  }
  EXPECT_EQ(halves[0]->timeout(), limit);
  int x = 0;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    halves[0]->irecv(&x, 4, 0, 5)->wait();  // nobody sends
    FAIL() << "no timeout";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::timeout);
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(waited, static_cast<double>(limit.count()) - 0.1);
  EXPECT_LT(waited, static_cast<double>(limit.count()) + 5.0) << "the split did not keep the timeout";
}

class LocalRing : public ::testing::TestWithParam<std::tuple<int, Layout>> {};

TEST_P(LocalRing, MatchesReference) {
  const auto [ranks, layout] = GetParam();
  const auto seed = test::fresh_seed();
  on_ranks(ranks, [&](Communicator& c) {
    test::check_ring_against_reference(c, {layout, true, {0, 0, 1, 77, 190}, 4, 2, 32, DType::f32}, seed);
    test::check_ring_against_reference(c, {layout, false, {0, 101}, 2, 1, 64, DType::bf16}, seed + 1);
    // One causal sequence (steps cut into plain blocks): uneven chunks, and one so short that
    // some ranks hold nothing.
    test::check_ring_against_reference(c, {layout, true, {0, 131}, 2, 1, 32, DType::bf16}, seed + 2);
    test::check_ring_against_reference(c, {layout, true, {0, 3}, 2, 2, 16, DType::f32}, seed + 3);
  });
}

INSTANTIATE_TEST_SUITE_P(All, LocalRing,
                         ::testing::Combine(::testing::Values(1, 2, 3, 5),
                                            ::testing::Values(Layout::contiguous, Layout::zigzag, Layout::striped)),
                         [](const auto& param_info) {
                           return std::string(to_string(std::get<1>(param_info.param))) + "_P" +
                                  std::to_string(std::get<0>(param_info.param));
                         });

}  // namespace
}  // namespace longattn

namespace longattn {
namespace {

// Wraps the CPU backend and records, per forward call, whether it was causal and had positions.
class Recording final : public test::DelegatingBackend {
 public:
  Recording() : DelegatingBackend(make_backend("cpu")) {}
  struct Call { bool causal, positions; };
  std::vector<Call> calls;
  void forward(const AttentionArgs& a, const ForwardOutputs& o) override {
    calls.push_back({a.causal, a.q_positions != nullptr});
    inner_->forward(a, o);
  }
};

// Single-sequence causal rings never pass positions: every step is cut into plain blocks
// (partition/step_blocks). Contiguous and zigzag keep one causal call per rank (the diagonal; every
// other step is fully visible blocks), striped steps are all causal by index.
TEST(LocalRing, SingleSequenceStepsReachKernelsWithoutPositions) {
  for (Layout layout : {Layout::contiguous, Layout::zigzag, Layout::striped}) {
    const int ranks = 3;
    const auto plan = ShardPlan::single_sequence(301, layout, ranks);
    std::vector<std::vector<Recording::Call>> calls(ranks);
    on_ranks(ranks, [&](Communicator& c) {
      std::mt19937_64 rng(test::fresh_seed() + c.rank());
      const auto n = plan.local_tokens(c.rank());
      auto q = test::random_tensor(rng, DType::f32, {n, 2, 16});
      auto k = test::random_tensor(rng, DType::f32, {n, 1, 16});
      auto v = test::random_tensor(rng, DType::f32, {n, 1, 16});
      test::HostTensor o(DType::f32, {n, 2, 16}), lse(DType::f32, {2, n});
      auto backend = std::make_unique<Recording>();
      auto* rec = backend.get();
      RingOptions opt;
      opt.causal = true;
      RingAttention ring(c, plan, opt, std::move(backend));
      ring.forward(q.view, k.view, v.view, o.view, lse.view);
      calls[c.rank()] = rec->calls;
    });
    for (int r = 0; r < ranks; ++r) {
      int with_positions = 0, causal = 0;
      for (const auto& call : calls[r]) {
        with_positions += call.positions;
        causal += call.causal;
      }
      EXPECT_EQ(causal, layout == Layout::striped ? ranks : 1) << to_string(layout) << " rank " << r;
      EXPECT_EQ(with_positions, 0) << to_string(layout) << " rank " << r;
    }
  }
}

}  // namespace
}  // namespace longattn

namespace longattn {
namespace {

using test::CountingBackend;

// A rank holds its own shard plus what is in flight, never anything of the full sequence's size:
// with the same tokens per rank, the ring's workspaces are the same on 2 and 4 ranks (so the same
// on a million tokens over many GPUs), within the budget the README documents (two KV shards in
// flight, fp32 output and dQ accumulators, partial outputs, three fp32 [dK|dV] buffers of the
// travelling shards, per-row statistics), and calling it again allocates nothing new.
TEST(LocalRing, WorkspacesDependOnTheShardNotTheSequence) {
  constexpr std::int64_t n = 96, hq = 4, hkv = 2, d = 16;  // tokens per rank
  std::vector<std::size_t> peaks;
  for (int ranks : {2, 4}) {
    const auto plan = ShardPlan::single_sequence(n * ranks, Layout::zigzag, ranks);
    std::vector<std::size_t> peak(static_cast<std::size_t>(ranks)), again(peak.size());
    on_ranks(ranks, [&](Communicator& c) {
      std::mt19937_64 rng(test::fresh_seed() + c.rank());
      ASSERT_EQ(plan.local_tokens(c.rank()), n);
      auto q = test::random_tensor(rng, DType::f32, {n, hq, d}), d_o = test::random_tensor(rng, DType::f32, {n, hq, d});
      auto k = test::random_tensor(rng, DType::f32, {n, hkv, d}), v = test::random_tensor(rng, DType::f32, {n, hkv, d});
      test::HostTensor o(DType::f32, {n, hq, d}), lse(DType::f32, {hq, n}), dq(DType::f32, {n, hq, d}),
          dk(DType::f32, {n, hkv, d}), dv(DType::f32, {n, hkv, d});
      auto backend = std::make_unique<CountingBackend>();
      auto* counter = &backend->counter();
      RingOptions opt;
      opt.causal = true;
      RingAttention ring(c, plan, opt, std::move(backend));
      ring.forward(q.view, k.view, v.view, o.view, lse.view);
      ring.backward(q.view, k.view, v.view, o.view, lse.view, d_o.view, dq.view, dk.view, dv.view);
      peak[static_cast<std::size_t>(c.rank())] = counter->peak;
      const std::size_t live = counter->live;
      ring.forward(q.view, k.view, v.view, o.view, lse.view);
      ring.backward(q.view, k.view, v.view, o.view, lse.view, d_o.view, dq.view, dk.view, dv.view);
      again[static_cast<std::size_t>(c.rank())] = counter->live - live;
    });
    for (int r = 0; r < ranks; ++r) {
      EXPECT_EQ(again[static_cast<std::size_t>(r)], 0u) << "a second call allocated more, rank " << r;
      EXPECT_EQ(peak[static_cast<std::size_t>(r)], peak[0]) << ranks << " ranks, rank " << r;
    }
    peaks.push_back(peak[0]);
  }
  // Per-rank metadata (sequence offsets: a few bytes per rank) may differ; nothing per token may.
  EXPECT_LE(peaks[1] - std::min(peaks[1], peaks[0]), 2 * 64u) << "workspaces grew with the sequence: " << peaks[0] << " -> " << peaks[1];
  const std::size_t q_f32 = n * hq * d * 4, kv_f32 = n * hkv * d * 4, rows = n * hq * 4;
  const std::size_t budget = 2 * (2 * kv_f32)  // two [k|v] shards in flight (fp32 inputs here)
                             + 2 * q_f32       // fp32 output accumulator, partial output
                             + q_f32           // fp32 dQ accumulator
                             + 3 * (2 * kv_f32)  // [dK|dV] buffers: two outgoing, one incoming
                             + 5 * rows          // lse / delta per row: partial, row copies, delta
                             + 4096;             // positions, sequence offsets, rounding
  EXPECT_LE(peaks[0], budget) << "the ring holds more than its shard plus the two in flight";
}

}  // namespace
}  // namespace longattn
