// The offload wire protocol: versioned, length-prefixed, little-endian binary frames, the same on
// every transport (TCP, UCX). Decoding treats every byte as hostile: each field is checked against
// Limits, all size arithmetic is overflow-checked, and anything wrong throws
// Error(ErrorCode::protocol) naming the field. docs/offload-protocol.md is the prose version.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "longattn/error.hpp"
#include "longattn/tensor.hpp"

namespace longattn::offload {

inline constexpr std::uint32_t kMagic = 0x464f414cu;  // the bytes "LAOF"
// Version 2 added append_attend, version 3 export_kv; every other message is still sent as version
// 1, so peers of different versions understand each other as long as the newer messages are not
// used (a client reads the server's version in its hello reply before it sends one).
inline constexpr std::uint16_t kVersion = 3;
inline constexpr std::uint16_t kMinVersion = 1;
inline constexpr std::size_t kHeaderBytes = 24;

enum class MsgType : std::uint16_t { hello = 1, open = 2, append = 3, attend = 4, drop = 5, stats = 6, append_attend = 7, export_kv = 8, error = 127 };
const char* to_string(MsgType t) noexcept;
// The protocol version a frame of this type is sent with: the first version that knew the type.
constexpr std::uint16_t version_of(MsgType t) noexcept {
  return t == MsgType::export_kv ? 3 : t == MsgType::append_attend ? 2 : 1;
}

inline constexpr std::uint32_t kFlagResponse = 1u;           // header flag: set on every server reply
inline constexpr std::uint32_t kAttendHasPositions = 1u;     // Attend::flags: per-query absolute positions follow

// What a decoder accepts. Defaults suit real models with room to spare; the server's
// --max-frame flag raises max_payload for very large bulk prefills.
struct Limits {
  std::uint32_t max_payload = 256u << 20;
  std::uint32_t max_token_bytes = 4096;
  std::uint32_t max_layers = 4096;
  std::uint32_t max_heads = 1024;
  std::uint32_t max_head_dim = 512;
  std::uint32_t max_seqs_per_attend = 65536;
  std::uint32_t max_q_per_seq = 256;
  std::uint32_t max_message_bytes = 4096;
  std::int64_t max_position = std::int64_t{1} << 40;
};

// The largest hello payload these limits allow (token and client id): before a connection has
// authenticated, no frame may announce more.
constexpr std::uint32_t max_hello_payload(const Limits& lim) noexcept { return 4 + lim.max_token_bytes + 8; }

struct FrameHeader {
  std::uint32_t magic = kMagic;
  std::uint16_t version = kMinVersion;  // frame() and append_frame() write version_of(type)
  MsgType type = MsgType::error;
  std::uint32_t flags = 0;
  std::uint64_t request_id = 0;
  std::uint32_t payload_bytes = 0;
};

std::array<std::byte, kHeaderBytes> encode_header(const FrameHeader& h) noexcept;
// Checks magic, version (a type newer than the frame's version is refused), type, flags and payload length against the limits.
FrameHeader decode_header(std::span<const std::byte> bytes, const Limits& lim);

// Error codes on the wire: stable numbers, independent of the C++ enum's order.
constexpr std::uint32_t wire_code(ErrorCode c) noexcept {
  switch (c) {
    case ErrorCode::invalid_argument: return 1;
    case ErrorCode::unsupported: return 2;
    case ErrorCode::io: return 3;
    case ErrorCode::communication: return 4;
    case ErrorCode::timeout: return 5;
    case ErrorCode::out_of_capacity: return 6;
    case ErrorCode::protocol: return 7;
    case ErrorCode::unauthorized: return 8;
    case ErrorCode::internal: return 9;
  }
  return 9;
}
inline constexpr std::uint32_t kMaxWireCode = 9;  // wire codes are 1..9; 0 means none
ErrorCode from_wire_code(std::uint32_t code) noexcept;

// ---- messages (request and reply payloads) ----
struct Hello {
  std::string token;
  std::uint64_t client_id = 0;  // a namespace for sequence ids and the unit of the per-client quota
};
struct HelloReply {
  std::uint32_t version = kVersion;
  std::uint32_t page_tokens = 0;
  std::uint64_t max_payload = 0;
};
struct Open {
  std::uint64_t seq = 0;
  std::uint32_t layers = 0, kv_heads = 0, head_dim = 0;
  DType dtype = DType::bf16;
  std::int64_t kv_start = 0;  // absolute position of the first token this server holds
};
struct Append {
  std::uint64_t seq = 0;
  std::uint32_t layer = 0;
  std::uint32_t tokens = 0;
  std::int64_t start = 0;  // index (within this server's part) of the first appended token
  std::uint32_t kv_heads = 0, head_dim = 0;
  DType dtype = DType::bf16;
  std::span<const std::byte> k, v;  // [tokens, kv_heads, head_dim] each, in dtype
};
struct AppendReply {
  std::int64_t length = 0;
};
struct AttendSeq {
  std::uint64_t seq = 0;
  std::uint32_t q_count = 0;
  std::int64_t length = 0;  // tokens the caller expects this layer to hold: a mismatch is an error, never a wrong answer
};
struct Attend {
  std::uint32_t layer = 0, q_heads = 0, head_dim = 0;
  std::uint32_t flags = 0;
  std::vector<AttendSeq> seqs;
  std::uint64_t total_q = 0;
  std::vector<std::int64_t> positions;  // [total_q] when kAttendHasPositions
  std::span<const std::byte> q;         // f32 [total_q, q_heads, head_dim]
};
struct AttendReply {
  std::uint64_t total_q = 0;
  std::uint32_t q_heads = 0, head_dim = 0;
  std::span<const std::byte> o;    // f32 [total_q, q_heads, head_dim]
  std::span<const std::byte> lse;  // f32 [q_heads, total_q]
};
// Append then attend in one round trip (version 2): the decode step of one layer. Each sequence
// first gets new_tokens[i] tokens appended at [length - new_tokens, length) of the server's part
// (k, v hold them in sequence order), then attend.seqs[i].length is checked and its queries
// attend. new_tokens may be 0 (the new tokens live on another shard). The reply is an AttendReply
// under type append_attend.
struct AppendAttend {
  Attend attend;
  std::uint32_t kv_heads = 0;
  DType dtype = DType::bf16;
  std::vector<std::uint32_t> new_tokens;  // [attend.seqs.size()]
  std::uint64_t total_new = 0;
  std::span<const std::byte> k, v;  // [total_new, kv_heads, head_dim] each, in dtype
};
// Reads a token range of one layer back out of a server (version 3): how a client copies KV from
// a complete replica to a server that restarted empty. The reply (ExportReply) carries the first
// tokens of [start, start + tokens), as many as fit kMaxExportReplyBytes and the server's payload
// limit (at least one), so a long range is read in several requests and neither side ever
// buffers more than one reply. A start at or past the layer's length is refused.
struct Export {
  std::uint64_t seq = 0;
  std::uint32_t layer = 0;
  std::int64_t start = 0;
  std::uint32_t tokens = 0;
};
// The layer's length on the server, then the tokens laid out as an append to the same sequence,
// layer and start: forwarding it to another server is one append.
struct ExportReply {
  std::int64_t length = 0;
  Append kv;
};
inline constexpr std::uint32_t kMaxExportReplyBytes = 64u << 20;
// Bytes of an export reply ahead of k and v: the length and the append's fixed fields.
inline constexpr std::uint32_t kExportReplyHeadBytes = 8 + 33;
struct Drop {
  std::uint64_t seq = 0;
};
struct ErrorReply {
  ErrorCode code = ErrorCode::internal;
  std::string message;
};

// A frame ready to send: header + payload in one buffer.
std::vector<std::byte> frame(MsgType t, std::uint32_t flags, std::uint64_t request_id, std::span<const std::byte> payload);

std::vector<std::byte> encode(const Hello& m);
std::vector<std::byte> encode(const HelloReply& m);
std::vector<std::byte> encode(const Open& m);
std::vector<std::byte> encode(const Append& m);
// The whole request frame of an append (header + payload, equal to frame(append, 0, id,
// encode(m))) written in one pass: a bulk prefill copies its KV once on the way out, not twice.
std::vector<std::byte> append_frame(std::uint64_t request_id, const Append& m);
std::vector<std::byte> encode(const AppendReply& m);
std::vector<std::byte> encode(const Attend& m);
// The reply's header fields, then o and lse copied from the caller's floats.
std::vector<std::byte> encode_attend_reply(std::uint64_t total_q, std::uint32_t q_heads, std::uint32_t head_dim,
                                           const float* o, const float* lse);
std::vector<std::byte> encode(const AppendAttend& m);
std::vector<std::byte> encode(const Drop& m);
std::vector<std::byte> encode(const ErrorReply& m);
std::vector<std::byte> encode(const Export& m);
std::vector<std::byte> encode(const ExportReply& m);

// Decoders: the spans they return point into `payload`, which must outlive them.
Hello decode_hello(std::span<const std::byte> payload, const Limits& lim);
HelloReply decode_hello_reply(std::span<const std::byte> payload, const Limits& lim);
Open decode_open(std::span<const std::byte> payload, const Limits& lim);
Append decode_append(std::span<const std::byte> payload, const Limits& lim);
AppendReply decode_append_reply(std::span<const std::byte> payload, const Limits& lim);
Attend decode_attend(std::span<const std::byte> payload, const Limits& lim);
AttendReply decode_attend_reply(std::span<const std::byte> payload, const Limits& lim);
// Also checks q_heads % kv_heads == 0, head_dim shared by q and kv, and new_tokens <= length.
AppendAttend decode_append_attend(std::span<const std::byte> payload, const Limits& lim);
Drop decode_drop(std::span<const std::byte> payload, const Limits& lim);
Export decode_export(std::span<const std::byte> payload, const Limits& lim);
// Also checks that the tokens lie inside the length the reply states.
ExportReply decode_export_reply(std::span<const std::byte> payload, const Limits& lim);
ErrorReply decode_error(std::span<const std::byte> payload, const Limits& lim);

// Decodes one whole frame (header + payload) of any request type and throws on any defect: the
// entry point of the fuzzer, and what the server's read path amounts to.
void validate_frame(std::span<const std::byte> bytes, const Limits& lim);

// Overflow-checked a * b (throws Error(protocol) naming `what`).
std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what);

}  // namespace longattn::offload
