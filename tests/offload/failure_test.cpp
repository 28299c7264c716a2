// Hostile and failing peers: every malformed frame gets an error reply (where one is possible) and
// a closed connection while the server keeps serving others; requests before authentication are
// refused; a killed or hung server makes the client fail within its timeout, never hang; the
// daemon itself (as a child process) shuts down gracefully on SIGTERM and dies cleanly on SIGKILL.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>
#include <utility>

#include <boost/asio.hpp>

#include "longattn/offload_client.hpp"
#include "daemon_process.hpp"
#include "offload_test_util.hpp"
#include "raw_tcp_peer.hpp"

namespace longattn::offload {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

// A raw blocking connection for writing arbitrary bytes.
class Raw : public test::RawTcpPeer {
 public:
  using RawTcpPeer::RawTcpPeer;
  void hello() { ASSERT_TRUE(RawTcpPeer::hello(test::kToken, 5)); }
};

std::vector<std::byte> raw_header(std::uint32_t magic, std::uint16_t version, std::uint16_t type, std::uint32_t flags, std::uint64_t id,
                                  std::uint32_t len) {
  FrameHeader h;
  h.magic = magic;
  h.version = version;
  h.type = static_cast<MsgType>(type);
  h.flags = flags;
  h.request_id = id;
  h.payload_bytes = len;
  const auto b = encode_header(h);
  return {b.begin(), b.end()};
}

// Closing an acceptor does not wake a thread blocked in accept() on Linux; a connection does.
void wake_blocked_accept(const tcp::acceptor& acc) {
  asio::io_context io;
  tcp::socket poke(io);
  boost::system::error_code ec;
  poke.connect(acc.local_endpoint(), ec);
}

void expect_error_then_close(Raw& r, ErrorCode want, const char* what) {
  SCOPED_TRACE(what);
  const auto [h, p] = r.read_frame();
  ASSERT_FALSE(test::RawTcpPeer::is_closed_marker(h)) << "closed without an error reply";
  ASSERT_EQ(h.type, MsgType::error) << "no error reply";
  EXPECT_EQ(decode_error(p, Limits{}).code, want);
  EXPECT_TRUE(r.closed_by_server());
}

// A client that must still be served after each hostile connection.
void still_serves(const std::string& where) {
  ClientOptions co;
  co.servers = {where};
  co.token = test::kToken;
  co.timeout = 5s;
  Client c(co);
  c.open({1, 1, 1, 16, DType::f32}).get();
  std::vector<float> k(16, 1.0f), q(16, 1.0f), o(16), lse(1);
  c.append(1, 0, k.data(), k.data(), 1).get();
  std::vector<DecodeQuery> qs{{1, 1}};
  c.attend(0, 1, 16, qs, q.data(), o.data(), lse.data()).get();
  EXPECT_FLOAT_EQ(o[0], 1.0f);
  c.drop(1).get();
}

TEST(OffloadFailures, MalformedFramesCloseOnlyThatConnection) {
  auto s = test::start_server();
  const int port = s->port();
  Raw bystander(port);  // an authenticated connection that stays open throughout
  bystander.hello();

  {
    Raw r(port);
    r.send(raw_header(0xdeadbeef, kVersion, 1, 0, 1, 0));
    expect_error_then_close(r, ErrorCode::protocol, "bad magic");
  }
  {
    Raw r(port);
    r.send(raw_header(kMagic, 9, 1, 0, 1, 0));
    expect_error_then_close(r, ErrorCode::protocol, "wrong version");
  }
  {
    Raw r(port);
    r.hello();
    r.send(raw_header(kMagic, kVersion, 1, 0, 2, 0xfffffff0u));
    expect_error_then_close(r, ErrorCode::protocol, "oversized");
  }
  {
    Raw r(port);
    r.hello();
    r.send(raw_header(kMagic, kVersion, 55, 0, 2, 0));
    expect_error_then_close(r, ErrorCode::protocol, "unknown type");
  }
  {
    Raw r(port);
    r.hello();
    r.send(raw_header(kMagic, kVersion, 2, kFlagResponse, 2, 0));
    expect_error_then_close(r, ErrorCode::protocol, "a reply sent to the server");
  }
  {
    Raw r(port);
    r.hello();
    auto b = frame(MsgType::open, 0, 3, encode(Open{1, 1, 0, 64, DType::bf16, 0}));  // zero kv heads
    r.send(b);
    expect_error_then_close(r, ErrorCode::protocol, "bad field");
  }
  {
    Raw r(port);
    r.hello();
    // Append whose tokens * heads * dim overflows 64 bits.
    Append a;
    a.seq = 1;
    a.tokens = 0xffffffffu;
    a.kv_heads = 1024;
    a.head_dim = 512;
    a.dtype = DType::f32;
    r.send(frame(MsgType::append, 0, 4, encode(a)));
    expect_error_then_close(r, ErrorCode::protocol, "overflowing length");
  }
  {
    Raw r(port);
    r.hello();
    // Header promises 100 bytes; only the header and a few bytes arrive, then the writer goes away.
    auto b = raw_header(kMagic, kVersion, 2, 0, 5, 100);
    b.resize(b.size() + 10);
    r.send(b);
    r.socket().shutdown(tcp::socket::shutdown_send);
    EXPECT_TRUE(r.closed_by_server());
  }
  {
    Raw r(port);
    r.send(frame(MsgType::open, 0, 1, encode(Open{1, 1, 1, 64, DType::bf16, 0})));  // before hello
    expect_error_then_close(r, ErrorCode::unauthorized, "unauthenticated");
  }
  {
    Raw r(port);
    r.send(frame(MsgType::hello, 0, 1, encode(Hello{"wrong", 1})));
    expect_error_then_close(r, ErrorCode::unauthorized, "wrong token");
  }
  {
    // Valid frame, bad request (unknown sequence): an error reply, and the connection stays usable.
    Raw r(port);
    r.hello();
    r.send(frame(MsgType::drop, 0, 6, encode(Drop{12345})));
    EXPECT_EQ(r.read_frame().first.type, MsgType::drop);
    std::vector<float> q(16);
    Attend at;
    at.q_heads = 1;
    at.head_dim = 16;
    at.seqs = {{999, 1, 0}};
    at.total_q = 1;
    at.q = std::as_bytes(std::span(q));
    r.send(frame(MsgType::attend, 0, 7, encode(at)));
    const auto [h, p] = r.read_frame();
    EXPECT_EQ(h.type, MsgType::error);
    EXPECT_EQ(decode_error(p, Limits{}).code, ErrorCode::invalid_argument);
    r.send(frame(MsgType::stats, 0, 8, {}));
    EXPECT_EQ(r.read_frame().first.type, MsgType::stats);
  }
  // The bystander was never disturbed, and new clients are served.
  bystander.send(frame(MsgType::stats, 0, 9, {}));
  EXPECT_EQ(bystander.read_frame().first.type, MsgType::stats);
  still_serves(test::addr(*s));
}

TEST(OffloadFailures, KilledServerFailsWithinTimeout) {
  auto s1 = test::start_server(), s2 = test::start_server();
  ClientOptions co;
  co.servers = {test::addr(*s1), test::addr(*s2)};
  co.token = test::kToken;
  co.timeout = 1500ms;
  Client c(co);
  std::vector<float> k(4 * 2 * 32, 0.5f), q(8 * 32, 0.1f), o(q.size()), lse(8);
  for (std::uint64_t id = 0; id < 2; ++id) {  // one sequence on each server
    c.open({id, 1, 2, 32, DType::f32}).get();
    c.append(id, 0, k.data(), k.data(), 4).get();
  }
  std::vector<DecodeQuery> both{{0, 1}, {1, 1}};
  std::vector<float> o2(2 * 8 * 32), lse2(16);
  std::vector<float> q2(2 * 8 * 32, 0.1f);
  c.attend(0, 8, 32, both, q2.data(), o2.data(), lse2.data()).get();

  s2->kill();  // sequence 1 lives on server 2 (id % 2)
  std::fill(o2.begin(), o2.end(), 42.0f);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    c.attend(0, 8, 32, both, q2.data(), o2.data(), lse2.data()).get();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_TRUE(e.code() == ErrorCode::communication || e.code() == ErrorCode::timeout) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1700ms);
  EXPECT_EQ(o2[0], 42.0f);  // nothing half-written into the caller's output
  // The surviving server still answers for its sequence.
  std::vector<DecodeQuery> one{{0, 1}};
  c.attend(0, 8, 32, one, q.data(), o.data(), lse.data()).get();
}

// A TCP proxy whose first connection dies just before the reply to the 4th request (the attend)
// reaches the client: the server did the work, the client saw nothing, and must retry the attend
// (idempotent) on a new connection.
TEST(OffloadFailures, IdempotentAttendIsRetriedAfterALostConnection) {
  auto s = test::start_server();
  asio::io_context io;
  tcp::acceptor acc(io, {asio::ip::make_address("127.0.0.1"), 0});
  const int upstream = s->port();
  std::atomic<bool> stop{false};
  // The pump threads are joined before the test ends: a detached thread still holding a socket
  // when the io_context dies frees it twice at exit.
  std::vector<std::thread> pumps;
  std::thread proxy([&] {
    for (int conn = 0;; ++conn) {
      boost::system::error_code ec;
      auto down = std::make_shared<tcp::socket>(io);
      acc.accept(*down, ec);
      if (ec || stop) return;
      auto up = std::make_shared<tcp::socket>(io);
      up->connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(upstream)}, ec);
      pumps.emplace_back([down, up] {  // client -> server
        std::array<char, 65536> b;
        boost::system::error_code e;
        for (;;) {
          const auto n = down->read_some(asio::buffer(b), e);
          if (e) break;
          asio::write(*up, asio::buffer(b.data(), n), e);
          if (e) break;
        }
        up->shutdown(tcp::socket::shutdown_both, e);
      });
      pumps.emplace_back([down, up, first = conn == 0] {  // server -> client; the first connection stops after 96 bytes
        std::array<char, 65536> b;
        boost::system::error_code e;
        std::size_t passed = 0;
        for (;;) {
          const auto n = up->read_some(asio::buffer(b), e);
          if (e) break;
          if (first && passed + n > 96) {  // hello (40) + open (24) + append (32) replies went through
            down->shutdown(tcp::socket::shutdown_both, e);  // FIN now (close alone waits for the other thread's read)
            up->shutdown(tcp::socket::shutdown_both, e);
            return;
          }
          passed += n;
          asio::write(*down, asio::buffer(b.data(), n), e);
          if (e) break;
        }
        down->shutdown(tcp::socket::shutdown_both, e);
      });
    }
  });
  ClientOptions co;
  co.servers = {"127.0.0.1:" + std::to_string(acc.local_endpoint().port())};
  co.token = test::kToken;
  co.timeout = 5s;
  {
    Client c(co);
    std::vector<float> k(16, 0.5f), q(16, 1.0f), o(16, 0.0f), lse(1);
    try {
      c.open({1, 1, 1, 16, DType::f32}).get();
      c.append(1, 0, k.data(), k.data(), 1).get();
      std::vector<DecodeQuery> qs{{1, 1}};
      c.attend(0, 1, 16, qs, q.data(), o.data(), lse.data()).get();
      EXPECT_FLOAT_EQ(o[3], 0.5f);
      EXPECT_GE(c.stats().retries, 1u);
    } catch (const Error& e) {
      ADD_FAILURE() << e.what();
    }
  }
  stop = true;
  wake_blocked_accept(acc);  // so the proxy sees `stop`
  proxy.join();
  for (auto& t : pumps) t.join();  // the client is gone, so every pump sees EOF and ends
}

TEST(OffloadFailures, HungServerTimesOut) {
  // Accepts connections and never says a word.
  asio::io_context io;
  tcp::acceptor acc(io, {asio::ip::make_address("127.0.0.1"), 0});
  std::vector<tcp::socket> held;
  std::atomic<bool> stop{false};
  std::thread t([&] {
    while (!stop) {
      boost::system::error_code ec;
      tcp::socket s(io);
      acc.accept(s, ec);
      if (ec) return;
      held.push_back(std::move(s));
    }
  });
  ClientOptions co;
  co.servers = {"127.0.0.1:" + std::to_string(acc.local_endpoint().port())};
  co.token = test::kToken;
  co.timeout = 800ms;
  const auto t0 = std::chrono::steady_clock::now();
  {
    Client c(co);
    try {
      c.open({1, 1, 1, 16, DType::f32}).get();
      FAIL() << "expected a timeout";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::timeout) << e.what();
    }
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1500ms);
  stop = true;
  wake_blocked_accept(acc);
  t.join();
}

TEST(OffloadFailures, NoServerAtAll) {
  // A port nobody listens on: a communication error after the retries, well within the timeout.
  asio::io_context io;
  tcp::acceptor acc(io, {asio::ip::make_address("127.0.0.1"), 0});
  const int port = acc.local_endpoint().port();
  acc.close();
  ClientOptions co;
  co.servers = {"127.0.0.1:" + std::to_string(port)};
  co.token = test::kToken;
  co.timeout = 3s;
  Client c(co);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    c.open({1, 1, 1, 16, DType::f32}).get();
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(e.code() == ErrorCode::communication || e.code() == ErrorCode::timeout) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3100ms);
}

std::unique_ptr<test::Daemon> spawn_daemon(const test::TempDir& dir, const std::string& token_file) {
  return std::make_unique<test::Daemon>(
      std::vector<std::string>{"--listen", "127.0.0.1:0", "--token-file", token_file, "--threads", "1", "--memory-limit", "64M"},
      dir.file("stderr"));
}

TEST(OffloadFailures, DaemonSigtermIsGracefulAndSigkillIsReported) {
  if (!std::filesystem::exists(test::daemon_path())) GTEST_SKIP() << "longattn-offload-server not built next to the tests";
  test::TempDir dir;
  const auto token_file = test::write_token_file(dir, test::kToken);

  // SIGTERM: the daemon finishes, prints its RESULT line and exits 0.
  {
    auto d = spawn_daemon(dir, token_file);
    ASSERT_GT(d->port(), 0) << "the daemon did not start: " << d->stderr_text();
    still_serves("127.0.0.1:" + std::to_string(d->port()));
    ::kill(d->pid(), SIGTERM);
    std::string line, result;
    while (!(line = d->read_line(10s)).empty())
      if (line.rfind("RESULT ", 0) == 0) result = line;
    EXPECT_EQ(d->wait_exit(10s), 0);
    EXPECT_NE(result.find("\"requests\":"), std::string::npos) << result;
  }
  // SIGKILL mid-run: the client's next request fails within its timeout.
  {
    auto d = spawn_daemon(dir, token_file);
    ASSERT_GT(d->port(), 0) << "the daemon did not start: " << d->stderr_text();
    ClientOptions co;
    co.servers = {"127.0.0.1:" + std::to_string(d->port())};
    co.token = test::kToken;
    co.timeout = 2s;
    Client c(co);
    std::vector<float> k(2 * 32, 0.25f), q(4 * 32, 0.5f), o(q.size()), lse(4);
    c.open({3, 1, 2, 32, DType::f32}).get();
    c.append(3, 0, k.data(), k.data(), 1).get();
    std::vector<DecodeQuery> qs{{3, 1}};
    c.attend(0, 4, 32, qs, q.data(), o.data(), lse.data()).get();
    ::kill(d->pid(), SIGKILL);
    EXPECT_EQ(d->wait_exit(10s), 128 + SIGKILL);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      c.attend(0, 4, 32, qs, q.data(), o.data(), lse.data()).get();
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_TRUE(e.code() == ErrorCode::communication || e.code() == ErrorCode::timeout) << e.what();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 2200ms);
  }
}

}  // namespace
}  // namespace longattn::offload
