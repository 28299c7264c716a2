// One HTTP request to a server's metrics port on loopback, read until the server closes: what the
// metrics and admin tests send.
#pragma once

#include <array>
#include <string>

#include <boost/asio.hpp>

namespace longattn::offload::test {

struct HttpReply {
  std::string status_line, body;
};

// `token` empty: no Authorization header.
inline HttpReply http(int port, const std::string& method, const std::string& target, const std::string& token = "") {
  namespace asio = boost::asio;
  asio::io_context io;
  asio::ip::tcp::socket sock(io);
  sock.connect({asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)});
  std::string req = method + " " + target + " HTTP/1.1\r\nHost: x\r\n";
  if (!token.empty()) req += "Authorization: Bearer " + token + "\r\n";
  req += "\r\n";
  asio::write(sock, asio::buffer(req));
  std::string resp;
  boost::system::error_code ec;
  std::array<char, 4096> buf;
  for (;;) {
    const auto n = sock.read_some(asio::buffer(buf), ec);
    resp.append(buf.data(), n);
    if (ec) break;
  }
  HttpReply r;
  r.status_line = resp.substr(0, resp.find("\r\n"));
  const auto body = resp.find("\r\n\r\n");
  if (body != std::string::npos) r.body = resp.substr(body + 4);
  return r;
}

}  // namespace longattn::offload::test
