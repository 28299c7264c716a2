// The C API's balanced variable-length path under mpirun against the double-precision reference on
// the whole batch: every rank starts from its slice of the linear layout, remaps q, k, v to the
// attention layout, attends forward and backward there, and remaps o, dq, dk, dv back; its slice
// must match the reference's rows. Also: the attention layout's index map says exactly which rows
// the remap delivered, a remap round trip is the identity for any row width, and refusals (bad
// parameters, a wrong tensor on one rank) are one status and message on every rank.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "longattn/backend.hpp"
#include "longattn/longattn.h"
#include "capi/capi_session.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

using capi_test::desc;
using capi_test::kCpu;
using capi_test::Session;


// Rows [begin, begin + count) of a [T, H, D] tensor, as a tensor of their own.
HostTensor rows_of(const HostTensor& whole, std::int64_t begin, std::int64_t count) {
  HostTensor out(whole.view.dtype, {count, whole.view.dim(1), whole.view.dim(2)});
  const std::size_t row_bytes = static_cast<std::size_t>(whole.view.dim(1) * whole.view.dim(2)) * dtype_size(whole.view.dtype);
  if (count) std::memcpy(out.view.data, static_cast<const char*>(whole.view.data) + static_cast<std::size_t>(begin) * row_bytes,
                         static_cast<std::size_t>(count) * row_bytes);
  return out;
}

struct Case {
  longattn_balance balance;
  bool causal;
  int hq, hkv;
  int gpus_per_node;  // 0: the communicator's topology
  bool capped;        // a cap that forces the longest sequence over several ranks
};

std::string describe(const Case& c) {
  return fmt::format("balance {} {} h={}x{} gpus_per_node {} {}", static_cast<int>(c.balance), c.causal ? "causal" : "full",
                     c.hq, c.hkv, c.gpus_per_node, c.capped ? "capped" : "no cap");
}

longattn_varlen_params params_for(const Case& c, const std::vector<std::int32_t>& cu, int D) {
  longattn_varlen_params p;
  longattn_varlen_params_init(&p);
  p.cu_seqlens = cu.data();
  p.batch = static_cast<int>(cu.size()) - 1;
  p.q_heads = c.hq;
  p.kv_heads = c.hkv;
  p.head_dim = D;
  p.dtype = LONGATTN_DTYPE_F32;
  p.causal = c.causal;
  p.balance = c.balance;
  p.gpus_per_node = c.gpus_per_node;
  return p;
}

// `cu`: the batch's prefix sums; empty: short sequences and a long one, so the hierarchical
// planner has a sequence worth splitting.
void check_case(Session& s, const Case& c, std::uint64_t seed, std::vector<std::int32_t> cu = {}) {
  SCOPED_TRACE(describe(c) + fmt::format(" seed {} rank {}/{}", seed, s.rank, s.size));
  std::mt19937_64 rng(seed);
  if (cu.empty()) {
    cu = test::random_cu_seqlens(rng, 5, 23);
    cu.push_back(cu.back() + 40 * s.size + static_cast<std::int32_t>(rng() % 17));
  }
  const std::int64_t T = cu.back();
  const int D = 16;
  auto q = test::random_tensor(rng, DType::f32, {T, c.hq, D});
  auto k = test::random_tensor(rng, DType::f32, {T, c.hkv, D});
  auto v = test::random_tensor(rng, DType::f32, {T, c.hkv, D});
  auto d_o = test::random_tensor(rng, DType::f32, {T, c.hq, D});

  auto reference = capi_test::whole_batch_reference(q, k, v, d_o, cu, c.causal);
  auto &ro = reference.o, &rdq = reference.dq, &rdk = reference.dk, &rdv = reference.dv;

  auto p = params_for(c, cu, D);
  if (c.capped) p.cap_tokens = (T + s.size - 1) / s.size + 8;
  longattn_varlen* h = nullptr;
  ASSERT_EQ(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_OK) << longattn_last_error();
  longattn_varlen_info info{};
  ASSERT_EQ(longattn_varlen_get_info(h, &info), LONGATTN_OK);
  EXPECT_EQ(info.total_tokens, T);
  EXPECT_GE(info.modelled_imbalance, 0.999);  // slowest over mean, up to rounding
  EXPECT_GE(info.groups, 1);
  if (c.capped) {
    EXPECT_LE(info.attention_tokens, p.cap_tokens);
  }
  // The linear slices tile the batch in rank order; the attention layouts hold every row once.
  std::int64_t next = 0, attention_total = 0;
  for (int r = 0; r < s.size; ++r) {
    std::int64_t begin = -1, tokens = -1, held = -1;
    ASSERT_EQ(longattn_varlen_linear_rows(h, r, &begin, &tokens), LONGATTN_OK);
    EXPECT_EQ(begin, next);
    next += tokens;
    ASSERT_EQ(longattn_varlen_attention_index(h, r, &held, nullptr, nullptr, 0), LONGATTN_OK);
    attention_total += held;
  }
  EXPECT_EQ(next, T);
  EXPECT_EQ(attention_total, T);
  const std::int64_t L = info.linear_tokens, n = info.attention_tokens;
  std::vector<std::int64_t> index(static_cast<std::size_t>(n));
  std::vector<std::int32_t> positions(static_cast<std::size_t>(n));
  ASSERT_EQ(longattn_varlen_attention_index(h, s.rank, nullptr, index.data(), positions.data(), n), LONGATTN_OK);

  // Forward: linear slices -> attention layout -> attention -> o back to the linear layout.
  auto lq = rows_of(q, info.linear_begin, L), lk = rows_of(k, info.linear_begin, L), lv = rows_of(v, info.linear_begin, L);
  auto aq = test::poisoned_tensor(DType::f32, {n, c.hq, D});
  auto ak = test::poisoned_tensor(DType::f32, {n, c.hkv, D}), av = test::poisoned_tensor(DType::f32, {n, c.hkv, D});
  for (auto [from, to] : {std::pair{&lq, &aq}, {&lk, &ak}, {&lv, &av}}) {
    const auto f = desc(*from), t = desc(*to);
    ASSERT_EQ(longattn_varlen_to_attention(h, &f, &t, nullptr), LONGATTN_OK) << longattn_last_error();
  }
  // The remap delivered exactly the rows the index map names, with positions inside their sequences.
  for (std::int64_t i = 0; i < n; ++i) {
    const auto g = index[static_cast<std::size_t>(i)];
    const auto a = rows_of(aq, i, 1).to_f32(), w = rows_of(q, g, 1).to_f32();
    ASSERT_EQ(a, w) << "attention row " << i << " (global " << g << ")";
    const auto seq = std::upper_bound(cu.begin(), cu.end(), static_cast<std::int32_t>(g)) - cu.begin() - 1;
    EXPECT_EQ(positions[static_cast<std::size_t>(i)], g - cu[static_cast<std::size_t>(seq)]);
  }
  auto o = test::poisoned_tensor(DType::f32, {n, c.hq, D});
  auto lse = test::poisoned_tensor(DType::f32, {c.hq, n});
  auto dq_ = desc(aq), dk_ = desc(ak), dv_ = desc(av), do_ = desc(o), dl_ = desc(lse);
  if (n == 0) dl_.strides[0] = dl_.strides[1] = 1;  // an empty tensor's strides do not matter
  ASSERT_EQ(longattn_varlen_forward(h, &dq_, &dk_, &dv_, &do_, &dl_, nullptr), LONGATTN_OK) << longattn_last_error();
  auto lo = test::poisoned_tensor(DType::f32, {L, c.hq, D});
  const auto lo_ = desc(lo);
  ASSERT_EQ(longattn_varlen_to_linear(h, &do_, &lo_, nullptr), LONGATTN_OK) << longattn_last_error();
  const double tol = 3e-5, gtol = 2e-4;
  {
    const auto d = test::compare(lo.to_f32(), rows_of(ro, info.linear_begin, L).to_f32());
    EXPECT_LE(d.max_abs, tol) << "o";
  }

  // Backward: d_o's slice -> attention layout -> backward -> dq, dk, dv back to the linear layout.
  auto ldo = rows_of(d_o, info.linear_begin, L);
  auto ado = test::poisoned_tensor(DType::f32, {n, c.hq, D});
  const auto ldo_ = desc(ldo), ado_ = desc(ado);
  ASSERT_EQ(longattn_varlen_to_attention(h, &ldo_, &ado_, nullptr), LONGATTN_OK) << longattn_last_error();
  auto gq = test::poisoned_tensor(DType::f32, {n, c.hq, D});
  auto gk = test::poisoned_tensor(DType::f32, {n, c.hkv, D}), gv = test::poisoned_tensor(DType::f32, {n, c.hkv, D});
  const auto gq_ = desc(gq), gk_ = desc(gk), gv_ = desc(gv);
  ASSERT_EQ(longattn_varlen_backward(h, &dq_, &dk_, &dv_, &do_, &dl_, &ado_, &gq_, &gk_, &gv_, nullptr), LONGATTN_OK)
      << longattn_last_error();
  for (auto [grad, whole, what] : {std::tuple{&gq, &rdq, "dq"}, {&gk, &rdk, "dk"}, {&gv, &rdv, "dv"}}) {
    auto linear = test::poisoned_tensor(DType::f32, {L, whole->view.dim(1), D});
    const auto g = desc(*grad), l = desc(linear);
    ASSERT_EQ(longattn_varlen_to_linear(h, &g, &l, nullptr), LONGATTN_OK) << longattn_last_error();
    const auto d = test::compare(linear.to_f32(), rows_of(*whole, info.linear_begin, L).to_f32());
    EXPECT_LE(d.max_abs, gtol * std::max(1.0, d.max_ref)) << what;
  }
  longattn_varlen_destroy(h);
}

class CapiVarlenVsReference : public ::testing::TestWithParam<std::tuple<longattn_balance, bool>> {};

TEST_P(CapiVarlenVsReference, RemapAttentionRemapBack) {
  const auto [balance, causal] = GetParam();
  Session s;
  check_case(s, {balance, causal, 4, 2, 0, false}, s.shared_seed());
  // Every rank its own node, with a cap: the longest sequence must span several ranks.
  if (balance != LONGATTN_BALANCE_WHOLE_SEQUENCES) check_case(s, {balance, causal, 6, 3, 1, true}, s.shared_seed());
}

INSTANTIATE_TEST_SUITE_P(Balances, CapiVarlenVsReference,
                         ::testing::Combine(::testing::Values(LONGATTN_BALANCE_HIERARCHICAL, LONGATTN_BALANCE_PER_SEQUENCE_ZIGZAG,
                                                              LONGATTN_BALANCE_WHOLE_SEQUENCES),
                                            ::testing::Bool()));

// A plan over a small batch for the round trip and the refusals.
struct Planned {
  Session s;
  std::vector<std::int32_t> cu{0, 3, 30, 31, 75};
  longattn_varlen* h = nullptr;
  longattn_varlen_info info{};
  Planned() {
    auto p = params_for({LONGATTN_BALANCE_HIERARCHICAL, true, 2, 2, 0, false}, cu, 8);
    EXPECT_EQ(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_OK) << longattn_last_error();
    longattn_varlen_get_info(h, &info);
  }
  ~Planned() { longattn_varlen_destroy(h); }
};

TEST(CapiVarlen, RoundTripIsTheIdentityForAnyRowWidth) {
  Planned p;
  std::mt19937_64 rng(p.s.shared_seed());
  for (auto [dtype, width] : {std::pair{DType::bf16, 5}, {DType::f32, 1}, {DType::f16, 24}}) {
    auto all = test::random_tensor(rng, dtype, {75, width, 1});
    auto linear = rows_of(all, p.info.linear_begin, p.info.linear_tokens);
    auto there = test::poisoned_tensor(dtype, {p.info.attention_tokens, width, 1});
    auto back = test::poisoned_tensor(dtype, {p.info.linear_tokens, width, 1});
    const auto l = desc(linear), t = desc(there), b = desc(back);
    ASSERT_EQ(longattn_varlen_to_attention(p.h, &l, &t, nullptr), LONGATTN_OK) << longattn_last_error();
    ASSERT_EQ(longattn_varlen_to_linear(p.h, &t, &b, nullptr), LONGATTN_OK) << longattn_last_error();
    EXPECT_EQ(std::memcmp(back.view.data, linear.view.data, linear.view.bytes()), 0) << to_string(dtype) << " width " << width;
  }
}

// One sequence whole on one rank: the other ranks hold no rows in the attention layout (and pass
// empty tensors with the strides PyTorch gives them).
TEST(CapiVarlen, RanksWithoutAttentionRows) {
  Session s;
  check_case(s, {LONGATTN_BALANCE_WHOLE_SEQUENCES, true, 2, 1, 0, false}, s.shared_seed(), {0, 0, 29});
}

TEST(CapiVarlenRefuses, BadParametersWithAStatusOnEveryRank) {
  Session s;
  std::vector<std::int32_t> cu{0, 10, 50};
  auto p = params_for({LONGATTN_BALANCE_HIERARCHICAL, true, 2, 2, 0, false}, cu, 8);
  longattn_varlen* h = nullptr;
  const int bad_balance = 9;
  std::memcpy(&p.balance, &bad_balance, sizeof bad_balance);
  EXPECT_EQ(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("not a longattn_balance"), std::string::npos) << longattn_last_error();
  EXPECT_EQ(h, nullptr);
  p.balance = LONGATTN_BALANCE_HIERARCHICAL;
  p.struct_size = 8;
  EXPECT_EQ(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("longattn_varlen_params_init"), std::string::npos);
  p.struct_size = sizeof p;
  p.cap_tokens = 3;  // the batch cannot fit under it even across all ranks
  EXPECT_EQ(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("cap"), std::string::npos) << longattn_last_error();
  p.cap_tokens = 0;
  const std::vector<std::int32_t> decreasing{0, 10, 5};
  p.cu_seqlens = decreasing.data();
  EXPECT_EQ(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("cu_seqlens"), std::string::npos) << longattn_last_error();
  p.cu_seqlens = cu.data();
  p.q_heads = 3;  // not a multiple of kv_heads
  EXPECT_EQ(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(h, nullptr);
  // Parameters that differ on one rank are refused on every rank rather than pairing wrong ranks.
  p.q_heads = 2;
  if (s.size > 1) {
    if (s.rank == s.size - 1) p.causal = 0;
    EXPECT_NE(longattn_varlen_create(s.context, s.comm, &p, &h), LONGATTN_OK);
    EXPECT_EQ(h, nullptr);
  }
}

TEST(CapiVarlenRefuses, WrongRowsOnOneRankFailEveryRank) {
  Planned p;
  std::mt19937_64 rng(test::fresh_seed());
  const bool wrong_here = p.s.rank == p.s.size - 1;
  auto linear = test::random_tensor(rng, DType::f32, {p.info.linear_tokens + (wrong_here ? 1 : 0), 2, 8});
  auto there = test::poisoned_tensor(DType::f32, {p.info.attention_tokens, 2, 8});
  const auto l = desc(linear), t = desc(there);
  EXPECT_EQ(longattn_varlen_to_attention(p.h, &l, &t, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  const std::string message = longattn_last_error();
  EXPECT_NE(message.find("rows"), std::string::npos) << message;
  if (p.s.size > 1) {
    EXPECT_NE(message.find(fmt::format("rank {}", p.s.size - 1)), std::string::npos) << message;
  }
  // Dimensions after the token one must match.
  auto right = test::random_tensor(rng, DType::f32, {p.info.linear_tokens, 2, 8});
  auto wide = test::poisoned_tensor(DType::f32, {p.info.attention_tokens, 4, 4});
  const auto r = desc(right), w = desc(wide);
  EXPECT_EQ(longattn_varlen_to_attention(p.h, &r, &w, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("same dimensions after the first"), std::string::npos) << longattn_last_error();
  // Attention with k of the wrong heads.
  auto q = test::random_tensor(rng, DType::f32, {p.info.attention_tokens, 2, 8});
  auto k = test::random_tensor(rng, DType::f32, {p.info.attention_tokens, 1, 8});
  auto lse = test::poisoned_tensor(DType::f32, {2, p.info.attention_tokens});
  const auto dq = desc(q), dk = desc(k), dl = desc(lse);
  EXPECT_EQ(longattn_varlen_forward(p.h, &dq, &dk, &dk, &dq, &dl, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(longattn_varlen_forward(p.h, &dq, &dq, &dq, &dq, nullptr, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("tensor 'lse' is NULL"), std::string::npos) << longattn_last_error();
  // Index queries.
  EXPECT_EQ(longattn_varlen_linear_rows(p.h, p.s.size, nullptr, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(longattn_varlen_attention_index(p.h, -1, nullptr, nullptr, nullptr, 0), LONGATTN_ERROR_INVALID_ARGUMENT);
  if (p.info.attention_tokens > 1) {
    std::vector<std::int64_t> small(1);
    EXPECT_EQ(longattn_varlen_attention_index(p.h, p.s.rank, nullptr, small.data(), nullptr, 1), LONGATTN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(longattn_last_error()).find("capacity 1 is too small"), std::string::npos) << longattn_last_error();
  }
}

}  // namespace
}  // namespace longattn
