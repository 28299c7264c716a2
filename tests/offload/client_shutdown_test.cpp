// A client that stops on a server's error: the error arrives mid-prefill (bulk appends still being
// written) or mid-decode (appends and attends in flight), the caller gets the server's error and
// destroys the client at once, as a program does when it exits on that error. Destroying it must
// cancel and wait for the pending operations; run under AddressSanitizer (make test-sanitize) a
// stream freed under a running write shows up here as a use after free.
#include <gtest/gtest.h>

#include <deque>
#include <memory>
#include <future>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "longattn/error.hpp"
#include "longattn/offload_client.hpp"
#include "offload/transport.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

constexpr int kSeqs = 4, kLayers = 2, kKvHeads = 2, kHeadDim = 64, kQHeads = 8;
constexpr std::int64_t kContext = 4096;
constexpr int kAttempts = 8;

class OffloadClientShutdown : public ::testing::TestWithParam<std::string> {
 protected:
  std::unique_ptr<Server> start_server() const { return test::start_server(std::size_t{4} << 20, 0, "", GetParam()); }
  ClientOptions options_for(const Server& s) const {
    ClientOptions co;
    co.servers = {test::addr(s)};
    co.token = test::kToken;
    co.transport = GetParam();
    return co;
  }
};

std::vector<std::string> transports() {
  std::vector<std::string> t{"tcp"};
  if (ucx_available()) t.push_back("ucx");
  return t;
}

// The error of the first future that fails, waiting for them in order as a program would.
std::optional<Error> first_error(std::deque<std::future<void>>& pending) {
  while (!pending.empty()) {
    auto f = std::move(pending.front());
    pending.pop_front();
    try {
      f.get();
    } catch (const Error& e) {
      return e;
    }
  }
  return std::nullopt;
}

// Issues one request; a call refused at once (its sequence already broken by a failed request)
// ends the issuing, and the error the program reports is then the failed request's.
template <class Call>
bool issue(std::deque<std::future<void>>& pending, Call call) {
  try {
    pending.push_back(call());
    return true;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("drop it and open it again"), std::string::npos) << e.what();
    return false;
  }
}

void expect_capacity_error(const std::optional<Error>& e) {
  ASSERT_TRUE(e.has_value()) << "the server's memory limit was never reached";
  EXPECT_EQ(e->code(), ErrorCode::out_of_capacity) << e->what();
  EXPECT_NE(std::string(e->what()).find("out of capacity"), std::string::npos) << e->what();
}

TEST_P(OffloadClientShutdown, ErrorMidPrefillIsReportedAndTheClientGoesWhileWritesAreInFlight) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  // One layer of one sequence is 1 MiB of K and V: the 4 MiB server fills during the first layer.
  test::DenseKv kv(rng, DType::bf16, kKvHeads, kHeadDim, std::vector<std::int64_t>(kSeqs, kContext));
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    SCOPED_TRACE(attempt);
    auto server = start_server();
    std::optional<Error> error;
    {
      Client client(options_for(*server));
      for (int s = 0; s < kSeqs; ++s) client.open({static_cast<std::uint64_t>(s), kLayers, kKvHeads, kHeadDim, DType::bf16}).get();
      std::deque<std::future<void>> pending;
      bool issuing = true;
      for (int l = 0; l < kLayers && issuing; ++l)
        for (int s = 0; s < kSeqs && issuing; ++s)
          issuing = issue(pending, [&] {
            return client.append(static_cast<std::uint64_t>(s), l, kv.k_at(static_cast<std::size_t>(s), 0),
                                 kv.v_at(static_cast<std::size_t>(s), 0), kContext);
          });
      error = first_error(pending);
      // The client goes here with the later appends still queued or being written.
    }
    expect_capacity_error(error);
  }
}

TEST_P(OffloadClientShutdown, ErrorMidDecodeIsReportedAndTheClientGoesWhileAttendsAreInFlight) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  constexpr std::int64_t kChunk = 256;  // tokens appended per sequence and step: the store fills after a few steps
  const int steps = static_cast<int>(kContext / kChunk);
  test::DenseKv kv(rng, DType::bf16, kKvHeads, kHeadDim, std::vector<std::int64_t>(kSeqs, kContext));
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(kSeqs) * kQHeads * kHeadDim);
  for (auto& x : q) x = val(rng);
  std::vector<DecodeQuery> queries;
  for (int s = 0; s < kSeqs; ++s) queries.push_back({static_cast<std::uint64_t>(s), 1});
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    SCOPED_TRACE(attempt);
    auto server = start_server();
    std::optional<Error> error;
    // Outputs of every attend in flight: they outlive the client, as a caller's buffers must.
    std::vector<std::vector<float>> outputs(static_cast<std::size_t>(steps * kLayers * 2));
    {
      Client client(options_for(*server));
      for (int s = 0; s < kSeqs; ++s) client.open({static_cast<std::uint64_t>(s), kLayers, kKvHeads, kHeadDim, DType::bf16}).get();
      std::deque<std::future<void>> pending;
      std::size_t out = 0;
      bool issuing = true;
      for (int step = 0; step < steps && issuing && !error; ++step) {
        for (int l = 0; l < kLayers && issuing; ++l) {
          for (int s = 0; s < kSeqs && issuing; ++s)
            issuing = issue(pending, [&] {
              return client.append(static_cast<std::uint64_t>(s), l, kv.k_at(static_cast<std::size_t>(s), step * kChunk),
                                   kv.v_at(static_cast<std::size_t>(s), step * kChunk), kChunk);
            });
          // This step's attend stays in flight with the next step's appends.
          auto& o = outputs[out++];
          auto& lse = outputs[out++];
          o.resize(q.size());
          lse.resize(static_cast<std::size_t>(kSeqs) * kQHeads);
          if (issuing) issuing = issue(pending, [&] { return client.attend(l, kQHeads, kHeadDim, queries, q.data(), o.data(), lse.data()); });
        }
        // Wait for the step before last only, so that two steps' requests are in flight.
        while (!error && pending.size() > static_cast<std::size_t>(2 * kLayers * (kSeqs + 1))) {
          std::deque<std::future<void>> one;
          one.push_back(std::move(pending.front()));
          pending.pop_front();
          error = first_error(one);
        }
      }
      if (!error) error = first_error(pending);
    }
    expect_capacity_error(error);
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, OffloadClientShutdown, ::testing::ValuesIn(transports()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
}  // namespace longattn::offload
