// The server's TCP transport with TLS (tcp_transport.cpp); transport.hpp's make_tcp_server is the
// same without TLS.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "offload/transport.hpp"

namespace boost::asio::ssl {
class context;
}

namespace longattn::offload {

struct TcpServerTls {
  std::shared_ptr<boost::asio::ssl::context> context;  // null: plain TCP
  std::function<void()> on_handshake_failed;            // counts refused handshakes (metrics)
};

std::unique_ptr<ServerTransport> make_tcp_server(boost::asio::io_context& io, const std::string& host, int port, FrameService& service,
                                                 TcpServerTls tls);

}  // namespace longattn::offload
