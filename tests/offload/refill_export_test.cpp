// The export request that a refill reads KV with (protocol version 3): its frames round-trip and
// every defect is refused like any other frame's; peers of versions 1 and 2 are unaffected; and a
// server answers exports only after hello, with what the append stored, in replies that never pass
// its payload limit, refusing ranges it does not hold and frames that are malformed or too large;
// a --device cuda store exports the same way (where a GPU exists).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "longattn/backend.hpp"
#include "longattn/dtype_convert.hpp"
#include "offload/kv_store.hpp"
#include "offload/protocol.hpp"
#include "offload/server.hpp"
#include "offload_test_util.hpp"
#include "raw_tcp_peer.hpp"
#include "support/test_util.hpp"

namespace longattn::offload {
namespace {

template <class F>
std::string refusal(F&& f, ErrorCode want = ErrorCode::protocol) {
  try {
    f();
  } catch (const Error& e) {
    if (e.code() == want) return e.what();
    return std::string("wrong code: ") + e.what();
  }
  return "not refused";
}

std::vector<std::byte> random_bytes(std::mt19937_64& rng, std::size_t n) {
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng() & 0xff);
  return out;
}

TEST(OffloadExport, VersionThreeOnlyForExport) {
  EXPECT_EQ(kVersion, 3);
  EXPECT_EQ(version_of(MsgType::export_kv), 3);
  EXPECT_EQ(version_of(MsgType::append_attend), 2);
  for (auto t : {MsgType::hello, MsgType::open, MsgType::append, MsgType::attend, MsgType::drop, MsgType::stats})
    EXPECT_EQ(version_of(t), 1) << to_string(t);  // what version-1 peers send and read
  // An export announced as a version-2 frame is refused; a version-1 hello still decodes.
  FrameHeader h;
  h.type = MsgType::export_kv;
  h.version = 2;
  const auto b = encode_header(h);
  EXPECT_NE(refusal([&] { decode_header(b, Limits{}); }).find("needs protocol version 3"), std::string::npos);
  h.type = MsgType::hello;
  h.version = 1;
  EXPECT_EQ(decode_header(encode_header(h), Limits{}).type, MsgType::hello);
}

TEST(OffloadExport, RoundTrip) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Export e;
  e.seq = rng();
  e.layer = static_cast<std::uint32_t>(rng() % 4096);
  e.start = static_cast<std::int64_t>(rng() % (std::uint64_t{1} << 40));
  e.tokens = static_cast<std::uint32_t>(1 + rng() % 0xfffffffeu);
  const auto got = decode_export(encode(e), Limits{});
  EXPECT_EQ(got.seq, e.seq);
  EXPECT_EQ(got.layer, e.layer);
  EXPECT_EQ(got.start, e.start);
  EXPECT_EQ(got.tokens, e.tokens);

  ExportReply r;
  r.kv.seq = rng();
  r.kv.layer = static_cast<std::uint32_t>(rng() % 64);
  r.kv.tokens = static_cast<std::uint32_t>(1 + rng() % 9);
  r.kv.start = static_cast<std::int64_t>(rng() % 1000);
  r.length = r.kv.start + r.kv.tokens + static_cast<std::int64_t>(rng() % 5);
  r.kv.kv_heads = static_cast<std::uint32_t>(1 + rng() % 4);
  r.kv.head_dim = static_cast<std::uint32_t>(1 + rng() % 64);
  r.kv.dtype = DType::f16;
  const auto k = random_bytes(rng, static_cast<std::size_t>(r.kv.tokens) * r.kv.kv_heads * r.kv.head_dim * 2);
  const auto v = random_bytes(rng, k.size());
  r.kv.k = k;
  r.kv.v = v;
  const auto payload = encode(r);
  EXPECT_EQ(payload.size(), kExportReplyHeadBytes + 2 * k.size());
  const auto back = decode_export_reply(payload, Limits{});
  EXPECT_EQ(back.length, r.length);
  EXPECT_EQ(back.kv.seq, r.kv.seq);
  EXPECT_EQ(back.kv.layer, r.kv.layer);
  EXPECT_EQ(back.kv.start, r.kv.start);
  EXPECT_EQ(back.kv.tokens, r.kv.tokens);
  EXPECT_EQ(back.kv.dtype, DType::f16);
  ASSERT_EQ(back.kv.k.size(), k.size());
  EXPECT_EQ(std::memcmp(back.kv.k.data(), k.data(), k.size()), 0);
  EXPECT_EQ(std::memcmp(back.kv.v.data(), v.data(), v.size()), 0);
  // As whole frames, request and reply.
  validate_frame(frame(MsgType::export_kv, 0, 7, encode(e)), Limits{});
  validate_frame(frame(MsgType::export_kv, kFlagResponse, 7, payload), Limits{});
}

TEST(OffloadExport, DefectsRefused) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const Limits lim;
  Export e{rng(), 3, 17, 5};
  const auto good = encode(e);
  for (std::size_t n = 0; n < good.size(); ++n)
    EXPECT_NE(refusal([&] { decode_export(std::span(good).first(n), lim); }), "not refused") << "truncated to " << n;
  auto longer = good;
  longer.push_back(std::byte{0});
  EXPECT_NE(refusal([&] { decode_export(longer, lim); }).find("trailing"), std::string::npos);
  auto bad = [&](Export m) { return refusal([&] { decode_export(encode(m), lim); }); };
  EXPECT_NE(bad({1, lim.max_layers, 0, 1}).find("layer"), std::string::npos);
  EXPECT_NE(bad({1, 0, -1, 1}).find("start"), std::string::npos);
  EXPECT_NE(bad({1, 0, lim.max_position + 1, 1}).find("start"), std::string::npos);
  EXPECT_NE(bad({1, 0, 0, 0}).find("tokens"), std::string::npos);

  ExportReply r;
  r.length = 10;
  r.kv.seq = rng();
  r.kv.tokens = 2;
  r.kv.start = 8;
  r.kv.kv_heads = 2;
  r.kv.head_dim = 8;
  r.kv.dtype = DType::bf16;
  const auto k = random_bytes(rng, 2 * 2 * 8 * 2), v = random_bytes(rng, k.size());
  r.kv.k = k;
  r.kv.v = v;
  const auto reply = encode(r);
  for (std::size_t n = 0; n < reply.size(); ++n)
    EXPECT_NE(refusal([&] { decode_export_reply(std::span(reply).first(n), lim); }), "not refused") << "truncated to " << n;
  r.length = 9;  // tokens [8, 10) past a length of 9
  EXPECT_NE(refusal([&] { decode_export_reply(encode(r), lim); }).find("past the layer's length"), std::string::npos);
  r.length = 0;
  EXPECT_NE(refusal([&] { decode_export_reply(encode(r), lim); }).find("length"), std::string::npos);
  // An export frame larger than the payload limit is refused at its header.
  Limits small;
  small.max_payload = 16;
  FrameHeader h;
  h.version = 3;
  h.type = MsgType::export_kv;
  h.payload_bytes = 24;
  EXPECT_NE(refusal([&] { decode_header(encode_header(h), small); }).find("exceeds the limit"), std::string::npos);
}

// Server side, over a raw connection: what no client would send.
struct ExportServer {
  std::unique_ptr<Server> server;
  explicit ExportServer(std::uint32_t max_payload) {
    ServerOptions o;
    o.token = test::kToken;
    o.io_threads = 1;
    o.compute_threads = 1;
    o.memory_limit = std::size_t{64} << 20;
    o.limits.max_payload = max_payload;
    server = std::make_unique<Server>(o);
    server->start();
  }
};

std::vector<std::byte> export_frame(std::uint64_t id, const Export& m) { return frame(MsgType::export_kv, 0, id, encode(m)); }

TEST(OffloadExport, ServerAnswersInBoundedChunks) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  // 2 kv heads x 32 x bf16: 256 bytes of k and v per token, so about 31 tokens per 8 KiB reply.
  const std::uint32_t max_payload = 8192;
  ExportServer s(max_payload);
  test::RawTcpPeer peer(s.server->port());

  // Before hello: refused, and the connection closed.
  ASSERT_TRUE(peer.send(export_frame(1, {1, 0, 0, 1})));
  EXPECT_NE(peer.read_error_message().find("unauthorized"), std::string::npos);
  test::RawTcpPeer p(s.server->port());
  ASSERT_TRUE(p.hello(test::kToken, 99));

  const std::uint32_t kv_heads = 2, head_dim = 32, tokens = 100;
  Open open;
  open.seq = 5;
  open.layers = 2;
  open.kv_heads = kv_heads;
  open.head_dim = head_dim;
  open.dtype = DType::bf16;
  ASSERT_TRUE(p.send(frame(MsgType::open, 0, 2, encode(open))));
  ASSERT_EQ(p.read_frame().first.type, MsgType::open);
  // Finite bf16 values: random low bytes under a fixed exponent.
  std::vector<std::byte> k(static_cast<std::size_t>(tokens) * kv_heads * head_dim * 2), v(k.size());
  for (std::size_t i = 0; i < k.size(); i += 2) {
    k[i] = static_cast<std::byte>(rng() & 0xff);
    k[i + 1] = static_cast<std::byte>(0x3f);
    v[i] = static_cast<std::byte>(rng() & 0xff);
    v[i + 1] = static_cast<std::byte>(0xbf);
  }
  Append a;
  a.seq = 5;
  a.layer = 1;
  a.tokens = tokens;
  a.kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.dtype = DType::bf16;
  // Appended in pieces small enough for the limit.
  const std::size_t row = static_cast<std::size_t>(kv_heads) * head_dim * 2;
  for (std::uint32_t at = 0; at < tokens; at += 10) {
    a.start = at;
    a.tokens = 10;
    a.k = std::span(k).subspan(at * row, 10 * row);
    a.v = std::span(v).subspan(at * row, 10 * row);
    ASSERT_TRUE(p.send(append_frame(3, a)));
    ASSERT_EQ(p.read_frame().first.type, MsgType::append);
  }

  // Asked for everything from a random start: each reply stays under the limit, the copies equal
  // what was appended.
  std::uniform_int_distribution<std::int64_t> first(0, tokens - 1);
  std::int64_t at = first(rng);
  int replies = 0;
  while (at < tokens) {
    ASSERT_TRUE(p.send(export_frame(4, {5, 1, at, 0xffffffffu})));
    const auto [h, payload] = p.read_frame();
    ASSERT_EQ(h.type, MsgType::export_kv) << (h.type == MsgType::error ? decode_error(payload, Limits{}).message : "");
    EXPECT_LE(payload.size(), max_payload);
    const auto r = decode_export_reply(payload, Limits{});
    EXPECT_EQ(r.length, tokens);
    EXPECT_EQ(r.kv.start, at);
    ASSERT_GE(r.kv.tokens, 1u);
    EXPECT_EQ(std::memcmp(r.kv.k.data(), k.data() + static_cast<std::size_t>(at) * row, r.kv.k.size()), 0);
    EXPECT_EQ(std::memcmp(r.kv.v.data(), v.data() + static_cast<std::size_t>(at) * row, r.kv.v.size()), 0);
    at += r.kv.tokens;
    ++replies;
  }
  EXPECT_EQ(at, tokens);
  EXPECT_GE(replies, 1);

  // Ranges it does not hold: clear errors, and the connection stays.
  ASSERT_TRUE(p.send(export_frame(5, {5, 1, tokens, 1})));
  EXPECT_NE(p.read_error_message().find("holds 100 tokens"), std::string::npos);
  ASSERT_TRUE(p.send(export_frame(6, {5, 0, 0, 1})));
  EXPECT_NE(p.read_error_message().find("holds 0 tokens"), std::string::npos);
  ASSERT_TRUE(p.send(export_frame(7, {6, 0, 0, 1})));
  EXPECT_NE(p.read_error_message().find("not open"), std::string::npos);
  ASSERT_TRUE(p.send(export_frame(8, {5, 2, 0, 1})));
  EXPECT_NE(p.read_error_message().find("layers"), std::string::npos);
  // Another client id cannot read it.
  test::RawTcpPeer stranger(s.server->port());
  ASSERT_TRUE(stranger.hello(test::kToken, 100));
  ASSERT_TRUE(stranger.send(export_frame(9, {5, 1, 0, 1})));
  EXPECT_NE(stranger.read_error_message().find("not open"), std::string::npos);

  // A malformed export (a byte short) ends the connection; so does one announcing too much.
  auto shortened = export_frame(10, {5, 1, 0, 1});
  shortened.pop_back();
  shortened[20] = static_cast<std::byte>(23);
  ASSERT_TRUE(p.send(shortened));
  EXPECT_NE(p.read_error_message().find("malformed frame: export"), std::string::npos);
  EXPECT_TRUE(p.closed_by_server());
  test::RawTcpPeer q(s.server->port());
  ASSERT_TRUE(q.hello(test::kToken, 99));
  FrameHeader big;
  big.version = 3;
  big.type = MsgType::export_kv;
  big.request_id = 11;
  big.payload_bytes = max_payload + 1;
  const auto hb = encode_header(big);
  ASSERT_TRUE(q.send({hb.begin(), hb.end()}));
  EXPECT_NE(q.read_error_message().find("exceeds the limit"), std::string::npos);
}

// One token larger than what a reply may carry: a clear error naming the flag to raise, never a
// reply past the limit.
TEST(OffloadExport, TokenLargerThanTheReplyRefused) {
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  KvStore store(KvStoreOptions{});
  Open open;
  open.seq = 1;
  open.layers = 1;
  open.kv_heads = 4;
  open.head_dim = 128;
  open.dtype = DType::f32;  // 2 KiB of k per token, 4 KiB with v
  store.open(7, open);
  std::vector<float> k(4 * 128), v(k.size());
  std::uniform_real_distribution<float> val(-1, 1);
  for (auto& x : k) x = val(rng);
  for (auto& x : v) x = val(rng);
  Append a;
  a.seq = 1;
  a.tokens = 1;
  a.kv_heads = 4;
  a.head_dim = 128;
  a.dtype = DType::f32;
  a.k = std::as_bytes(std::span(k));
  a.v = std::as_bytes(std::span(v));
  store.append(7, a);
  std::vector<std::byte> kb, vb;
  EXPECT_NE(refusal([&] { store.read(7, {1, 0, 0, 1}, 4095, kb, vb); }, ErrorCode::invalid_argument).find("raise --max-frame"),
            std::string::npos);
  const auto r = store.read(7, {1, 0, 0, 5}, 4096, kb, vb);
  EXPECT_EQ(r.kv.tokens, 1u);
  EXPECT_EQ(std::memcmp(r.kv.k.data(), k.data(), 2048), 0);
  EXPECT_EQ(std::memcmp(r.kv.v.data(), v.data(), 2048), 0);
}

// A --device cuda store exports what was appended, across the growths of its GPU buffers (runs
// where a GPU and the cuda backend exist; skipped elsewhere).
TEST(OffloadExport, GpuStoreExportsWhatWasAppended) {
  const auto names = available_backends();
  if (std::find(names.begin(), names.end(), "cuda") == names.end()) GTEST_SKIP() << "no cuda backend in this build or no GPU on this machine";
  const auto seed = ::longattn::test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  KvStoreOptions opt;
  opt.device = "cuda";
  KvStore store(opt);
  Open open;
  open.seq = 3;
  open.layers = 2;
  open.kv_heads = 2;
  open.head_dim = 64;
  open.dtype = DType::bf16;
  store.open(1, open);
  const std::size_t row = 2 * 64 * 2;
  std::vector<std::byte> k, v;
  std::uniform_real_distribution<float> val(-1, 1);
  std::int64_t length = 0;
  for (std::uint32_t n : {1u, 7u, 100u, 1u, 300u}) {  // the buffers double several times
    std::vector<std::byte> nk(n * row), nv(nk.size());
    for (std::size_t i = 0; i < nk.size() / 2; ++i) {
      store_from_f32(nk.data(), DType::bf16, i, val(rng));
      store_from_f32(nv.data(), DType::bf16, i, val(rng));
    }
    Append a;
    a.seq = 3;
    a.layer = 1;
    a.tokens = n;
    a.start = length;
    a.kv_heads = 2;
    a.head_dim = 64;
    a.dtype = DType::bf16;
    a.k = nk;
    a.v = nv;
    length = store.append(1, a);
    k.insert(k.end(), nk.begin(), nk.end());
    v.insert(v.end(), nv.begin(), nv.end());
  }
  std::vector<std::byte> kb, vb;
  for (std::int64_t at = std::uniform_int_distribution<std::int64_t>(0, length - 1)(rng); at < length;) {
    const auto r = store.read(1, {3, 1, at, 0xffffffffu}, 50 * 2 * row, kb, vb);  // at most 50 tokens a reply
    ASSERT_GE(r.kv.tokens, 1u);
    ASSERT_LE(r.kv.tokens, 50u);
    EXPECT_EQ(std::memcmp(r.kv.k.data(), k.data() + static_cast<std::size_t>(at) * row, r.kv.k.size()), 0) << "at " << at;
    EXPECT_EQ(std::memcmp(r.kv.v.data(), v.data() + static_cast<std::size_t>(at) * row, r.kv.v.size()), 0) << "at " << at;
    at += r.kv.tokens;
  }
}

}  // namespace
}  // namespace longattn::offload
