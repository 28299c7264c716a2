// Frames and messages: round trips of every message, and decoders that refuse every defect
// (truncation, oversize, wrong version, bad ids and dtypes, lengths that overflow).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "offload/kv_store.hpp"
#include "offload/protocol.hpp"

namespace longattn::offload {
namespace {

template <class F>
ErrorCode code_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::internal;  // "did not throw"
}

TEST(Protocol, HeaderRoundTrip) {
  FrameHeader h;
  h.type = MsgType::attend;
  h.flags = kFlagResponse;
  h.request_id = 0x0123456789abcdefULL;
  h.payload_bytes = 4242;
  const auto b = encode_header(h);
  const auto g = decode_header(b, Limits{});
  EXPECT_EQ(g.type, MsgType::attend);
  EXPECT_EQ(g.flags, kFlagResponse);
  EXPECT_EQ(g.request_id, h.request_id);
  EXPECT_EQ(g.payload_bytes, 4242u);
  // Little-endian on the wire, whatever the host.
  EXPECT_EQ(static_cast<int>(b[0]), 'L');
  EXPECT_EQ(static_cast<int>(b[3]), 'F');
}

TEST(Protocol, HeaderDefectsRefused) {
  FrameHeader h;
  h.type = MsgType::hello;
  auto b = encode_header(h);
  Limits lim;
  EXPECT_EQ(code_of([&] { decode_header(std::span(b).first(10), lim); }), ErrorCode::protocol);  // truncated
  auto bad = b;
  bad[0] = std::byte{0};
  EXPECT_EQ(code_of([&] { decode_header(bad, lim); }), ErrorCode::protocol);  // magic
  h.version = kVersion + 1;
  bad = encode_header(h);
  EXPECT_EQ(code_of([&] { decode_header(bad, lim); }), ErrorCode::protocol);  // version
  h.version = 0;
  bad = encode_header(h);
  EXPECT_EQ(code_of([&] { decode_header(bad, lim); }), ErrorCode::protocol);  // version
  h.version = kVersion;
  h.type = static_cast<MsgType>(99);
  bad = encode_header(h);
  EXPECT_EQ(code_of([&] { decode_header(bad, lim); }), ErrorCode::protocol);  // type
  h.type = MsgType::open;
  h.flags = 0x80;
  bad = encode_header(h);
  EXPECT_EQ(code_of([&] { decode_header(bad, lim); }), ErrorCode::protocol);  // flags
  h.flags = 0;
  h.payload_bytes = lim.max_payload + 1;
  bad = encode_header(h);
  EXPECT_EQ(code_of([&] { decode_header(bad, lim); }), ErrorCode::protocol);  // oversized
}

TEST(Protocol, MessagesRoundTrip) {
  Limits lim;
  {
    const auto m = decode_hello(encode(Hello{"secret-token", 77}), lim);
    EXPECT_EQ(m.token, "secret-token");
    EXPECT_EQ(m.client_id, 77u);
  }
  {
    Open o{5, 32, 8, 128, DType::f16, 4096};
    const auto m = decode_open(encode(o), lim);
    EXPECT_EQ(m.seq, 5u);
    EXPECT_EQ(m.layers, 32u);
    EXPECT_EQ(m.kv_heads, 8u);
    EXPECT_EQ(m.head_dim, 128u);
    EXPECT_EQ(m.dtype, DType::f16);
    EXPECT_EQ(m.kv_start, 4096);
  }
  {
    std::vector<std::byte> k(3 * 2 * 16 * 2, std::byte{1}), v(k.size(), std::byte{2});
    Append a;
    a.seq = 9;
    a.layer = 3;
    a.tokens = 3;
    a.start = 10;
    a.kv_heads = 2;
    a.head_dim = 16;
    a.dtype = DType::bf16;
    a.k = k;
    a.v = v;
    const auto enc = encode(a);
    const auto m = decode_append(enc, lim);
    EXPECT_EQ(m.tokens, 3u);
    EXPECT_EQ(m.start, 10);
    ASSERT_EQ(m.k.size(), k.size());
    EXPECT_EQ(m.v[0], std::byte{2});
  }
  {
    std::vector<float> q(3 * 4 * 8, 0.5f);
    Attend a;
    a.layer = 1;
    a.q_heads = 4;
    a.head_dim = 8;
    a.flags = kAttendHasPositions;
    a.seqs = {{1, 1, 100}, {2, 2, 7}};
    a.total_q = 3;
    a.positions = {99, 5, 6};
    a.q = std::as_bytes(std::span(q));
    const auto enc = encode(a);
    const auto m = decode_attend(enc, lim);
    ASSERT_EQ(m.seqs.size(), 2u);
    EXPECT_EQ(m.seqs[1].q_count, 2u);
    EXPECT_EQ(m.seqs[1].length, 7);
    EXPECT_EQ(m.total_q, 3u);
    EXPECT_EQ(m.positions[2], 6);
    EXPECT_EQ(m.q.size(), q.size() * 4);
  }
  {
    std::vector<float> o(2 * 3 * 4, 1.5f), lse(2 * 3, -2.0f);
    const auto enc = encode_attend_reply(2, 3, 4, o.data(), lse.data());
    const auto m = decode_attend_reply(enc, lim);
    EXPECT_EQ(m.o.size(), o.size() * 4);
    EXPECT_EQ(m.lse.size(), lse.size() * 4);
  }
  {
    const auto m = decode_error(encode(ErrorReply{ErrorCode::out_of_capacity, "full"}), lim);
    EXPECT_EQ(m.code, ErrorCode::out_of_capacity);
    EXPECT_EQ(m.message, "full");
  }
  EXPECT_EQ(decode_drop(encode(Drop{11}), lim).seq, 11u);
}

// The one-pass append frame the client sends is byte for byte the generic frame of the encoded
// message, and decodes back to the same KV.
TEST(Protocol, AppendFrameEqualsFramedMessage) {
  std::mt19937_64 rng(std::random_device{}());
  for (int trial = 0; trial < 20; ++trial) {
    const int tokens = 1 + static_cast<int>(rng() % 50), heads = 1 + static_cast<int>(rng() % 4), dim = 8 * (1 + static_cast<int>(rng() % 8));
    std::vector<std::byte> k(static_cast<std::size_t>(tokens) * heads * dim * 2), v(k.size());
    for (auto& b : k) b = static_cast<std::byte>(rng());
    for (auto& b : v) b = static_cast<std::byte>(rng());
    Append a;
    a.seq = rng();
    a.layer = static_cast<std::uint32_t>(rng() % 64);
    a.tokens = static_cast<std::uint32_t>(tokens);
    a.start = static_cast<std::int64_t>(rng() % 100000);
    a.kv_heads = static_cast<std::uint32_t>(heads);
    a.head_dim = static_cast<std::uint32_t>(dim);
    a.dtype = (rng() & 1) ? DType::bf16 : DType::f16;
    a.k = k;
    a.v = v;
    const std::uint64_t id = rng();
    const auto one_pass = append_frame(id, a);
    EXPECT_EQ(one_pass, frame(MsgType::append, 0, id, encode(a)));
    const auto h = decode_header(std::span(one_pass).first<kHeaderBytes>(), Limits{});
    EXPECT_EQ(h.type, MsgType::append);
    EXPECT_EQ(h.request_id, id);
    const auto m = decode_append(std::span(one_pass).subspan(kHeaderBytes), Limits{});
    EXPECT_EQ(m.seq, a.seq);
    EXPECT_TRUE(std::equal(m.v.begin(), m.v.end(), v.begin(), v.end()));
  }
}

TEST(Protocol, PayloadDefectsRefused) {
  Limits lim;
  // Every truncation of a valid append and attend is refused, never read past the end.
  std::vector<std::byte> k(2 * 16 * 4, std::byte{1});
  Append a;
  a.seq = 1;
  a.tokens = 1;
  a.kv_heads = 2;
  a.head_dim = 16;
  a.dtype = DType::f32;
  a.k = k;
  a.v = k;
  const auto app = encode(a);
  for (std::size_t n = 0; n < app.size(); ++n)
    EXPECT_EQ(code_of([&] { decode_append(std::span(app).first(n), lim); }), ErrorCode::protocol) << n;
  auto longer = app;
  longer.push_back(std::byte{0});
  EXPECT_EQ(code_of([&] { decode_append(longer, lim); }), ErrorCode::protocol);  // trailing bytes

  // Sizes that overflow 64 bits: tokens * kv_heads * head_dim * 4 with huge fields.
  Append big = a;
  big.tokens = 0xffffffffu;
  big.kv_heads = 1024;
  big.head_dim = 512;
  big.k = {};
  big.v = {};
  EXPECT_EQ(code_of([&] { decode_append(encode(big), lim); }), ErrorCode::protocol);
  // Out-of-range fields.
  Append bad_dtype = a;
  auto enc = encode(bad_dtype);
  enc[8 + 4 + 4 + 8 + 4 + 4] = std::byte{7};  // dtype byte
  EXPECT_EQ(code_of([&] { decode_append(enc, lim); }), ErrorCode::protocol);
  Open o{1, 0, 8, 64, DType::bf16, 0};  // zero layers
  EXPECT_EQ(code_of([&] { decode_open(encode(o), lim); }), ErrorCode::protocol);
  o = {1, 2, 8, 100000, DType::bf16, 0};  // head dim too large
  EXPECT_EQ(code_of([&] { decode_open(encode(o), lim); }), ErrorCode::protocol);
  o = {1, 2, 8, 64, DType::bf16, -5};  // negative start
  EXPECT_EQ(code_of([&] { decode_open(encode(o), lim); }), ErrorCode::protocol);

  // Attend: a sequence count that promises more than the payload holds, and q too short.
  Attend at;
  at.q_heads = 4;
  at.head_dim = 8;
  at.seqs = {{1, 1, 0}};
  at.total_q = 1;
  std::vector<float> q(32, 1.0f);
  at.q = std::as_bytes(std::span(q));
  auto ae = encode(at);
  ae[16] = std::byte{0xff};  // sequence count low byte -> 255 sequences
  EXPECT_EQ(code_of([&] { decode_attend(ae, lim); }), ErrorCode::protocol);
  ae = encode(at);
  for (std::size_t n = 0; n < ae.size(); ++n)
    EXPECT_EQ(code_of([&] { decode_attend(std::span(ae).first(n), lim); }), ErrorCode::protocol) << n;
  // A hello whose token length field is huge.
  auto he = encode(Hello{"abc", 1});
  he[3] = std::byte{0x7f};
  EXPECT_EQ(code_of([&] { decode_hello(he, lim); }), ErrorCode::protocol);
}

TEST(Protocol, SizesParse) {
  EXPECT_EQ(parse_size("64G"), std::size_t{64} << 30);
  EXPECT_EQ(parse_size("512M"), std::size_t{512} << 20);
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_THROW(parse_size("12Q"), Error);
  EXPECT_THROW(parse_size("-1G"), Error);
  EXPECT_THROW(parse_size(""), Error);
}

// ---- append_attend (protocol version 2) ----

// A valid append_attend of random values: two sequences, the first with two queries (positions
// given) and one new token, the second with one query and no new token (it lives on another shard).
struct AppendAttendSample {
  std::vector<float> q;
  std::vector<std::byte> k, v;
  AppendAttend m;
  explicit AppendAttendSample(std::mt19937_64& rng) {
    std::uniform_real_distribution<float> val(-1, 1);
    std::uniform_int_distribution<int> byte(0, 255);
    q.resize(3 * 4 * 8);
    for (auto& x : q) x = val(rng);
    k.resize(1 * 2 * 8 * 2);
    v.resize(k.size());
    for (auto& b : k) b = static_cast<std::byte>(byte(rng));
    for (auto& b : v) b = static_cast<std::byte>(byte(rng));
    m.attend.layer = 2;
    m.attend.q_heads = 4;
    m.attend.head_dim = 8;
    m.attend.flags = kAttendHasPositions;
    m.attend.seqs = {{7, 2, 41}, {8, 1, 13}};
    m.attend.total_q = 3;
    m.attend.positions = {39, 40, 12};
    m.attend.q = std::as_bytes(std::span(q));
    m.kv_heads = 2;
    m.dtype = DType::bf16;
    m.new_tokens = {1, 0};
    m.total_new = 1;
    m.k = k;
    m.v = v;
  }
};

TEST(Protocol, AppendAttendRoundTrip) {
  const auto seed = std::random_device{}();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  AppendAttendSample s(rng);
  const auto enc = encode(s.m);
  const auto m = decode_append_attend(enc, Limits{});
  EXPECT_EQ(m.attend.layer, 2u);
  ASSERT_EQ(m.attend.seqs.size(), 2u);
  EXPECT_EQ(m.attend.seqs[0].length, 41);
  EXPECT_EQ(m.attend.seqs[1].seq, 8u);
  EXPECT_EQ(m.attend.total_q, 3u);
  EXPECT_EQ(m.attend.positions, (std::vector<std::int64_t>{39, 40, 12}));
  EXPECT_EQ(m.kv_heads, 2u);
  EXPECT_EQ(m.dtype, DType::bf16);
  EXPECT_EQ(m.new_tokens, (std::vector<std::uint32_t>{1, 0}));
  EXPECT_EQ(m.total_new, 1u);
  ASSERT_EQ(m.attend.q.size(), s.q.size() * 4);
  EXPECT_EQ(std::memcmp(m.attend.q.data(), s.q.data(), m.attend.q.size()), 0);
  ASSERT_EQ(m.k.size(), s.k.size());
  EXPECT_TRUE(std::equal(m.k.begin(), m.k.end(), s.k.begin()));
  EXPECT_TRUE(std::equal(m.v.begin(), m.v.end(), s.v.begin()));
  // Framed: sent as version 2 (what it needs), and validate_frame accepts it.
  const auto f = frame(MsgType::append_attend, 0, 5, enc);
  EXPECT_EQ(decode_header(f, Limits{}).version, 2);
  validate_frame(f, Limits{});
  // Every older message is still sent as version 1, so a version-1 server understands it.
  EXPECT_EQ(decode_header(frame(MsgType::attend, 0, 6, {}), Limits{}).version, 1);
}

TEST(Protocol, AppendAttendDefectsRefused) {
  const auto seed = std::random_device{}();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  Limits lim;
  AppendAttendSample s(rng);
  const auto enc = encode(s.m);
  // Every truncation and every extra byte.
  for (std::size_t n = 0; n < enc.size(); ++n)
    EXPECT_EQ(code_of([&] { decode_append_attend(std::span(enc).first(n), lim); }), ErrorCode::protocol) << n;
  auto longer = enc;
  longer.push_back(std::byte{0});
  EXPECT_EQ(code_of([&] { decode_append_attend(longer, lim); }), ErrorCode::protocol);
  auto refused = [&](auto&& change, const char* what) {
    AppendAttendSample bad(rng);
    change(bad.m);
    const auto b = encode(bad.m);
    EXPECT_EQ(code_of([&] { decode_append_attend(b, lim); }), ErrorCode::protocol) << what;
  };
  refused([](AppendAttend& m) { m.kv_heads = 3; }, "q_heads not a multiple of kv_heads");
  refused([](AppendAttend& m) { m.kv_heads = 0; }, "no kv heads");
  refused([](AppendAttend& m) { m.new_tokens = {2, 0}; }, "k/v shorter than the new tokens announce");
  refused([](AppendAttend& m) { m.new_tokens = {0, 14}; }, "more new tokens than the sequence holds");
  refused([](AppendAttend& m) { m.new_tokens = {1, 300}; }, "new tokens above the per-sequence limit");
  refused([](AppendAttend& m) { m.attend.seqs[0].length = -1; }, "negative length");
  refused([](AppendAttend& m) { m.attend.layer = 5000; }, "layer above the limit");
  refused([](AppendAttend& m) { m.attend.positions[1] = -3; }, "negative position");
  refused([](AppendAttend& m) { m.attend.flags = 8; }, "unknown flags");
  refused([](AppendAttend& m) { m.attend.head_dim = 7; }, "q shorter than announced");
  {
    // An unknown dtype byte (the byte after layer, q_heads, head_dim, flags and kv_heads).
    auto b = enc;
    b[20] = std::byte{9};
    EXPECT_EQ(code_of([&] { decode_append_attend(b, lim); }), ErrorCode::protocol);
  }
  {
    // A sequence count that would overflow the size arithmetic or exceed the limit.
    auto b = enc;
    for (int i = 0; i < 4; ++i) b[21 + i] = std::byte{0xff};
    EXPECT_EQ(code_of([&] { decode_append_attend(b, lim); }), ErrorCode::protocol);
  }
  {
    // A version-1 header may not announce the type version 2 added.
    FrameHeader h;
    h.version = 1;
    h.type = MsgType::append_attend;
    h.payload_bytes = static_cast<std::uint32_t>(enc.size());
    const auto hb = encode_header(h);
    EXPECT_EQ(code_of([&] { decode_header(hb, lim); }), ErrorCode::protocol);
  }
  // The encoder refuses a new-token list of the wrong length (a caller's bug, not a wire defect).
  AppendAttendSample mismatched(rng);
  mismatched.m.new_tokens = {1};
  EXPECT_EQ(code_of([&] { encode(mismatched.m); }), ErrorCode::invalid_argument);
}

}  // namespace
}  // namespace longattn::offload
