// A minimal HTTP/1.1 listener for the server's metrics and admin requests: reads one request head
// (5 s at most, 8 KiB at most), hands method, target, bearer token and peer to a handler, writes
// its answer and closes.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "offload/tcp_listener.hpp"

namespace longattn::offload {

struct HttpRequest {
  std::string method, target, bearer, peer;
};
struct HttpResponse {
  std::string status, body;  // "200 OK", text
};
using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

class HttpEndpoint {
 public:
  // Binds `where` (HOST:PORT) and starts accepting; throws like bind_listener.
  HttpEndpoint(boost::asio::io_context& io, const std::string& where, HttpHandler handler, std::function<void()> count_accept_failure);
  int port() const;
  void close();  // posted to the io_context: stops accepting

 private:
  void accept();

  boost::asio::io_context& io_;
  boost::asio::ip::tcp::acceptor acceptor_;
  HttpHandler handler_;
  AcceptPacer pacer_;
};

}  // namespace longattn::offload
