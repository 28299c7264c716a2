// Encoding and hostile-input decoding of the offload frames (see protocol.hpp).
#include "offload/protocol.hpp"

#include <array>
#include <cstring>

#include "common/check.hpp"

namespace longattn::offload {
namespace {

[[noreturn]] void bad(const std::string& what) { throw Error(ErrorCode::protocol, "malformed frame: " + what); }

// Little-endian writer.
class Writer {
 public:
  void u8(std::uint8_t v) { out_.push_back(static_cast<std::byte>(v)); }
  void u16(std::uint16_t v) { le(v, 2); }
  void u32(std::uint32_t v) { le(v, 4); }
  void u64(std::uint64_t v) { le(v, 8); }
  void i64(std::int64_t v) { le(static_cast<std::uint64_t>(v), 8); }
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  void str(const std::string& s) {
    u32(static_cast<std::uint32_t>(s.size()));
    bytes(s.data(), s.size());
  }
  std::vector<std::byte> take() { return std::move(out_); }
  void reserve(std::size_t n) { out_.reserve(n); }

 private:
  void le(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
  }
  std::vector<std::byte> out_;
};

// Bounds-checked little-endian reader: running past the end is a "truncated" protocol error.
class Reader {
 public:
  Reader(std::span<const std::byte> b, const char* msg) : b_(b), msg_(msg) {}
  std::uint8_t u8() { return static_cast<std::uint8_t>(le(1, "u8")); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(le(2, "u16")); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(le(4, "u32")); }
  std::uint64_t u64() { return le(8, "u64"); }
  std::int64_t i64() { return static_cast<std::int64_t>(le(8, "i64")); }
  std::span<const std::byte> bytes(std::uint64_t n, const char* what) {
    if (n > b_.size() - pos_) bad(std::string(msg_) + ": truncated " + what);
    auto s = b_.subspan(pos_, static_cast<std::size_t>(n));
    pos_ += static_cast<std::size_t>(n);
    return s;
  }
  std::string str(std::uint32_t max, const char* what) {
    const std::uint32_t n = u32();
    if (n > max) bad(std::string(msg_) + ": " + what + " longer than " + std::to_string(max) + " bytes");
    auto s = bytes(n, what);
    return std::string(reinterpret_cast<const char*>(s.data()), s.size());
  }
  void finish() const {
    if (pos_ != b_.size()) bad(std::string(msg_) + ": " + std::to_string(b_.size() - pos_) + " trailing bytes");
  }
  std::size_t left() const { return b_.size() - pos_; }

 private:
  std::uint64_t le(int n, const char* what) {
    if (static_cast<std::size_t>(n) > b_.size() - pos_) bad(std::string(msg_) + ": truncated " + what);
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(b_[pos_ + i]) << (8 * i);
    pos_ += static_cast<std::size_t>(n);
    return v;
  }
  std::span<const std::byte> b_;
  std::size_t pos_ = 0;
  const char* msg_;
};

DType read_dtype(Reader& r) {
  const std::uint8_t d = r.u8();
  if (d > static_cast<std::uint8_t>(DType::f16)) bad("unknown dtype " + std::to_string(d));
  return static_cast<DType>(d);
}

void check_range(std::uint64_t v, std::uint64_t lo, std::uint64_t hi, const char* what) {
  if (v < lo || v > hi) bad(std::string(what) + " = " + std::to_string(v) + " outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

void check_geometry(std::uint32_t kv_heads, std::uint32_t head_dim, const Limits& lim) {
  check_range(kv_heads, 1, lim.max_heads, "kv_heads");
  check_range(head_dim, 1, lim.max_head_dim, "head_dim");
}

}  // namespace

std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what) {
  std::uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) bad(std::string(what) + ": size overflows");
  return r;
}

const char* to_string(MsgType t) noexcept {
  switch (t) {
    case MsgType::hello: return "hello";
    case MsgType::open: return "open";
    case MsgType::append: return "append";
    case MsgType::attend: return "attend";
    case MsgType::drop: return "drop";
    case MsgType::stats: return "stats";
    case MsgType::append_attend: return "append_attend";
    case MsgType::export_kv: return "export";
    case MsgType::error: return "error";
  }
  return "unknown";
}

std::array<std::byte, kHeaderBytes> encode_header(const FrameHeader& h) noexcept {
  std::array<std::byte, kHeaderBytes> out{};
  auto put = [&](std::size_t at, std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
  };
  put(0, h.magic, 4);
  put(4, h.version, 2);
  put(6, static_cast<std::uint16_t>(h.type), 2);
  put(8, h.flags, 4);
  put(12, h.request_id, 8);
  put(20, h.payload_bytes, 4);
  return out;
}

FrameHeader decode_header(std::span<const std::byte> bytes, const Limits& lim) {
  if (bytes.size() < kHeaderBytes) bad("truncated header");
  Reader r(bytes.first(kHeaderBytes), "header");
  FrameHeader h;
  h.magic = r.u32();
  if (h.magic != kMagic) bad("bad magic (not a longattn offload peer?)");
  h.version = r.u16();
  if (h.version < kMinVersion || h.version > kVersion)
    throw Error(ErrorCode::protocol, "protocol version " + std::to_string(h.version) + " is not supported (this build speaks " +
                                         std::to_string(kMinVersion) + " to " + std::to_string(kVersion) + ")");
  const std::uint16_t t = r.u16();
  if (!((t >= 1 && t <= 8) || t == 127)) bad("unknown message type " + std::to_string(t));
  h.type = static_cast<MsgType>(t);
  if (h.version < version_of(h.type))
    bad(std::string("a ") + to_string(h.type) + " frame needs protocol version " + std::to_string(version_of(h.type)) + ", not " +
        std::to_string(h.version));
  h.flags = r.u32();
  if (h.flags & ~kFlagResponse) bad("unknown flags " + std::to_string(h.flags));
  h.request_id = r.u64();
  h.payload_bytes = r.u32();
  if (h.payload_bytes > lim.max_payload)
    throw Error(ErrorCode::protocol, "frame payload of " + std::to_string(h.payload_bytes) + " bytes exceeds the limit of " +
                                         std::to_string(lim.max_payload));
  return h;
}

ErrorCode from_wire_code(std::uint32_t code) noexcept {
  switch (code) {
    case 1: return ErrorCode::invalid_argument;
    case 2: return ErrorCode::unsupported;
    case 3: return ErrorCode::io;
    case 4: return ErrorCode::communication;
    case 5: return ErrorCode::timeout;
    case 6: return ErrorCode::out_of_capacity;
    case 7: return ErrorCode::protocol;
    case 8: return ErrorCode::unauthorized;
    default: return ErrorCode::internal;
  }
}

std::vector<std::byte> frame(MsgType t, std::uint32_t flags, std::uint64_t request_id, std::span<const std::byte> payload) {
  LONGATTN_REQUIRE(payload.size() <= 0xffffffffu, ErrorCode::invalid_argument,
                   "a {} message of {} bytes does not fit one frame; send it in parts", to_string(t), payload.size());
  FrameHeader h;
  h.version = version_of(t);
  h.type = t;
  h.flags = flags;
  h.request_id = request_id;
  h.payload_bytes = static_cast<std::uint32_t>(payload.size());
  std::vector<std::byte> out(kHeaderBytes + payload.size());
  const auto hb = encode_header(h);
  std::memcpy(out.data(), hb.data(), kHeaderBytes);
  if (!payload.empty()) std::memcpy(out.data() + kHeaderBytes, payload.data(), payload.size());
  return out;
}

// ---- encoders ----
std::vector<std::byte> encode(const Hello& m) {
  Writer w;
  w.str(m.token);
  w.u64(m.client_id);
  return w.take();
}
std::vector<std::byte> encode(const HelloReply& m) {
  Writer w;
  w.u32(m.version);
  w.u32(m.page_tokens);
  w.u64(m.max_payload);
  return w.take();
}
std::vector<std::byte> encode(const Open& m) {
  Writer w;
  w.u64(m.seq);
  w.u32(m.layers);
  w.u32(m.kv_heads);
  w.u32(m.head_dim);
  w.u8(static_cast<std::uint8_t>(m.dtype));
  w.i64(m.kv_start);
  return w.take();
}
namespace {
void write_append(Writer& w, const Append& m) {
  w.u64(m.seq);
  w.u32(m.layer);
  w.u32(m.tokens);
  w.i64(m.start);
  w.u32(m.kv_heads);
  w.u32(m.head_dim);
  w.u8(static_cast<std::uint8_t>(m.dtype));
  w.bytes(m.k.data(), m.k.size());
  w.bytes(m.v.data(), m.v.size());
}
}  // namespace
std::vector<std::byte> encode(const Append& m) {
  Writer w;
  w.reserve(48 + m.k.size() + m.v.size());
  write_append(w, m);
  return w.take();
}
std::vector<std::byte> append_frame(std::uint64_t request_id, const Append& m) {
  Writer w;
  w.reserve(kHeaderBytes + 48 + m.k.size() + m.v.size());
  const std::array<std::byte, kHeaderBytes> placeholder{};
  w.bytes(placeholder.data(), placeholder.size());
  write_append(w, m);
  auto out = w.take();
  const std::size_t payload = out.size() - kHeaderBytes;
  LONGATTN_REQUIRE(payload <= 0xffffffffu, ErrorCode::invalid_argument,
                   "an append message of {} bytes does not fit one frame; send it in parts", payload);
  FrameHeader h;
  h.version = version_of(MsgType::append);
  h.type = MsgType::append;
  h.flags = 0;
  h.request_id = request_id;
  h.payload_bytes = static_cast<std::uint32_t>(payload);
  const auto hb = encode_header(h);
  std::memcpy(out.data(), hb.data(), kHeaderBytes);
  return out;
}
std::vector<std::byte> encode(const AppendReply& m) {
  Writer w;
  w.i64(m.length);
  return w.take();
}
std::vector<std::byte> encode(const Attend& m) {
  Writer w;
  w.reserve(32 + m.seqs.size() * 20 + m.positions.size() * 8 + m.q.size());
  w.u32(m.layer);
  w.u32(m.q_heads);
  w.u32(m.head_dim);
  w.u32(m.flags);
  w.u32(static_cast<std::uint32_t>(m.seqs.size()));
  for (const auto& s : m.seqs) {
    w.u64(s.seq);
    w.u32(s.q_count);
    w.i64(s.length);
  }
  if (m.flags & kAttendHasPositions)
    for (auto p : m.positions) w.i64(p);
  w.bytes(m.q.data(), m.q.size());
  return w.take();
}
std::vector<std::byte> encode(const AppendAttend& m) {
  const Attend& a = m.attend;
  LONGATTN_INVALID(m.new_tokens.size() == a.seqs.size(), "append_attend: {} new-token counts for {} sequences", m.new_tokens.size(),
                   a.seqs.size());
  Writer w;
  w.reserve(40 + a.seqs.size() * 24 + a.positions.size() * 8 + a.q.size() + m.k.size() + m.v.size());
  w.u32(a.layer);
  w.u32(a.q_heads);
  w.u32(a.head_dim);
  w.u32(a.flags);
  w.u32(m.kv_heads);
  w.u8(static_cast<std::uint8_t>(m.dtype));
  w.u32(static_cast<std::uint32_t>(a.seqs.size()));
  for (std::size_t i = 0; i < a.seqs.size(); ++i) {
    w.u64(a.seqs[i].seq);
    w.u32(a.seqs[i].q_count);
    w.i64(a.seqs[i].length);
    w.u32(m.new_tokens[i]);
  }
  if (a.flags & kAttendHasPositions)
    for (auto p : a.positions) w.i64(p);
  w.bytes(a.q.data(), a.q.size());
  w.bytes(m.k.data(), m.k.size());
  w.bytes(m.v.data(), m.v.size());
  return w.take();
}
std::vector<std::byte> encode_attend_reply(std::uint64_t total_q, std::uint32_t q_heads, std::uint32_t head_dim, const float* o,
                                           const float* lse) {
  Writer w;
  const std::size_t no = static_cast<std::size_t>(total_q) * q_heads * head_dim, nl = static_cast<std::size_t>(total_q) * q_heads;
  w.reserve(16 + 4 * (no + nl));
  w.u64(total_q);
  w.u32(q_heads);
  w.u32(head_dim);
  w.bytes(o, no * 4);
  w.bytes(lse, nl * 4);
  return w.take();
}
std::vector<std::byte> encode(const Drop& m) {
  Writer w;
  w.u64(m.seq);
  return w.take();
}
std::vector<std::byte> encode(const Export& m) {
  Writer w;
  w.u64(m.seq);
  w.u32(m.layer);
  w.i64(m.start);
  w.u32(m.tokens);
  return w.take();
}
std::vector<std::byte> encode(const ExportReply& m) {
  Writer w;
  w.reserve(kExportReplyHeadBytes + m.kv.k.size() + m.kv.v.size());
  w.i64(m.length);
  write_append(w, m.kv);
  return w.take();
}
std::vector<std::byte> encode(const ErrorReply& m) {
  Writer w;
  w.u32(wire_code(m.code));
  w.str(m.message.size() > 4000 ? m.message.substr(0, 4000) : m.message);
  return w.take();
}

// ---- decoders ----
Hello decode_hello(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "hello");
  Hello m;
  m.token = r.str(lim.max_token_bytes, "token");
  m.client_id = r.u64();
  r.finish();
  return m;
}
HelloReply decode_hello_reply(std::span<const std::byte> p, const Limits&) {
  Reader r(p, "hello reply");
  HelloReply m;
  m.version = r.u32();
  m.page_tokens = r.u32();
  m.max_payload = r.u64();
  r.finish();
  return m;
}
Open decode_open(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "open");
  Open m;
  m.seq = r.u64();
  m.layers = r.u32();
  m.kv_heads = r.u32();
  m.head_dim = r.u32();
  m.dtype = read_dtype(r);
  m.kv_start = r.i64();
  r.finish();
  check_range(m.layers, 1, lim.max_layers, "layers");
  check_geometry(m.kv_heads, m.head_dim, lim);
  if (m.kv_start < 0 || m.kv_start > lim.max_position) bad("kv_start " + std::to_string(m.kv_start) + " out of range");
  return m;
}
namespace {
Append read_append(Reader& r, const Limits& lim) {
  Append m;
  m.seq = r.u64();
  m.layer = r.u32();
  m.tokens = r.u32();
  m.start = r.i64();
  m.kv_heads = r.u32();
  m.head_dim = r.u32();
  m.dtype = read_dtype(r);
  check_range(m.layer, 0, lim.max_layers - 1, "layer");
  check_range(m.tokens, 1, 0xffffffffu, "tokens");
  if (m.start < 0 || m.start > lim.max_position) bad("append start " + std::to_string(m.start) + " out of range");
  check_geometry(m.kv_heads, m.head_dim, lim);
  const std::uint64_t each = checked_mul(checked_mul(checked_mul(m.tokens, m.kv_heads, "append k/v"), m.head_dim, "append k/v"),
                                         dtype_size(m.dtype), "append k/v");
  m.k = r.bytes(each, "k");
  m.v = r.bytes(each, "v");
  return m;
}
}  // namespace
Append decode_append(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "append");
  Append m = read_append(r, lim);
  r.finish();
  return m;
}
AppendReply decode_append_reply(std::span<const std::byte> p, const Limits&) {
  Reader r(p, "append reply");
  AppendReply m;
  m.length = r.i64();
  r.finish();
  return m;
}
namespace {
void read_attend_head(Reader& r, Attend& m, const Limits& lim) {
  m.layer = r.u32();
  m.q_heads = r.u32();
  m.head_dim = r.u32();
  m.flags = r.u32();
  check_range(m.layer, 0, lim.max_layers - 1, "layer");
  check_range(m.q_heads, 1, lim.max_heads, "q_heads");
  check_range(m.head_dim, 1, lim.max_head_dim, "head_dim");
  if (m.flags & ~kAttendHasPositions) bad("unknown attend flags");
}
// The sequence list (with each entry's new-token count when `new_tokens` is given), the
// positions and q.
void read_attend_body(Reader& r, Attend& m, const Limits& lim, std::vector<std::uint32_t>* new_tokens) {
  const std::uint32_t n = r.u32();
  check_range(n, 1, lim.max_seqs_per_attend, "sequences per attend");
  const std::uint64_t entry = new_tokens ? 24 : 20;
  if (checked_mul(n, entry, "attend sequences") > r.left()) bad("attend: truncated sequence list");
  m.seqs.resize(n);
  if (new_tokens) new_tokens->resize(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    auto& s = m.seqs[i];
    s.seq = r.u64();
    s.q_count = r.u32();
    s.length = r.i64();
    check_range(s.q_count, 0, lim.max_q_per_seq, "queries per sequence");
    if (s.length < 0 || s.length > lim.max_position) bad("attend: sequence length " + std::to_string(s.length) + " out of range");
    if (new_tokens) {
      const std::uint32_t added = r.u32();
      check_range(added, 0, lim.max_q_per_seq, "new tokens per sequence");
      if (added > s.length) bad("append_attend: " + std::to_string(added) + " new tokens in a sequence of length " + std::to_string(s.length));
      (*new_tokens)[i] = added;
    }
    m.total_q += s.q_count;  // <= 2^16 * 2^8 by the checks: no overflow
  }
  if (m.total_q == 0) bad("attend without queries");
  if (m.flags & kAttendHasPositions) {
    if (checked_mul(m.total_q, 8, "positions") > r.left()) bad("attend: truncated positions");
    m.positions.resize(static_cast<std::size_t>(m.total_q));
    for (auto& x : m.positions) {
      x = r.i64();
      if (x < 0 || x > lim.max_position) bad("query position " + std::to_string(x) + " out of range");
    }
  }
  const std::uint64_t qb = checked_mul(checked_mul(checked_mul(m.total_q, m.q_heads, "q"), m.head_dim, "q"), 4, "q");
  m.q = r.bytes(qb, "q");
}
}  // namespace

Attend decode_attend(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "attend");
  Attend m;
  read_attend_head(r, m, lim);
  read_attend_body(r, m, lim, nullptr);
  r.finish();
  return m;
}
AppendAttend decode_append_attend(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "append_attend");
  AppendAttend m;
  read_attend_head(r, m.attend, lim);
  m.kv_heads = r.u32();
  m.dtype = read_dtype(r);
  check_geometry(m.kv_heads, m.attend.head_dim, lim);
  if (m.attend.q_heads % m.kv_heads != 0)
    bad("append_attend: q_heads " + std::to_string(m.attend.q_heads) + " is not a multiple of kv_heads " + std::to_string(m.kv_heads));
  read_attend_body(r, m.attend, lim, &m.new_tokens);
  for (auto t : m.new_tokens) m.total_new += t;  // <= 2^16 * 2^8: no overflow
  const std::uint64_t each =
      checked_mul(checked_mul(checked_mul(m.total_new, m.kv_heads, "append_attend k/v"), m.attend.head_dim, "append_attend k/v"),
                  dtype_size(m.dtype), "append_attend k/v");
  m.k = r.bytes(each, "k");
  m.v = r.bytes(each, "v");
  r.finish();
  return m;
}
AttendReply decode_attend_reply(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "attend reply");
  AttendReply m;
  m.total_q = r.u64();
  m.q_heads = r.u32();
  m.head_dim = r.u32();
  check_range(m.q_heads, 1, lim.max_heads, "q_heads");
  check_range(m.head_dim, 1, lim.max_head_dim, "head_dim");
  const std::uint64_t rows = checked_mul(m.total_q, m.q_heads, "o");
  m.o = r.bytes(checked_mul(checked_mul(rows, m.head_dim, "o"), 4, "o"), "o");
  m.lse = r.bytes(checked_mul(rows, 4, "lse"), "lse");
  r.finish();
  return m;
}
Drop decode_drop(std::span<const std::byte> p, const Limits&) {
  Reader r(p, "drop");
  Drop m;
  m.seq = r.u64();
  r.finish();
  return m;
}
Export decode_export(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "export");
  Export m;
  m.seq = r.u64();
  m.layer = r.u32();
  m.start = r.i64();
  m.tokens = r.u32();
  r.finish();
  check_range(m.layer, 0, lim.max_layers - 1, "layer");
  if (m.start < 0 || m.start > lim.max_position) bad("export start " + std::to_string(m.start) + " out of range");
  check_range(m.tokens, 1, 0xffffffffu, "tokens");
  return m;
}
ExportReply decode_export_reply(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "export reply");
  ExportReply m;
  m.length = r.i64();
  if (m.length < 1 || m.length > lim.max_position) bad("export reply: layer length " + std::to_string(m.length) + " out of range");
  m.kv = read_append(r, lim);
  r.finish();
  if (m.kv.start + static_cast<std::int64_t>(m.kv.tokens) > m.length)
    bad("export reply: tokens [" + std::to_string(m.kv.start) + ", " + std::to_string(m.kv.start + m.kv.tokens) +
        ") lie past the layer's length " + std::to_string(m.length));
  return m;
}
ErrorReply decode_error(std::span<const std::byte> p, const Limits& lim) {
  Reader r(p, "error");
  ErrorReply m;
  m.code = from_wire_code(r.u32());
  m.message = r.str(lim.max_message_bytes, "message");
  r.finish();
  return m;
}

void validate_frame(std::span<const std::byte> bytes, const Limits& lim) {
  const FrameHeader h = decode_header(bytes, lim);
  if (bytes.size() - kHeaderBytes != h.payload_bytes) bad("payload length does not match the header");
  const auto p = bytes.subspan(kHeaderBytes);
  const bool resp = h.flags & kFlagResponse;
  switch (h.type) {
    case MsgType::hello: resp ? (void)decode_hello_reply(p, lim) : (void)decode_hello(p, lim); break;
    case MsgType::open: if (!resp) decode_open(p, lim); break;
    case MsgType::append: resp ? (void)decode_append_reply(p, lim) : (void)decode_append(p, lim); break;
    case MsgType::attend: resp ? (void)decode_attend_reply(p, lim) : (void)decode_attend(p, lim); break;
    case MsgType::drop: if (!resp) decode_drop(p, lim); break;
    case MsgType::stats: if (!resp && !p.empty()) bad("stats request carries a payload"); break;
    case MsgType::append_attend: resp ? (void)decode_attend_reply(p, lim) : (void)decode_append_attend(p, lim); break;
    case MsgType::export_kv: resp ? (void)decode_export_reply(p, lim) : (void)decode_export(p, lim); break;
    case MsgType::error: decode_error(p, lim); break;
  }
}

}  // namespace longattn::offload
