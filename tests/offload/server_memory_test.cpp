// The server's resident memory stays under --memory-limit whatever peers announce: a frame header
// before authentication may announce only a hello-sized payload, and after it a payload counts
// against the limit while it is received (one that does not fit is read in pieces, thrown away
// and refused, and the connection stays usable). Measured on the daemon from /proc.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "daemon_process.hpp"
#include "offload_test_util.hpp"
#include "raw_tcp_peer.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

constexpr long kMemoryLimitMiB = 64;

std::unique_ptr<test::Daemon> start_daemon(const test::TempDir& dir) {
  const std::string token = test::write_token_file(dir, test::kToken);
  return std::make_unique<test::Daemon>(std::vector<std::string>{"--listen", "127.0.0.1:0", "--token-file", token, "--threads", "1",
                                                                  "--memory-limit", std::to_string(kMemoryLimitMiB) + "M"},
                                        dir.file("stderr"));
}

TEST(OffloadServerMemory, AnnouncedPayloadsDoNotPassTheMemoryLimit) {
  if (!std::filesystem::exists(test::daemon_path())) GTEST_SKIP() << "longattn-offload-server not built next to the tests";
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::uint32_t> huge(128u << 20, 256u << 20);  // within the default --max-frame

  test::TempDir dir;
  auto d = start_daemon(dir);
  ASSERT_GT(d->port(), 0) << d->stderr_text();
  const long rss_before_kb = d->status_kb("VmRSS");

  // Strangers: one header each, announcing a huge hello, then nothing.
  std::vector<std::unique_ptr<test::RawTcpPeer>> strangers;
  for (int i = 0; i < 8; ++i) {
    strangers.push_back(std::make_unique<test::RawTcpPeer>(d->port()));
    strangers.back()->send(test::header_only(MsgType::hello, rng(), huge(rng)));
  }
  // Token holders: one header each, announcing a huge append, and a little of its payload.
  std::vector<std::unique_ptr<test::RawTcpPeer>> holders;
  std::vector<std::byte> some(std::size_t{1} << 20);
  for (auto& b : some) b = static_cast<std::byte>(rng());
  for (int i = 0; i < 8; ++i) {
    holders.push_back(std::make_unique<test::RawTcpPeer>(d->port()));
    ASSERT_TRUE(holders.back()->hello(test::kToken, rng()));
    holders.back()->send(test::header_only(MsgType::append, rng(), huge(rng)));
    holders.back()->send(some);
  }
  std::this_thread::sleep_for(700ms);
  const long grown_kb = d->status_kb("VmRSS") - rss_before_kb;
  EXPECT_LT(grown_kb, kMemoryLimitMiB * 1024) << "16 announced frames took the server from " << rss_before_kb << " kB up by " << grown_kb
                                              << " kB; its memory limit is " << kMemoryLimitMiB << " MiB";

  // The strangers were refused (unauthorized) and closed.
  for (auto& s : strangers) {
    const auto message = s->read_error_message();
    EXPECT_NE(message.find("before authentication"), std::string::npos) << message;
    EXPECT_TRUE(s->closed_by_server());
  }

  // A whole frame larger than the limit is read, refused with out_of_capacity under its id, and
  // the connection goes on.
  test::RawTcpPeer big(d->port());
  ASSERT_TRUE(big.hello(test::kToken, rng()));
  const std::uint32_t bytes = static_cast<std::uint32_t>(kMemoryLimitMiB + 8 + static_cast<long>(rng() % 32)) << 20;
  const std::uint64_t id = rng() >> 1;
  std::vector<std::byte> whole = test::header_only(MsgType::append, id, bytes);
  whole.reserve(whole.size() + bytes);
  for (std::uint32_t i = 0; i < bytes; ++i) whole.push_back(static_cast<std::byte>(rng()));
  std::thread writer([&] { big.send(whole); });
  const auto [h, p] = big.read_frame();
  writer.join();
  ASSERT_EQ(h.type, MsgType::error);
  EXPECT_EQ(h.request_id, id);
  const auto e = decode_error(p, Limits{});
  EXPECT_EQ(e.code, ErrorCode::out_of_capacity) << e.message;
  EXPECT_NE(e.message.find("memory limit"), std::string::npos) << e.message;
  big.send(frame(MsgType::stats, 0, id + 1, {}));
  const auto [sh, sp] = big.read_frame();
  EXPECT_EQ(sh.type, MsgType::stats) << "the connection did not stay usable after a refused frame";
  EXPECT_LT(d->status_kb("VmRSS") - rss_before_kb, kMemoryLimitMiB * 1024);
}

}  // namespace
}  // namespace longattn::offload
