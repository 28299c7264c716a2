// Per-connection limits on both transports: a peer that starts a frame (a piece of a header, or a
// header and part of its payload) and stalls is closed after the frame timeout counted from the
// frame's first byte, while an idle authenticated client is not; connections past
// --max-connections get a clear out_of_capacity reply (no retry storm) and everyone within the
// limit keeps being served; strangers that never say hello take none of those slots, and past
// --max-unauthenticated the oldest of them is closed.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <utility>

#include <boost/asio.hpp>

#include "longattn/offload_client.hpp"
#include "offload/transport.hpp"
#include "offload_test_util.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

std::unique_ptr<Server> start(const std::string& transport, int max_connections, double frame_timeout_s, double hello_timeout_s = 10,
                              int max_unauthenticated = 64) {
  ServerOptions o;
  o.max_unauthenticated = max_unauthenticated;
  o.hello_timeout_s = hello_timeout_s;
  o.listen = "127.0.0.1:0";
  o.token = test::kToken;
  o.io_threads = 2;
  o.compute_threads = 1;
  o.transport = transport;
  o.max_connections = max_connections;
  o.frame_timeout_s = frame_timeout_s;
  auto s = std::make_unique<Server>(o);
  s->start();
  return s;
}

// One client's round trip with random data: a single-token KV attends back its value row exactly.
void served(Client& c, std::uint64_t seq, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> val(-2.0f, 2.0f);
  std::vector<float> k(32), v(32), q(64), o(64), lse(2);
  for (auto* x : {&k, &v, &q})
    for (auto& e : *x) e = val(rng);
  c.open({seq, 1, 1, 32, DType::f32}).get();
  c.append(seq, 0, k.data(), v.data(), 1).get();
  std::vector<DecodeQuery> qs{{seq, 1}};
  c.attend(0, 2, 32, qs, q.data(), o.data(), lse.data()).get();
  for (int h = 0; h < 2; ++h)
    for (int d = 0; d < 32; ++d) ASSERT_FLOAT_EQ(o[static_cast<std::size_t>(h * 32 + d)], v[static_cast<std::size_t>(d)]);
  c.drop(seq).get();
}

ClientOptions options(const Server& s, const std::string& transport, std::chrono::milliseconds timeout = 5000ms) {
  ClientOptions co;
  co.servers = {test::addr(s)};
  co.token = test::kToken;
  co.transport = transport;
  co.timeout = timeout;
  return co;
}

std::vector<std::string> transports() {
  std::vector<std::string> t{"tcp"};
  if (ucx_available()) t.push_back("ucx");
  return t;
}

// ---- a raw peer that writes arbitrary bytes, over either transport ----
class RawPeer {
 public:
  RawPeer(const std::string& transport, int port) : transport_(transport) {
    if (transport == "tcp") {
      sock_.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
      sock_.set_option(tcp::no_delay(true));
    } else {
      eng_ = make_ucx_client([](std::function<void()> fn) { fn(); });
      st_ = eng_->stream();
      std::promise<std::string> p;
      st_->connect("127.0.0.1", std::to_string(port), [&](const std::string& e, std::size_t) { p.set_value(e); });
      const auto err = p.get_future().get();
      if (!err.empty()) throw std::runtime_error("UCX connect: " + err);
    }
  }
  ~RawPeer() {
    st_.reset();
    eng_.reset();
  }

  void send(std::vector<std::byte> b) {
    if (transport_ == "tcp") {
      asio::write(sock_, asio::buffer(b));
      return;
    }
    keep_.push_back(std::move(b));  // a UCX send reads the buffer until it completes
    std::promise<std::string> p;
    st_->write(keep_.back().data(), keep_.back().size(), [&](const std::string& e, std::size_t) { p.set_value(e); });
    ASSERT_EQ(p.get_future().get(), "");
  }

  // Reads n bytes within `wait`: "" when they came, "closed: ..." when the server closed the
  // connection, "pending" when nothing happened in time.
  std::string read(void* data, std::size_t n, std::chrono::milliseconds wait) {
    if (transport_ == "tcp") {
      std::string result = "pending";
      io_.restart();
      asio::async_read(sock_, asio::buffer(data, n), [&](boost::system::error_code ec, std::size_t) {
        result = ec ? "closed: " + ec.message() : "";
      });
      io_.run_for(wait);
      if (result == "pending") {
        sock_.cancel();
        io_.restart();
        io_.run();
      }
      return result == "closed: Operation canceled" ? "pending" : result;
    }
    auto p = std::make_shared<std::promise<std::string>>();
    auto f = p->get_future();
    st_->read(data, n, [p](const std::string& e, std::size_t) { p->set_value(e.empty() ? "" : "closed: " + e); });
    if (f.wait_for(wait) != std::future_status::ready) {
      pending_.push_back(std::move(f));  // the read stays posted; the stream's close fails it
      return "pending";
    }
    return f.get();
  }

  std::pair<FrameHeader, std::vector<std::byte>> read_frame(std::chrono::milliseconds wait = 5000ms) {
    std::array<std::byte, kHeaderBytes> h{};
    const auto e = read(h.data(), h.size(), wait);
    if (!e.empty()) throw std::runtime_error("no reply frame: " + e);
    Limits lim;
    lim.max_payload = 0xffffffffu;
    const auto fh = decode_header(h, lim);
    std::vector<std::byte> p(fh.payload_bytes);
    if (!p.empty()) {
      const auto e2 = read(p.data(), p.size(), wait);
      if (!e2.empty()) throw std::runtime_error("reply frame cut short: " + e2);
    }
    return {fh, p};
  }

  void hello() {
    send(frame(MsgType::hello, 0, 1, encode(Hello{test::kToken, 77})));
    ASSERT_EQ(read_frame().first.type, MsgType::hello);
  }

  // Whether the server closes the connection within `wait` (nothing is expected to arrive first).
  bool closed_within(std::chrono::milliseconds wait) {
    std::array<std::byte, 1> b{};
    return read(b.data(), b.size(), wait).rfind("closed", 0) == 0;
  }

 private:
  std::string transport_;
  asio::io_context io_;
  tcp::socket sock_{io_};
  std::unique_ptr<UcxClientEngine> eng_;
  std::unique_ptr<ByteStream> st_;
  std::vector<std::vector<std::byte>> keep_;
  std::vector<std::future<std::string>> pending_;
};

class ConnectionLimits : public ::testing::TestWithParam<std::string> {};

TEST_P(ConnectionLimits, StalledFrameIsClosedAfterFrameTimeoutIdleClientIsNot) {
  const std::string tr = GetParam();
  auto s = start(tr, 64, 0.4);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);

  // An authenticated peer idle for several frame timeouts is kept: the clock runs only in a frame.
  RawPeer idle(tr, s->port());
  idle.hello();
  std::this_thread::sleep_for(1200ms);
  idle.send(frame(MsgType::stats, 0, 2, {}));
  EXPECT_EQ(idle.read_frame().first.type, MsgType::stats) << "an idle authenticated client was dropped";

  // A random prefix of a header (at least one byte, never all of it), then silence.
  std::uniform_int_distribution<std::size_t> cut(1, kHeaderBytes - 1);
  RawPeer half_header(tr, s->port());
  half_header.hello();
  const auto open_frame = frame(MsgType::open, 0, 3, encode(Open{5, 1, 1, 16, DType::f32, 0}));
  half_header.send({open_frame.begin(), open_frame.begin() + static_cast<std::ptrdiff_t>(cut(rng))});

  // A whole header and a random part of its payload, then silence.
  RawPeer half_payload(tr, s->port());
  half_payload.hello();
  std::vector<float> k(16 * 50);
  for (auto& x : k) x = std::uniform_real_distribution<float>(-1, 1)(rng);
  Append ap;
  ap.seq = 9;
  ap.tokens = 50;
  ap.kv_heads = 1;
  ap.head_dim = 16;
  ap.dtype = DType::f32;
  ap.k = std::as_bytes(std::span(k));
  ap.v = ap.k;
  const auto append = frame(MsgType::append, 0, 4, encode(ap));
  std::uniform_int_distribution<std::size_t> part(kHeaderBytes, append.size() - 1);
  half_payload.send({append.begin(), append.begin() + static_cast<std::ptrdiff_t>(part(rng))});

  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(half_header.closed_within(5000ms)) << tr << ": a peer stalled inside a header was not closed";
  EXPECT_TRUE(half_payload.closed_within(5000ms)) << tr << ": a peer stalled inside a payload was not closed";
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3000ms);

  // Others are served, and the idle peer still is.
  Client c(options(*s, tr));
  served(c, 11, rng);
  idle.send(frame(MsgType::stats, 0, 5, {}));
  EXPECT_EQ(idle.read_frame().first.type, MsgType::stats);
}

TEST_P(ConnectionLimits, ConnectionsPastTheLimitGetAClearErrorOthersServed) {
  const std::string tr = GetParam();
  // Refused connections are closed by the peer, or by the hello timeout at the latest.
  auto s = start(tr, 2, 60, 1.0);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);

  auto a = std::make_unique<Client>(options(*s, tr));
  Client b(options(*s, tr));
  served(*a, 1, rng);
  served(b, 2, rng);

  // The third connection is told why, at once, instead of retrying until its timeout.
  Client c(options(*s, tr, 4000ms));
  const auto t0 = std::chrono::steady_clock::now();
  try {
    c.open({3, 1, 1, 32, DType::f32}).get();
    FAIL() << tr << ": a connection past --max-connections was served";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_capacity) << e.what();
    EXPECT_NE(std::string(e.what()).find("max-connections"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2000ms) << "the refusal should not wait for the client's timeout";

  // A raw peer past the limit sees the error frame under its hello's id, then the close.
  {
    RawPeer raw(tr, s->port());
    raw.send(frame(MsgType::hello, 0, 42, encode(Hello{test::kToken, 78})));
    const auto [h, p] = raw.read_frame();
    ASSERT_EQ(h.type, MsgType::error);
    EXPECT_EQ(h.request_id, 42u);
    EXPECT_EQ(decode_error(p, Limits{}).code, ErrorCode::out_of_capacity);
    EXPECT_TRUE(raw.closed_within(3000ms));
  }

  // Those within the limit are unaffected.
  served(*a, 4, rng);
  served(b, 5, rng);

  // A slot freed by a leaving client is taken by a new one (the server notices the close shortly).
  a.reset();
  bool ok = false;
  for (int attempt = 0; attempt < 40 && !ok; ++attempt) {
    Client d(options(*s, tr, 2000ms));
    try {
      served(d, 6, rng);
      ok = true;
    } catch (const Error& e) {
      if (e.code() != ErrorCode::out_of_capacity) throw;
      std::this_thread::sleep_for(100ms);
    }
  }
  EXPECT_TRUE(ok) << tr << ": the slot of a closed connection was not given back";
  EXPECT_EQ(s->metrics_text().find("longattn_offload_errors_total{kind=\"out_of_capacity\"} 0\n"), std::string::npos)
      << "refusals are counted as out_of_capacity errors";
}

TEST_P(ConnectionLimits, FrameTimeoutCountsFromTheFramesFirstByte) {
  const std::string tr = GetParam();
  constexpr auto kFrameTimeout = 1000ms;
  auto s = start(tr, 64, std::chrono::duration<double>(kFrameTimeout).count());
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);

  RawPeer peer(tr, s->port());
  peer.hello();
  std::vector<float> k(16 * 8);
  for (auto& x : k) x = std::uniform_real_distribution<float>(-1, 1)(rng);
  Append ap;
  ap.seq = rng();
  ap.tokens = 8;
  ap.kv_heads = 1;
  ap.head_dim = 16;
  ap.dtype = DType::f32;
  ap.k = std::as_bytes(std::span(k));
  ap.v = ap.k;
  const auto append = frame(MsgType::append, 0, rng(), encode(ap));
  // Part of the header, the rest of it late in the frame timeout, then a part of the payload and
  // silence: the frame's time is up a frame timeout after its first byte, not after its header.
  const auto cut = static_cast<std::ptrdiff_t>(std::uniform_int_distribution<std::size_t>(1, kHeaderBytes - 1)(rng));
  const auto t0 = std::chrono::steady_clock::now();
  peer.send({append.begin(), append.begin() + cut});
  std::this_thread::sleep_for(kFrameTimeout * 7 / 10);
  peer.send({append.begin() + cut, append.begin() + static_cast<std::ptrdiff_t>(kHeaderBytes) + 16});
  EXPECT_TRUE(peer.closed_within(3000ms)) << tr << ": a stalled frame was not closed";
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, kFrameTimeout * 14 / 10) << tr << ": the frame got "
                                           << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                                           << " ms, more than its frame timeout";
  EXPECT_GE(took, kFrameTimeout * 9 / 10) << tr << ": closed before its frame timeout";
}

TEST_P(ConnectionLimits, StrangersTakeNoSlotsOfTokenHoldersAndTheOldestMakeRoom) {
  const std::string tr = GetParam();
  constexpr int kMaxConnections = 4, kMaxUnauthenticated = 3;
  auto s = start(tr, kMaxConnections, 60, 30, kMaxUnauthenticated);
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);

  Client first(options(*s, tr));
  served(first, rng() % (std::uint64_t{1} << 40), rng);
  // More strangers than --max-connections: they connect and say nothing.
  const int strangers_count = kMaxConnections + 4 + static_cast<int>(rng() % 4);
  std::vector<std::unique_ptr<RawPeer>> strangers;
  for (int i = 0; i < strangers_count; ++i) {
    strangers.push_back(std::make_unique<RawPeer>(tr, s->port()));
    std::this_thread::sleep_for(20ms);  // so that the server sees them in this order
  }
  // Token holders are served all the same, up to --max-connections of them.
  std::vector<std::unique_ptr<Client>> holders;
  for (int i = 1; i < kMaxConnections; ++i) {
    holders.push_back(std::make_unique<Client>(options(*s, tr)));
    try {
      served(*holders.back(), rng() % (std::uint64_t{1} << 40), rng);
    } catch (const Error& e) {
      ADD_FAILURE() << tr << ": token holder " << i << " was refused while strangers held connections: " << e.what();
    }
  }
  served(first, rng() % (std::uint64_t{1} << 40), rng);
  // The oldest strangers were closed to make room; the newest still wait for their hello timeout.
  for (int i = 0; i < strangers_count - kMaxUnauthenticated - kMaxConnections; ++i)
    EXPECT_TRUE(strangers[static_cast<std::size_t>(i)]->closed_within(3000ms)) << tr << ": stranger " << i << " was kept";
  EXPECT_FALSE(strangers.back()->closed_within(300ms)) << tr << ": the newest stranger was closed before its hello timeout";
}

INSTANTIATE_TEST_SUITE_P(Transports, ConnectionLimits, ::testing::ValuesIn(transports()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
}  // namespace longattn::offload

namespace longattn::offload {
namespace {

// A client on the wrong transport hears nothing back; its error says which transport it tried.
TEST(OffloadTransportMismatch, TcpClientAgainstAUcxServerIsToldAboutTheTransport) {
  if (!ucx_available()) GTEST_SKIP() << "built without UCX";
  auto s = start("ucx", 8, 60);
  std::mt19937_64 rng(::longattn::test::fresh_seed());
  Client c(options(*s, "tcp", 1000ms));
  try {
    c.open({rng() % 1000, 1, 1, 32, DType::f32}).get();
    FAIL() << "a TCP client was served by a UCX server";
  } catch (const Error& e) {
    EXPECT_TRUE(e.code() == ErrorCode::timeout || e.code() == ErrorCode::communication) << e.what();
    EXPECT_NE(std::string(e.what()).find("--transport tcp"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace longattn::offload
