// A server refuses NaN and infinity in what it is sent (appended k/v of every dtype, the attend's
// q) with an invalid_argument error that names the element, and keeps serving the connection.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "longattn/dtype_convert.hpp"
#include "longattn/offload_client.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

constexpr int kKvHeads = 2, kQHeads = 4, kHeadDim = 32, kTokens = 8;

std::vector<std::uint16_t> random_kv(std::mt19937_64& rng, DType dtype) {
  std::uniform_real_distribution<float> val(-1, 1);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(kTokens * kKvHeads * kHeadDim));
  for (std::size_t i = 0; i < out.size(); ++i) store_from_f32(out.data(), dtype, i, val(rng));
  return out;
}

std::size_t flat(int token, int head, int dim) { return (static_cast<std::size_t>(token) * kKvHeads + head) * kHeadDim + dim; }

void expect_refused(std::future<void> f, const std::string& where) {
  try {
    f.get();
    FAIL() << "a non-finite value was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find(where), std::string::npos) << e.what();
  }
}

TEST(OffloadNonFinite, FirstNonFiniteFindsNanAndInfinityOfEveryDtype) {
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity()};
  for (DType t : {DType::f32, DType::bf16, DType::f16}) {
    std::vector<float> storage(16);
    for (std::size_t i = 0; i < 16; ++i) store_from_f32(storage.data(), t, i, 1e3f * static_cast<float>(i) - 7e3f);
    EXPECT_EQ(first_non_finite(storage.data(), t, 16), 16u) << to_string(t);
    for (float x : bad) {
      store_from_f32(storage.data(), t, 11, x);
      EXPECT_EQ(first_non_finite(storage.data(), t, 16), 11u) << to_string(t) << " " << x;
      store_from_f32(storage.data(), t, 11, 1.0f);
    }
  }
}

TEST(OffloadNonFinite, AppendAndAttendWithNanOrInfinityAreRefusedAndTheConnectionServesOn) {
  auto server = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*server)};
  co.token = test::kToken;
  Client c(co);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  for (DType dtype : {DType::bf16, DType::f16}) {
    const std::uint64_t seq = dtype == DType::bf16 ? 1 : 2;
    c.open({seq, 1, kKvHeads, kHeadDim, dtype}).get();
    auto k = random_kv(rng, dtype), v = random_kv(rng, dtype);
    store_from_f32(k.data(), dtype, flat(5, 1, 3), std::numeric_limits<float>::quiet_NaN());
    expect_refused(c.append(seq, 0, k.data(), v.data(), kTokens), "the appended k holds a non-finite value (NaN or infinity) at [token 5, head 1, dim 3]");
    // The client cannot know what a failed append left, so it wants the sequence opened again.
    c.drop(seq).get();
    c.open({seq, 1, kKvHeads, kHeadDim, dtype}).get();
    store_from_f32(k.data(), dtype, flat(5, 1, 3), 0.5f);
    store_from_f32(v.data(), dtype, flat(2, 0, 31), -std::numeric_limits<float>::infinity());
    expect_refused(c.append(seq, 0, k.data(), v.data(), kTokens), "the appended v holds a non-finite value (NaN or infinity) at [token 2, head 0, dim 31]");
    c.drop(seq).get();
    c.open({seq, 1, kKvHeads, kHeadDim, dtype}).get();
    store_from_f32(v.data(), dtype, flat(2, 0, 31), 0.25f);
    c.append(seq, 0, k.data(), v.data(), kTokens).get();

    std::uniform_real_distribution<float> val(-1, 1);
    std::vector<float> q(static_cast<std::size_t>(kQHeads * kHeadDim)), o(q.size()), lse(kQHeads);
    for (auto& x : q) x = val(rng);
    const DecodeQuery query{seq, 1};
    const std::vector<DecodeQuery> queries{query};
    q[static_cast<std::size_t>(3 * kHeadDim + 7)] = std::numeric_limits<float>::infinity();
    expect_refused(c.attend(0, kQHeads, kHeadDim, queries, q.data(), o.data(), lse.data()), "the attend's q holds a non-finite value (NaN or infinity) at [token 0, head 3, dim 7]");
    q[static_cast<std::size_t>(3 * kHeadDim + 7)] = 0.5f;
    c.attend(0, kQHeads, kHeadDim, queries, q.data(), o.data(), lse.data()).get();
    for (float x : o) EXPECT_TRUE(std::isfinite(x));
    for (float x : lse) EXPECT_TRUE(std::isfinite(x));
    c.drop(seq).get();
  }
}

}  // namespace
}  // namespace longattn::offload
