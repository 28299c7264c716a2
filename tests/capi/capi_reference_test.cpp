// The C API under mpirun against the single-process double-precision reference: every strategy
// (ring, Ulysses, hybrid, auto) and layout, causal and full, GQA, a packed batch with an empty and a
// one-token sequence, forward and backward, sharded and gathered with the C API's own helpers; and
// its refusals: one status and message on every rank, never an exception through the boundary.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
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

// Stores an integer outside the enum in a C enum field, as a C caller can (C++ may not form such a
// value of the enum type).
template <class CEnum>
void store_raw(CEnum& field, int value) {
  std::memcpy(&field, &value, sizeof value);
}


struct Case {
  longattn_strategy strategy;
  int ulysses_size;
  longattn_layout layout;
  bool causal;
  int hq, hkv;
  DType dtype;
};

std::string describe(const Case& c) {
  return fmt::format("strategy {} U={} layout {} {} h={}x{} {}", static_cast<int>(c.strategy), c.ulysses_size,
                     static_cast<int>(c.layout), c.causal ? "causal" : "full", c.hq, c.hkv, to_string(c.dtype));
}

// Rows `shard` of a [T, H, D] tensor through longattn_attention_shard.
HostTensor shard_of(longattn_attention* a, int rank, const HostTensor& global, std::int64_t n) {
  HostTensor local(global.view.dtype, {n, global.view.dim(1), global.view.dim(2)});
  const auto g = desc(global), l = desc(local);
  EXPECT_EQ(longattn_attention_shard(a, rank, &g, &l), LONGATTN_OK) << longattn_last_error();
  return local;
}

// Forward and backward of one case through the C API; each rank compares its rows with the
// reference on the whole batch, and the gathered (unsharded) o of its rows with it too.
void check_case(Session& s, const Case& c, const std::vector<std::int32_t>& cu, std::uint64_t seed) {
  SCOPED_TRACE(describe(c) + fmt::format(" tokens {} seed {} rank {}/{}", cu.back(), seed, s.rank, s.size));
  std::mt19937_64 rng(seed);
  const std::int64_t T = cu.back(), D = 16;
  auto q = test::random_tensor(rng, c.dtype, {T, c.hq, D});
  auto k = test::random_tensor(rng, c.dtype, {T, c.hkv, D});
  auto v = test::random_tensor(rng, c.dtype, {T, c.hkv, D});
  auto d_o = test::random_tensor(rng, DType::f32, {T, c.hq, D});

  auto reference = capi_test::whole_batch_reference(q, k, v, d_o, cu, c.causal);
  auto &ro = reference.o, &rl = reference.lse, &rdq = reference.dq, &rdk = reference.dk, &rdv = reference.dv;

  longattn_attention_params p;
  longattn_attention_params_init(&p);
  p.cu_seqlens = cu.data();
  p.batch = static_cast<int>(cu.size()) - 1;
  p.q_heads = c.hq;
  p.kv_heads = c.hkv;
  p.head_dim = static_cast<int>(D);
  p.dtype = static_cast<longattn_dtype>(c.dtype);
  p.causal = c.causal;
  p.layout = c.layout;
  p.strategy = c.strategy;
  p.ulysses_size = c.ulysses_size;
  longattn_attention* a = nullptr;
  ASSERT_EQ(longattn_attention_create(s.context, s.comm, &p, &a), LONGATTN_OK) << longattn_last_error();
  longattn_attention_info info{};
  ASSERT_EQ(longattn_attention_get_info(a, &info), LONGATTN_OK);
  EXPECT_EQ(info.total_tokens, T);
  EXPECT_EQ(info.ulysses_size * info.ring_size, s.size);
  if (c.strategy == LONGATTN_STRATEGY_RING) {
    EXPECT_EQ(info.ulysses_size, 1);
  }
  if (c.strategy == LONGATTN_STRATEGY_ULYSSES) {
    EXPECT_EQ(info.ulysses_size, s.size);
  }
  if (c.strategy == LONGATTN_STRATEGY_HYBRID) {
    EXPECT_EQ(info.ulysses_size, c.ulysses_size);
  }
  EXPECT_NE(info.strategy, LONGATTN_STRATEGY_AUTO);
  const std::int64_t n = info.local_tokens;
  std::vector<std::int64_t> index(static_cast<std::size_t>(n));
  std::vector<std::int32_t> positions(static_cast<std::size_t>(n));
  std::int64_t counted = -1;
  EXPECT_EQ(longattn_attention_shard_index(a, s.rank, &counted, index.data(), positions.data(), n), LONGATTN_OK);
  EXPECT_EQ(counted, n);

  auto lq = shard_of(a, s.rank, q, n), lk = shard_of(a, s.rank, k, n), lv = shard_of(a, s.rank, v, n);
  auto ldo = shard_of(a, s.rank, d_o, n);
  auto o = test::poisoned_tensor(DType::f32, {n, c.hq, D});
  auto lse = test::poisoned_tensor(DType::f32, {c.hq, n});
  const auto dq_ = desc(lq), dk_ = desc(lk), dv_ = desc(lv), do_ = desc(o), dl_ = desc(lse), ddo_ = desc(ldo);
  EXPECT_EQ(longattn_attention_forward(a, &dq_, &dk_, &dv_, &do_, &dl_, nullptr), LONGATTN_OK) << longattn_last_error();

  const bool low = c.dtype != DType::f32;
  const double tol = low ? 2e-2 : 3e-5, gtol = low ? 8e-2 : 2e-4;
  // Every rank's o gathered into a whole-batch tensor: this rank's rows must match, the others stay 0.
  HostTensor gathered(DType::f32, {T, c.hq, D});
  const auto dg = desc(gathered);
  EXPECT_EQ(longattn_attention_unshard(a, s.rank, &do_, &dg), LONGATTN_OK) << longattn_last_error();
  const auto got = gathered.to_f32(), want = ro.to_f32();
  const std::size_t row = static_cast<std::size_t>(c.hq * D);
  double worst = 0;
  for (std::int64_t i = 0; i < n; ++i)
    for (std::size_t e = 0; e < row; ++e) {
      const std::size_t at = static_cast<std::size_t>(index[static_cast<std::size_t>(i)]) * row + e;
      worst = std::max(worst, static_cast<double>(std::abs(got[at] - want[at])));
    }
  EXPECT_LE(worst, tol) << "o";
  const auto lse_got = lse.to_f32(), lse_all = rl.to_f32();
  double lse_worst = 0;
  for (int h = 0; h < c.hq; ++h)
    for (std::int64_t i = 0; i < n; ++i) {
      const float g = lse_got[static_cast<std::size_t>(h * n + i)];
      const float w = lse_all[static_cast<std::size_t>(h * T + index[static_cast<std::size_t>(i)])];
      lse_worst = std::max(lse_worst, std::isinf(w) && g == w ? 0.0 : static_cast<double>(std::abs(g - w)));
    }
  EXPECT_LE(lse_worst, tol * 10) << "lse";
  // Positions are those of each token inside its sequence.
  for (std::int64_t i = 0; i < n; ++i) {
    const auto gi = index[static_cast<std::size_t>(i)];
    const auto seq = std::upper_bound(cu.begin(), cu.end(), static_cast<std::int32_t>(gi)) - cu.begin() - 1;
    EXPECT_EQ(positions[static_cast<std::size_t>(i)], gi - cu[static_cast<std::size_t>(seq)]);
  }

  auto dq = test::poisoned_tensor(DType::f32, {n, c.hq, D});
  auto dk = test::poisoned_tensor(DType::f32, {n, c.hkv, D}), dv = test::poisoned_tensor(DType::f32, {n, c.hkv, D});
  const auto gq = desc(dq), gk = desc(dk), gv = desc(dv);
  EXPECT_EQ(longattn_attention_backward(a, &dq_, &dk_, &dv_, &do_, &dl_, &ddo_, &gq, &gk, &gv, nullptr), LONGATTN_OK)
      << longattn_last_error();
  for (auto [local, whole, what] : {std::tuple{&dq, &rdq, "dq"}, {&dk, &rdk, "dk"}, {&dv, &rdv, "dv"}}) {
    const auto d = test::compare(local->to_f32(), shard_of(a, s.rank, *whole, n).to_f32());
    EXPECT_LE(d.max_abs, gtol * std::max(1.0, d.max_ref)) << what;
  }
  longattn_attention_destroy(a);
}

// Query heads every Ulysses size of these ranks divides; kv heads that divide the group or that
// the group divides (GQA).
int query_heads(int ranks) { return ranks == 3 ? 6 : 4; }
int kv_heads(int ranks) { return ranks == 3 ? 3 : 2; }

class CapiVsReference : public ::testing::TestWithParam<std::tuple<longattn_layout, bool>> {};

TEST_P(CapiVsReference, EveryStrategyOnAPackedBatch) {
  const auto [layout, causal] = GetParam();
  Session s;
  std::mt19937_64 rng(s.shared_seed());
  const auto cu = test::random_cu_seqlens(rng, 4, 37);
  std::vector<Case> cases{{LONGATTN_STRATEGY_RING, 0, layout, causal, query_heads(s.size), kv_heads(s.size), DType::f32},
                          {LONGATTN_STRATEGY_ULYSSES, 0, layout, causal, query_heads(s.size), kv_heads(s.size), DType::f32},
                          {LONGATTN_STRATEGY_AUTO, 0, layout, causal, query_heads(s.size), kv_heads(s.size), DType::f32}};
  if (s.size == 4) cases.push_back({LONGATTN_STRATEGY_HYBRID, 2, layout, causal, 4, 2, DType::f32});
  for (const auto& c : cases) check_case(s, c, cu, s.shared_seed());
}

INSTANTIATE_TEST_SUITE_P(Layouts, CapiVsReference,
                         ::testing::Combine(::testing::Values(LONGATTN_LAYOUT_CONTIGUOUS, LONGATTN_LAYOUT_ZIGZAG, LONGATTN_LAYOUT_STRIPED),
                                            ::testing::Bool()));

TEST(Capi, Bf16SingleSequenceRing) {
  Session s;
  check_case(s, {LONGATTN_STRATEGY_RING, 0, LONGATTN_LAYOUT_ZIGZAG, true, 4, 1, DType::bf16}, {0, 61}, s.shared_seed());
}

TEST(Capi, VersionAndStatusNames) {
  EXPECT_EQ(longattn_abi_version(), LONGATTN_ABI_VERSION);
  EXPECT_STREQ(longattn_version_string(), "0.1.0");
  EXPECT_STREQ(longattn_status_name(LONGATTN_ERROR_TIMEOUT), "timeout");
}

// A plan over a small batch for the refusal tests.
struct Planned {
  Session s;
  std::vector<std::int32_t> cu{0, 20};
  longattn_attention* a = nullptr;
  std::int64_t n = 0;
  Planned() {
    longattn_attention_params p;
    longattn_attention_params_init(&p);
    p.cu_seqlens = cu.data();
    p.batch = 1;
    p.q_heads = p.kv_heads = 2;
    p.head_dim = 8;
    p.dtype = LONGATTN_DTYPE_F32;
    EXPECT_EQ(longattn_attention_create(s.context, s.comm, &p, &a), LONGATTN_OK) << longattn_last_error();
    longattn_attention_shard_index(a, s.rank, &n, nullptr, nullptr, 0);
  }
  ~Planned() { longattn_attention_destroy(a); }
};

TEST(CapiRefuses, NonContiguousTensorOnOneRankFailsEveryRank) {
  Planned p;
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {p.n, 2, 8});
  auto o = test::poisoned_tensor(DType::f32, {p.n, 2, 8});
  auto lse = test::poisoned_tensor(DType::f32, {2, p.n});
  auto dq = desc(q), dout = desc(o), dl = desc(lse);
  longattn_tensor bad = dq;
  if (p.s.rank == p.s.size - 1 && p.n > 1) {
    std::swap(bad.strides[0], bad.strides[1]);  // a transposed view of the same memory
    bad.shape[0] = 2;
    bad.shape[1] = p.n;
  }
  const auto status = longattn_attention_forward(p.a, &dq, &bad, &dq, &dout, &dl, nullptr);
  EXPECT_EQ(status, LONGATTN_ERROR_INVALID_ARGUMENT);
  const std::string message = longattn_last_error();
  EXPECT_NE(message.find("tensor 'k'"), std::string::npos) << message;
  EXPECT_NE(message.find("contiguous"), std::string::npos) << message;
  if (p.s.size > 1) {
    EXPECT_NE(message.find(fmt::format("rank {}", p.s.size - 1)), std::string::npos) << message;
  }
}

TEST(CapiRefuses, BadParametersAndNullsWithAStatusNotAnException) {
  Session s;
  longattn_attention_params p;
  longattn_attention_params_init(&p);
  const std::int32_t cu[] = {0, 8};
  p.cu_seqlens = cu;
  p.batch = 1;
  store_raw(p.layout, 7);
  longattn_attention* a = nullptr;
  EXPECT_EQ(longattn_attention_create(s.context, s.comm, &p, &a), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("not a longattn_layout"), std::string::npos) << longattn_last_error();
  EXPECT_EQ(a, nullptr);
  p.layout = LONGATTN_LAYOUT_ZIGZAG;
  p.struct_size = 8;
  EXPECT_EQ(longattn_attention_create(s.context, s.comm, &p, &a), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("longattn_attention_params_init"), std::string::npos);
  longattn_attention_params_init(&p);
  p.cu_seqlens = cu;
  p.batch = 1;
  p.q_heads = 3;  // Ulysses over more than one rank needs heads divisible by the ranks
  p.kv_heads = 3;
  p.strategy = LONGATTN_STRATEGY_ULYSSES;
  if (s.size == 2 || s.size == 4) {
    EXPECT_EQ(longattn_attention_create(s.context, s.comm, &p, &a), LONGATTN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(longattn_last_error()).find("heads"), std::string::npos) << longattn_last_error();
  }
  EXPECT_EQ(longattn_comm_rank(nullptr, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(longattn_last_error(), "comm must not be NULL");
  EXPECT_EQ(longattn_comm_set_timeout(s.comm, 0), LONGATTN_ERROR_INVALID_ARGUMENT);
  longattn_context* ctx = nullptr;
  EXPECT_EQ(longattn_context_create("no-such-backend", kCpu, &ctx), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ctx, nullptr);
  EXPECT_EQ(longattn_context_create("cpu", {LONGATTN_DEVICE_CPU, 3}, &ctx), LONGATTN_ERROR_INVALID_ARGUMENT);
}

TEST(CapiRefuses, ShardOfWrongRowsOrGpuMemory) {
  Planned p;
  HostTensor global(DType::f32, {19, 2, 8}), local(DType::f32, {p.n, 2, 8});
  auto g = desc(global), l = desc(local);
  EXPECT_EQ(longattn_attention_shard(p.a, p.s.rank, &g, &l), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("the batch has 20 tokens"), std::string::npos) << longattn_last_error();
  g.shape[0] = 20;
  g.device.kind = LONGATTN_DEVICE_CUDA;
  EXPECT_EQ(longattn_attention_shard(p.a, p.s.rank, &g, &l), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("shard_index"), std::string::npos) << longattn_last_error();
  EXPECT_EQ(longattn_attention_shard_index(p.a, p.s.size, nullptr, nullptr, nullptr, 0), LONGATTN_ERROR_INVALID_ARGUMENT);
  std::vector<std::int64_t> small(1);
  if (p.n > 1) {
    EXPECT_EQ(longattn_attention_shard_index(p.a, p.s.rank, nullptr, small.data(), nullptr, 1), LONGATTN_ERROR_INVALID_ARGUMENT);
  }
}

TEST(Capi, LastErrorIsPerThread) {
  std::string seen_by_other;
  EXPECT_EQ(longattn_comm_rank(nullptr, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  std::thread other([&] {
    EXPECT_STREQ(longattn_last_error(), "");  // nothing failed on this thread yet
    longattn_context* ctx = nullptr;
    longattn_device unknown{LONGATTN_DEVICE_CPU, 0};
    store_raw(unknown.kind, 5);
    EXPECT_EQ(longattn_context_create("cpu", unknown, &ctx), LONGATTN_ERROR_INVALID_ARGUMENT);
    seen_by_other = longattn_last_error();
  });
  other.join();
  EXPECT_STREQ(longattn_last_error(), "comm must not be NULL");
  EXPECT_NE(seen_by_other.find("device kind 5 is not a longattn_device_kind"), std::string::npos) << seen_by_other;
}

TEST(Capi, DescriptorsOutsideTheirRangesAreRefused) {
  Planned p;
  const std::int64_t shape[5] = {p.n, 2, 8, 1, 1};
  std::vector<float> data(static_cast<std::size_t>(p.n * 16) + 1);
  const longattn_device cpu{LONGATTN_DEVICE_CPU, 0};
  const auto five = longattn_tensor_contiguous(data.data(), LONGATTN_DTYPE_F32, cpu, 5, shape);
  EXPECT_EQ(five.ndim, 0);
  auto q = longattn_tensor_contiguous(data.data(), LONGATTN_DTYPE_F32, cpu, 3, shape);
  auto lse_shape = std::array<std::int64_t, 2>{2, p.n};
  auto lse = longattn_tensor_contiguous(data.data(), LONGATTN_DTYPE_F32, cpu, 2, lse_shape.data());
  EXPECT_EQ(longattn_attention_forward(p.a, &q, &q, &q, &five, &lse, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("tensor 'o' has ndim 0"), std::string::npos) << longattn_last_error();
  auto null_data = q;
  null_data.data = nullptr;
  EXPECT_EQ(longattn_attention_forward(p.a, &q, &q, &q, &null_data, &lse, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("NULL data pointer"), std::string::npos) << longattn_last_error();
  auto bad_dtype = q;
  store_raw(bad_dtype.dtype, 9);
  EXPECT_EQ(longattn_attention_forward(p.a, &bad_dtype, &q, &q, &q, &lse, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("dtype 9 is not a longattn_dtype"), std::string::npos) << longattn_last_error();
  EXPECT_EQ(longattn_attention_forward(p.a, &q, &q, &q, &q, nullptr, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("tensor 'lse' is NULL"), std::string::npos) << longattn_last_error();
  auto on_gpu = q;
  on_gpu.device = {LONGATTN_DEVICE_CUDA, 0};
  EXPECT_EQ(longattn_attention_forward(p.a, &q, &q, &q, &on_gpu, &lse, nullptr), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("make the context for the tensors' device"), std::string::npos)
      << longattn_last_error();
}

TEST(Capi, CommunicatorFromACallersMpiCommunicator) {
  // Each rank alone (MPI_COMM_SELF): one rank, however many the job has.
  longattn_comm* self = nullptr;
  ASSERT_EQ(longattn_comm_create_mpi(MPI_Comm_c2f(MPI_COMM_SELF), &self), LONGATTN_OK) << longattn_last_error();
  int size = 0;
  EXPECT_EQ(longattn_comm_size(self, &size), LONGATTN_OK);
  EXPECT_EQ(size, 1);
  longattn_comm_destroy(self);
  longattn_comm* null_comm = nullptr;
  EXPECT_EQ(longattn_comm_create_mpi(MPI_Comm_c2f(MPI_COMM_NULL), &null_comm), LONGATTN_ERROR_INVALID_ARGUMENT);
}

}  // namespace
}  // namespace longattn
