// Token guessing is rate-limited per source address: a few wrong tokens are answered as such,
// then attempts from that address are refused unchecked until its credit refills; other
// addresses are unaffected, and failures are reported in one summary line per interval.
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <string>

#include "longattn/offload_client.hpp"
#include "offload/auth_throttle.hpp"
#include "offload_test_util.hpp"
#include "raw_tcp_peer.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

TEST(AuthThrottle, BurstThenSteadyRatePerAddressAndOneSummaryPerInterval) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  AuthThrottle::Options opt;
  opt.burst = static_cast<double>(2 + rng() % 8);
  opt.failures_per_s = 2;
  opt.log_interval_s = 10;
  AuthThrottle t(opt);
  auto now = AuthThrottle::Clock::now();
  const std::string guesser = "10.0.0." + std::to_string(rng() % 250), other = "10.0.1." + std::to_string(rng() % 250);
  for (int i = 0; i < static_cast<int>(opt.burst); ++i) {
    ASSERT_TRUE(t.allow(guesser, now)) << i;
    t.failed(guesser, now);
  }
  EXPECT_FALSE(t.allow(guesser, now));
  EXPECT_TRUE(t.allow(other, now)) << "another address was throttled";
  EXPECT_NEAR(t.wait_s(guesser, now), 0.5, 1e-9);
  EXPECT_FALSE(t.allow(guesser, now + 400ms));
  EXPECT_TRUE(t.allow(guesser, now + 500ms)) << "the credit did not refill at the steady rate";
  EXPECT_EQ(t.failures_total(), static_cast<std::uint64_t>(opt.burst));
  EXPECT_EQ(t.refused_total(), 2u);

  const std::string first = t.take_summary(now);
  EXPECT_NE(first.find(std::to_string(static_cast<int>(opt.burst)) + " wrong tokens"), std::string::npos) << first;
  EXPECT_NE(first.find(guesser), std::string::npos) << first;
  t.failed(other, now + 1s);
  EXPECT_EQ(t.take_summary(now + 2s), "") << "a second line within the interval";
  const std::string second = t.take_summary(now + 11s);
  EXPECT_NE(second.find("1 wrong tokens"), std::string::npos) << second;
  EXPECT_EQ(t.take_summary(now + 30s), "") << "a line with nothing to report";
}

TEST(AuthThrottle, PeerAddressDropsThePort) {
  EXPECT_EQ(peer_address("10.1.2.3:51234"), "10.1.2.3");
  EXPECT_EQ(peer_address("ucx:127.0.0.1:7"), "ucx:127.0.0.1");
  EXPECT_EQ(peer_address("::1:80"), "::1");
}

TEST(OffloadAuth, WrongTokensFromOneAddressAreRateLimited) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  auto s = test::start_server();
  const int attempts = 30 + static_cast<int>(rng() % 10);
  int wrong = 0, limited = 0;
  for (int i = 0; i < attempts; ++i) {
    test::RawTcpPeer peer(s->port());
    std::string guess = test::kToken;
    guess[rng() % guess.size()] ^= static_cast<char>(1 + rng() % 100);
    peer.send(frame(MsgType::hello, 0, rng(), encode(Hello{guess, rng()})));
    const std::string message = peer.read_error_message();
    if (message.find("wrong token") != std::string::npos) {
      wrong++;
    } else if (message.find("too many failed authentications") != std::string::npos) {
      limited++;
    } else {
      ADD_FAILURE() << "unexpected reply: '" << message << "'";
    }
  }
  EXPECT_GE(wrong, 1);
  EXPECT_LE(wrong, 12) << "wrong tokens were checked without limit";
  EXPECT_EQ(wrong + limited, attempts);
  // The right token from that address waits its turn too: a guesser cannot tell it apart.
  test::RawTcpPeer late(s->port());
  late.send(frame(MsgType::hello, 0, 1, encode(Hello{test::kToken, 1})));
  EXPECT_NE(late.read_error_message().find("too many failed authentications"), std::string::npos);
  const std::string m = s->metrics_text();
  EXPECT_NE(m.find("longattn_offload_auth_failures_total " + std::to_string(wrong) + "\n"), std::string::npos) << m;
  EXPECT_NE(m.find("longattn_offload_auth_rate_limited_total " + std::to_string(limited + 1) + "\n"), std::string::npos) << m;
}

}  // namespace
}  // namespace longattn::offload
