// Start-up checks and descriptor exhaustion of the daemon: a token file that is not a regular file
// (a FIFO would block the start forever) is refused at once with what to do; a process out of file
// descriptors backs off instead of spinning on accept, logs once per interval, and warns at start
// when its open-file limit is below what --max-connections needs.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "daemon_process.hpp"
#include "offload/token_file.hpp"
#include "offload_test_util.hpp"
#include "raw_tcp_peer.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

using namespace std::chrono_literals;

std::size_t count_lines_with(const std::string& text, const std::string& what) {
  std::istringstream in(text);
  std::string line;
  std::size_t n = 0;
  while (std::getline(in, line)) n += line.find(what) != std::string::npos ? 1 : 0;
  return n;
}

std::string random_token(std::mt19937_64& rng) {
  std::string t;
  for (int i = 0; i < 32; ++i) t += "0123456789abcdef"[rng() % 16];
  return t;
}

TEST(OffloadTokenFile, OnlyAPrivateRegularFileWithAToken) {
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  test::TempDir dir;
  const std::string token = random_token(rng);
  const std::string good = test::write_token_file(dir, "  " + token + "\n");
  EXPECT_EQ(read_token_file(good), token);

  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  try {
    read_token_file(fifo);
    ADD_FAILURE() << "a FIFO was accepted as token file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_token_file(dir.path.string()), Error);  // a directory
  EXPECT_THROW(read_token_file(dir.file("missing")), Error);

  const std::string shared = dir.file("shared");
  std::ofstream(shared) << token << "\n";
  ::chmod(shared.c_str(), 0644);
  try {
    read_token_file(shared);
    ADD_FAILURE() << "a world-readable token file was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chmod 600"), std::string::npos) << e.what();
  }
  const std::string short_one = dir.file("short");
  std::ofstream(short_one) << token.substr(0, 1 + rng() % 15) << "\n";
  ::chmod(short_one.c_str(), 0600);
  EXPECT_THROW(read_token_file(short_one), Error);
}

TEST(OffloadDaemonLimits, FifoTokenFileIsRefusedAtOnce) {
  if (!std::filesystem::exists(test::daemon_path())) GTEST_SKIP() << "longattn-offload-server not built next to the tests";
  test::TempDir dir;
  const std::string fifo = dir.file("token");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  test::Daemon d({"--listen", "127.0.0.1:0", "--token-file", fifo}, dir.file("stderr"), 0, 5000ms);
  EXPECT_EQ(d.port(), 0);
  const int rc = d.wait_exit(5000ms);
  EXPECT_EQ(rc, 2) << "the daemon did not refuse a FIFO token file within 5 s (-1: still blocked)";
  const std::string err = d.stderr_text();
  EXPECT_NE(err.find("not a regular file"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << "one readable line: " << err;
}

TEST(OffloadDaemonLimits, OutOfDescriptorsBacksOffAndLogsOncePerInterval) {
  if (!std::filesystem::exists(test::daemon_path())) GTEST_SKIP() << "longattn-offload-server not built next to the tests";
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  test::TempDir dir;
  const std::string token = test::write_token_file(dir, test::kToken);
  constexpr long kOpenFiles = 48;  // soft and hard: the daemon cannot raise it
  const int max_connections = 200 + static_cast<int>(rng() % 100);
  test::Daemon d({"--listen", "127.0.0.1:0", "--token-file", token, "--threads", "1", "--io-threads", "1", "--max-connections",
                  std::to_string(max_connections)},
                 dir.file("stderr"), kOpenFiles);
  ASSERT_GT(d.port(), 0) << d.stderr_text();
  EXPECT_NE(d.stderr_text().find("open-file limit is " + std::to_string(kOpenFiles)), std::string::npos)
      << "no warning at start that the open-file limit is below --max-connections: " << d.stderr_text();

  // More connections than the daemon has descriptors for: the rest wait in its listen queue.
  std::vector<std::unique_ptr<test::RawTcpPeer>> peers;
  for (long i = 0; i < kOpenFiles + 20; ++i) peers.push_back(std::make_unique<test::RawTcpPeer>(d.port()));
  std::this_thread::sleep_for(300ms);
  const double cpu0 = d.cpu_seconds();
  std::this_thread::sleep_for(2000ms);
  const double cpu = d.cpu_seconds() - cpu0;
  EXPECT_LT(cpu, 0.5) << "the daemon used " << cpu << " s of CPU in 2 s while out of descriptors (spinning on accept?)";
  const std::string err = d.stderr_text();
  const auto accept_lines = count_lines_with(err, "accept");
  EXPECT_GE(accept_lines, 1u) << "running out of descriptors was not reported";
  EXPECT_LE(accept_lines, 3u) << "accept failures are logged once per interval, got " << accept_lines << " lines";
  EXPECT_NE(err.find("file descriptors"), std::string::npos) << err.substr(0, 2000);
}

}  // namespace
}  // namespace longattn::offload
