// The offload client's TCP ByteStream (transport.hpp), plain or TLS, on Boost.Asio and the
// client's I/O thread.
#pragma once

#include <memory>
#include <string>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio/io_context.hpp>

#include "offload/transport.hpp"

namespace boost::asio::ssl {
class context;
}

namespace longattn::offload {

// The stream's socket lives as long as any operation on it: destroying the stream right after
// close() is safe even while a write or read has not yet delivered its (cancelled) completion.
std::unique_ptr<ByteStream> make_tcp_byte_stream(boost::asio::io_context& io);

// The same over TLS: after the TCP connect, a handshake that checks the server's certificate
// against `tls` and the name `server_name` (empty: the host connected to). A refused handshake
// and every later TLS error are reported with is_tls_failure's prefix (tls_context.hpp).
std::unique_ptr<ByteStream> make_tls_byte_stream(boost::asio::io_context& io, std::shared_ptr<boost::asio::ssl::context> tls,
                                                 std::string server_name);

}  // namespace longattn::offload
