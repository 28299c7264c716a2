// A raw TCP peer of the offload server for tests that send what no client would: headers alone,
// frames in drips, strangers that never say hello. Blocking, with a receive timeout so that a
// test fails rather than hangs.
#pragma once

#include <sys/socket.h>
#include <sys/time.h>

#include <array>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio.hpp>

#include "offload/protocol.hpp"

namespace longattn::offload::test {

class RawTcpPeer {
 public:
  explicit RawTcpPeer(int port, std::chrono::milliseconds receive_timeout = std::chrono::seconds(10)) {
    sock_.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
    sock_.set_option(boost::asio::ip::tcp::no_delay(true));
    set_receive_timeout(receive_timeout);
  }

  void set_receive_timeout(std::chrono::milliseconds t) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(t.count() / 1000);
    tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
    ::setsockopt(sock_.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }

  // False when the server closed the connection (or the write failed otherwise).
  bool send(const std::vector<std::byte>& bytes) {
    boost::system::error_code ec;
    boost::asio::write(sock_, boost::asio::buffer(bytes), ec);
    return !ec;
  }

  // The next frame; a header of type error with request id ~0 and no payload when the connection
  // closed or nothing came within the receive timeout.
  std::pair<FrameHeader, std::vector<std::byte>> read_frame() {
    std::array<std::byte, kHeaderBytes> h{};
    boost::system::error_code ec;
    boost::asio::read(sock_, boost::asio::buffer(h), ec);
    if (ec) return {closed_marker(), {}};
    Limits lim;
    lim.max_payload = 0xffffffffu;
    const auto fh = decode_header(h, lim);
    std::vector<std::byte> p(fh.payload_bytes);
    boost::asio::read(sock_, boost::asio::buffer(p), ec);
    if (ec) return {closed_marker(), {}};
    return {fh, p};
  }

  static bool is_closed_marker(const FrameHeader& h) { return h.type == MsgType::error && h.request_id == ~std::uint64_t{0}; }

  // The error reply's message, or "" when the next frame is not an error.
  std::string read_error_message() {
    const auto [h, p] = read_frame();
    if (h.type != MsgType::error || is_closed_marker(h)) return "";
    return decode_error(p, Limits{}).message;
  }

  // hello with `token`; true when the server accepted it.
  bool hello(const std::string& token, std::uint64_t client_id, std::uint64_t request_id = 1) {
    if (!send(frame(MsgType::hello, 0, request_id, encode(Hello{token, client_id})))) return false;
    return read_frame().first.type == MsgType::hello;
  }

  // Whether the server closes the connection within the receive timeout (no frame expected first).
  bool closed_by_server() {
    std::array<char, 64> b{};
    boost::system::error_code ec;
    sock_.read_some(boost::asio::buffer(b), ec);
    return ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset;
  }

  boost::asio::ip::tcp::socket& socket() { return sock_; }

 private:
  static FrameHeader closed_marker() {
    FrameHeader h;
    h.type = MsgType::error;
    h.request_id = ~std::uint64_t{0};
    return h;
  }
  boost::asio::io_context io_;
  boost::asio::ip::tcp::socket sock_{io_};
};

// A bare header: what a frame announces, with no payload behind it yet.
inline std::vector<std::byte> header_only(MsgType type, std::uint64_t request_id, std::uint32_t payload_bytes) {
  FrameHeader h;
  h.type = type;
  h.request_id = request_id;
  h.payload_bytes = payload_bytes;
  const auto b = encode_header(h);
  return {b.begin(), b.end()};
}

}  // namespace longattn::offload::test
