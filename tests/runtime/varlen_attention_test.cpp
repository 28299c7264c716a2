// VarlenAttention and VarlenRemap under mpirun against the single-process double-precision
// reference: random length lists with an empty and a one-token sequence and one sequence longer
// than all the others together, each executable balance, causal and full, MHA and GQA, forward and
// backward; the remap's round trips (exact) and remap -> attention -> remap back against the
// reference on the linear layout; bad input refused with one clear error on every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <numeric>

#include <fmt/format.h>

#include "longattn/error.hpp"
#include "longattn/varlen_attention.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

std::uint64_t shared_seed(Communicator& comm) {
  std::uint64_t seed = test::fresh_seed();
  comm.broadcast(&seed, sizeof seed, 0);
  return seed;
}

// Ranks per simulated node for the planner: whole nodes of 2 where the ranks allow.
int gpus_per_node_for(int ranks) { return ranks % 2 == 0 && ranks > 2 ? 2 : ranks; }

// 0- and 1-token sequences, a few short ones, and one longer than all the others together.
std::vector<std::int64_t> random_lengths(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> count(3, 7), length(2, 48), extra(2, 40);
  std::vector<std::int64_t> lengths{0, 1};
  for (int i = count(rng); i > 0; --i) lengths.push_back(length(rng));
  const auto others = std::accumulate(lengths.begin(), lengths.end(), std::int64_t{0});
  // Twice the others, so that under a cap just below its length the others still pack beside it.
  lengths.insert(lengths.begin() + std::uniform_int_distribution<int>(0, static_cast<int>(lengths.size()))(rng), 2 * others + extra(rng));
  return lengths;
}

struct Shape {
  Balance balance;
  bool causal;
  int hq, hkv, d;
  DType dtype;
  std::string machine = "h100";  // the cost model the planner balances with
};

std::string describe(const Shape& s) {
  return fmt::format("{} {} h={}x{} d={} {}", to_string(s.balance), s.causal ? "causal" : "full", s.hq, s.hkv, s.d,
                     to_string(s.dtype));
}

BalanceRequest request_for(const Shape& s, const std::vector<std::int64_t>& lengths, int ranks) {
  BalanceRequest r;
  r.lengths = lengths;
  r.ranks = ranks;
  r.gpus_per_node = gpus_per_node_for(ranks);
  r.q_heads = s.hq;
  r.kv_heads = s.hkv;
  r.head_dim = s.d;
  r.dtype = s.dtype;
  r.causal = s.causal;
  r.balance = s.balance;
  r.machine = s.machine;
  // A cap just below the long sequence's length, so that it must run over a group of ranks.
  if (s.balance == Balance::hierarchical && ranks > 1) r.cap_tokens = *std::max_element(lengths.begin(), lengths.end()) - 1;
  return r;
}

// The whole batch's tensors, the same on every rank, and the reference's results on it.
struct Reference {
  std::vector<std::int32_t> cu;
  HostTensor q, k, v, d_o, o, lse, dq, dk, dv;
  Reference(std::mt19937_64& rng, const Shape& s, const std::vector<std::int32_t>& cu_seqlens) : cu(cu_seqlens) {
    const std::int64_t T = cu.back();
    q = test::random_tensor(rng, s.dtype, {T, s.hq, s.d});
    k = test::random_tensor(rng, s.dtype, {T, s.hkv, s.d});
    v = test::random_tensor(rng, s.dtype, {T, s.hkv, s.d});
    d_o = test::random_tensor(rng, s.dtype, {T, s.hq, s.d});
    o = HostTensor(DType::f32, {T, s.hq, s.d});
    lse = HostTensor(DType::f32, {s.hq, T});
    dq = HostTensor(DType::f32, {T, s.hq, s.d});
    dk = HostTensor(DType::f32, {T, s.hkv, s.d});
    dv = HostTensor(DType::f32, {T, s.hkv, s.d});
    auto ref = make_backend("reference");
    AttentionArgs a;
    a.q = q.view;
    a.k = k.view;
    a.v = v.view;
    a.batch = static_cast<int>(cu.size()) - 1;
    a.cu_seqlens_q = a.cu_seqlens_k = cu.data();
    a.causal = s.causal;
    ref->forward(a, {o.view, lse.view});
    ref->backward(a, {o.view, lse.view, d_o.view, {}, dq.view, dk.view, dv.view, false});
  }
};

// Global rows of a rank's attention layout, in local order.
std::vector<std::int64_t> attention_rows(const BalancedBatch& batch, int rank) {
  std::vector<std::int64_t> rows;
  for (const auto& run : batch.attention_runs(rank))
    for (std::int64_t i = 0; i < run.count; ++i) rows.push_back(batch.cu_seqlens()[static_cast<std::size_t>(run.seq)] + run.first + i * run.stride);
  return rows;
}
std::vector<std::int64_t> linear_rows(const BalancedBatch& batch, int rank) {
  std::vector<std::int64_t> rows(static_cast<std::size_t>(batch.linear_tokens(rank)));
  std::iota(rows.begin(), rows.end(), batch.linear_begin(rank));
  return rows;
}

HostTensor take_rows(const HostTensor& full, const std::vector<std::int64_t>& rows) {
  const auto n = static_cast<std::int64_t>(rows.size());
  HostTensor out(full.view.dtype, {n, full.view.dim(1), full.view.ndim > 2 ? full.view.dim(2) : 1});
  if (full.view.ndim == 2) out.view = TensorView(out.view.data, full.view.dtype, {n, full.view.dim(1)});
  const auto row_bytes = full.view.bytes() / static_cast<std::size_t>(std::max<std::int64_t>(full.view.dim(0), 1));
  for (std::size_t i = 0; i < rows.size(); ++i)
    std::memcpy(static_cast<char*>(out.view.data) + i * row_bytes,
                static_cast<const char*>(full.view.data) + static_cast<std::size_t>(rows[i]) * row_bytes, row_bytes);
  return out;
}

// lse [H, T] columns at `rows`.
std::vector<float> take_lse(const HostTensor& lse, const std::vector<std::int64_t>& rows) {
  const auto all = lse.to_f32();
  const auto H = lse.view.dim(0), T = lse.view.dim(1);
  std::vector<float> out;
  for (std::int64_t h = 0; h < H; ++h)
    for (const auto r : rows) out.push_back(all[static_cast<std::size_t>(h * T + r)]);
  return out;
}

struct Tolerance {
  double forward, backward;
};
Tolerance tolerance(DType t) { return t == DType::f32 ? Tolerance{3e-5, 2e-4} : Tolerance{2e-2, 8e-2}; }

void expect_close(const HostTensor& got, const HostTensor& want, double tol, const char* what) {
  const auto d = test::compare(got.to_f32(), want.to_f32());
  EXPECT_LE(d.max_abs, tol * std::max(1.0, d.max_ref)) << what;
}

// The executor on the attention layout against the reference, forward and backward.
// Returns the number of hybrid groups the plan ran.
int check_attention(Communicator& comm, const Shape& s, std::uint64_t seed, std::vector<std::int64_t> lengths = {}) {
  std::mt19937_64 rng(seed);
  if (lengths.empty()) lengths = random_lengths(rng);
  SCOPED_TRACE(fmt::format("{} lengths {} seed {} rank {}/{}", describe(s), fmt::join(lengths, ","), seed, comm.rank(), comm.size()));
  const BalancedBatch batch(request_for(s, lengths, comm.size()));
  int hybrid = 0;
  for (const auto& g : batch.groups()) hybrid += g.sharding == "hybrid";
  Reference ref(rng, s, batch.cu_seqlens());
  VarlenAttention attention(comm, batch, {}, make_backend("cpu"));
  const auto rows = attention_rows(batch, comm.rank());
  const auto n = static_cast<std::int64_t>(rows.size());
  auto q = take_rows(ref.q, rows), k = take_rows(ref.k, rows), v = take_rows(ref.v, rows), d_o = take_rows(ref.d_o, rows);
  auto o = test::poisoned_tensor(s.dtype, {n, s.hq, s.d});
  HostTensor lse = test::poisoned_tensor(DType::f32, {s.hq, n});
  lse.view = TensorView(lse.view.data, DType::f32, {s.hq, n});
  attention.forward(q.view, k.view, v.view, o.view, lse.view);
  const auto tol = tolerance(s.dtype);
  expect_close(o, take_rows(ref.o, rows), tol.forward, "o");
  EXPECT_LE(test::compare(lse.to_f32(), take_lse(ref.lse, rows)).max_abs, tol.forward * 10) << "lse";

  auto dq = test::poisoned_tensor(DType::f32, {n, s.hq, s.d}), dk = test::poisoned_tensor(DType::f32, {n, s.hkv, s.d}),
       dv = test::poisoned_tensor(DType::f32, {n, s.hkv, s.d});
  attention.backward(q.view, k.view, v.view, o.view, lse.view, d_o.view, dq.view, dk.view, dv.view);
  expect_close(dq, take_rows(ref.dq, rows), tol.backward, "dq");
  expect_close(dk, take_rows(ref.dk, rows), tol.backward, "dk");
  expect_close(dv, take_rows(ref.dv, rows), tol.backward, "dv");
  return hybrid;
}

const Balance kExecutable[] = {Balance::hierarchical, Balance::per_sequence_zigzag, Balance::whole_sequences};

TEST(VarlenAttention, EveryExecutableBalanceMatchesTheReference) {
  auto comm = make_mpi_world_communicator();
  for (const Balance balance : kExecutable)
    for (const bool causal : {true, false})
      for (const auto& [hq, hkv] : {std::pair{4, 4}, std::pair{4, 2}, std::pair{4, 1}})
        check_attention(*comm, {balance, causal, hq, hkv, 16, DType::f32}, shared_seed(*comm));
}

TEST(VarlenAttention, Bf16Inputs) {
  auto comm = make_mpi_world_communicator();
  for (const Balance balance : kExecutable) check_attention(*comm, {balance, true, 4, 2, 32, DType::bf16}, shared_seed(*comm));
}

// Groups that run the Ulysses x ring hybrid: the H200 model with 8 query heads picks it for the long
// sequence of this batch on 2 nodes of 2 ranks (checked there), and for random batches where it will.
TEST(VarlenAttention, HybridGroupsMatchTheReference) {
  auto comm = make_mpi_world_communicator();
  const std::vector<std::int64_t> known{0, 1, 40, 1100, 110, 8, 250, 2, 90, 150, 5, 380};
  for (const bool causal : {true, false}) {
    const Shape s{Balance::hierarchical, causal, 8, 2, 8, DType::f32, "h200"};
    const int hybrid = check_attention(*comm, s, shared_seed(*comm), known);
    if (comm->size() == 4) {
      EXPECT_GE(hybrid, 1) << "the known batch no longer runs a hybrid group on 4 ranks";
    }
    check_attention(*comm, s, shared_seed(*comm));
  }
}

// A batch whose long sequence cannot sit on one rank under the cap runs over a group of ranks: the
// case the communication paths (ring or hybrid) exist for, so it must be in the sweep above.
TEST(VarlenAttention, TheCapSplitsTheLongSequence) {
  auto comm = make_mpi_world_communicator();
  if (comm->size() == 1) GTEST_SKIP() << "one rank has no group to split over";
  std::mt19937_64 rng(shared_seed(*comm));
  const auto lengths = random_lengths(rng);
  const BalancedBatch batch(request_for({Balance::hierarchical, true, 4, 4, 16, DType::f32}, lengths, comm->size()));
  const auto longest = std::max_element(lengths.begin(), lengths.end()) - lengths.begin();
  bool split = false;
  for (const auto& g : batch.groups())
    if (std::find(g.sequences.begin(), g.sequences.end(), longest) != g.sequences.end()) split = g.size > 1;
  EXPECT_TRUE(split) << fmt::format("lengths {}", fmt::join(lengths, ","));
}

// Every pair the mask allows is some rank's work exactly once: the ranks' FLOPs add up to the batch's.
TEST(VarlenAttention, RankFlopsAddUpToTheBatch) {
  auto comm = make_mpi_world_communicator();
  std::mt19937_64 rng(shared_seed(*comm));
  const auto lengths = random_lengths(rng);
  for (const Balance balance : {Balance::hierarchical, Balance::per_sequence_zigzag, Balance::whole_sequences, Balance::flat_minheap})
    for (const bool causal : {true, false})
      for (const int ranks : {1, 2, 4, 8}) {
        auto request = request_for({balance, causal, 8, 2, 16, DType::f32}, lengths, ranks);
        request.machine = "h200";  // where groups of several ranks run the hybrid
        request.chunk_tokens = 5;
        const BalancedBatch batch(request);
        double want = 0, got = 0;
        for (const auto l : lengths) want += causal ? l * (l + 1) / 2.0 : static_cast<double>(l) * l;
        want *= 4.0 * 16 * 8;
        for (int r = 0; r < ranks; ++r) got += batch.attention_flops(r);
        EXPECT_NEAR(got, want, want * 1e-12) << fmt::format("{} {} on {} ranks, lengths {}", to_string(balance),
                                                             causal ? "causal" : "full", ranks, fmt::join(lengths, ","));
      }
}

// ---- the remap --------------------------------------------------------------------------------

// A random [rows, width] tensor of global rows (the same on every rank).
HostTensor random_rows(std::mt19937_64& rng, std::int64_t rows, int width, DType t) {
  auto h = test::random_tensor(rng, t, {rows, width});
  return h;
}

TEST(VarlenRemap, RoundTripsAreTheIdentityForAnyRowWidth) {
  auto comm = make_mpi_world_communicator();
  for (const Balance balance : {Balance::hierarchical, Balance::per_sequence_zigzag, Balance::whole_sequences, Balance::flat_minheap})
    for (const auto& [width, dtype] : {std::pair{3, DType::f32}, std::pair{5, DType::bf16}}) {
      const auto seed = shared_seed(*comm);
      std::mt19937_64 rng(seed);
      const auto lengths = random_lengths(rng);
      SCOPED_TRACE(fmt::format("{} width {} lengths {} seed {}", to_string(balance), width, fmt::join(lengths, ","), seed));
      auto request = request_for({balance, true, 4, 4, 16, DType::f32}, lengths, comm->size());
      request.chunk_tokens = 7;
      const BalancedBatch batch(request);
      VarlenRemap remap(*comm, batch, device_ops_for(DeviceKind::cpu));
      const auto global = random_rows(rng, batch.total_tokens(), width, dtype);
      const auto mine_linear = linear_rows(batch, comm->rank()), mine_attention = attention_rows(batch, comm->rank());
      const auto n_lin = static_cast<std::int64_t>(mine_linear.size()), n_att = static_cast<std::int64_t>(mine_attention.size());
      const auto exact = [](const HostTensor& a, const HostTensor& b) {
        return a.view.bytes() == b.view.bytes() && std::memcmp(a.view.data, b.view.data, a.view.bytes()) == 0;
      };
      // Forward: activations from the linear layout to the attention layout and back.
      const auto linear = take_rows(global, mine_linear);
      auto attention = test::poisoned_tensor(dtype, {n_att, width});
      remap.to_attention(linear.view, attention.view);
      EXPECT_TRUE(exact(attention, take_rows(global, mine_attention))) << "to_attention";
      auto back = test::poisoned_tensor(dtype, {n_lin, width});
      remap.to_linear(attention.view, back.view);
      EXPECT_TRUE(exact(back, linear)) << "round trip from the linear layout";
      // Backward: gradients from the attention layout to the linear layout and back.
      const auto grads = random_rows(rng, batch.total_tokens(), width, dtype);
      const auto grad_attention = take_rows(grads, mine_attention);
      auto grad_linear = test::poisoned_tensor(dtype, {n_lin, width});
      remap.to_linear(grad_attention.view, grad_linear.view);
      EXPECT_TRUE(exact(grad_linear, take_rows(grads, mine_linear))) << "to_linear";
      auto grad_back = test::poisoned_tensor(dtype, {n_att, width});
      remap.to_attention(grad_linear.view, grad_back.view);
      EXPECT_TRUE(exact(grad_back, grad_attention)) << "round trip from the attention layout";
    }
}

// What a trainer does: remap q, k, v to attention, attend, remap o back; and in the backward dO in,
// dq, dk, dv back. The linear-layout results equal the reference's rows of the linear slice.
TEST(VarlenRemap, RemapAttentionRemapBackMatchesTheReferenceOnTheLinearLayout) {
  auto comm = make_mpi_world_communicator();
  for (const Balance balance : kExecutable) {
    const Shape s{balance, true, 4, 2, 16, DType::f32};
    const auto seed = shared_seed(*comm);
    std::mt19937_64 rng(seed);
    const auto lengths = random_lengths(rng);
    SCOPED_TRACE(fmt::format("{} lengths {} seed {}", describe(s), fmt::join(lengths, ","), seed));
    const BalancedBatch batch(request_for(s, lengths, comm->size()));
    Reference ref(rng, s, batch.cu_seqlens());
    auto& ops = device_ops_for(DeviceKind::cpu);
    VarlenRemap remap(*comm, batch, ops);
    VarlenAttention attention(*comm, batch, {}, make_backend("cpu"));
    const auto lin = linear_rows(batch, comm->rank());
    const auto n = batch.attention_tokens(comm->rank());
    const auto n_lin = static_cast<std::int64_t>(lin.size());
    auto to_attention = [&](const HostTensor& linear, int heads) {
      HostTensor out = test::poisoned_tensor(linear.view.dtype, {n, heads, s.d});
      remap.to_attention(linear.view, out.view);
      return out;
    };
    auto to_linear = [&](const HostTensor& att, int heads) {
      HostTensor out = test::poisoned_tensor(att.view.dtype, {n_lin, heads, s.d});
      remap.to_linear(att.view, out.view);
      return out;
    };
    auto q = to_attention(take_rows(ref.q, lin), s.hq), k = to_attention(take_rows(ref.k, lin), s.hkv),
         v = to_attention(take_rows(ref.v, lin), s.hkv), d_o = to_attention(take_rows(ref.d_o, lin), s.hq);
    HostTensor o(DType::f32, {n, s.hq, s.d}), lse(DType::f32, {s.hq, n});
    lse.view = TensorView(lse.view.data, DType::f32, {s.hq, n});
    attention.forward(q.view, k.view, v.view, o.view, lse.view);
    expect_close(to_linear(o, s.hq), take_rows(ref.o, lin), 3e-5, "o on the linear layout");
    HostTensor dq(DType::f32, {n, s.hq, s.d}), dk(DType::f32, {n, s.hkv, s.d}), dv(DType::f32, {n, s.hkv, s.d});
    attention.backward(q.view, k.view, v.view, o.view, lse.view, d_o.view, dq.view, dk.view, dv.view);
    expect_close(to_linear(dq, s.hq), take_rows(ref.dq, lin), 2e-4, "dq on the linear layout");
    expect_close(to_linear(dk, s.hkv), take_rows(ref.dk, lin), 2e-4, "dk on the linear layout");
    expect_close(to_linear(dv, s.hkv), take_rows(ref.dv, lin), 2e-4, "dv on the linear layout");
  }
}

// ---- bad input --------------------------------------------------------------------------------

// `make` throws Error(invalid_argument) on this rank with a message containing `hint`.
template <class F>
void expect_refused(F make, const std::string& hint) {
  try {
    make();
    ADD_FAILURE() << "accepted; expected an error mentioning '" << hint << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find(hint), std::string::npos) << e.what();
  }
}

TEST(VarlenAttention, BadBatchesAreRefusedOnEveryRankBeforeAnythingRuns) {
  auto comm = make_mpi_world_communicator();
  const int P = comm->size();
  std::mt19937_64 rng(shared_seed(*comm));
  const Shape s{Balance::hierarchical, true, 4, 2, 16, DType::f32};
  auto lengths = random_lengths(rng);
  auto request = request_for(s, lengths, P);

  auto negative = request;
  negative.lengths[2] = -3;
  expect_refused([&] { BalancedBatch b(negative); }, "negative length");
  auto overflow = request;
  overflow.lengths.push_back(std::numeric_limits<std::int32_t>::max());
  expect_refused([&] { BalancedBatch b(overflow); }, "overflows int32");
  expect_refused([&] { lengths_from_cu_seqlens({0, 5, 3, 9}); }, "must not decrease");
  auto too_long = request;
  too_long.cap_tokens = 8;
  too_long.lengths.push_back(8 * P * 2 + 1);
  expect_refused([&] { BalancedBatch b(too_long); }, "raise the cap or add ranks");
  auto flat = request;
  flat.balance = Balance::flat_minheap;
  flat.cap_tokens = 0;
  const BalancedBatch flat_batch(flat);
  expect_refused([&] { VarlenAttention a(*comm, flat_batch, {}, make_backend("cpu")); }, "longattn-bench balance");

  // Tensors whose rows do not match the plan's on one rank only: every rank refuses, no rank hangs.
  const BalancedBatch batch(request);
  VarlenAttention attention(*comm, batch, {}, make_backend("cpu"));
  const auto n = batch.attention_tokens(comm->rank()) + (comm->rank() == P - 1 ? 1 : 0);
  auto q = test::random_tensor(rng, DType::f32, {n, 4, 16}), k = test::random_tensor(rng, DType::f32, {n, 2, 16}),
       v = test::random_tensor(rng, DType::f32, {n, 2, 16});
  HostTensor o(DType::f32, {n, 4, 16}), lse(DType::f32, {4, n});
  lse.view = TensorView(lse.view.data, DType::f32, {4, n});
  expect_refused([&] { attention.forward(q.view, k.view, v.view, o.view, lse.view); }, "attention_runs");
  // And the remap with a linear tensor of the wrong rows.
  VarlenRemap remap(*comm, batch, device_ops_for(DeviceKind::cpu));
  auto linear = test::random_tensor(rng, DType::f32, {batch.linear_tokens(comm->rank()) + (comm->rank() == 0 ? 2 : 0), 3});
  auto att = HostTensor(DType::f32, {batch.attention_tokens(comm->rank()), 3});
  expect_refused([&] { remap.to_attention(linear.view, att.view); }, "rows on this rank");
}

}  // namespace
}  // namespace longattn
