// The offload client's TCP ByteStream (transport.hpp), on Boost.Asio and the client's I/O thread.
#pragma once

#include <memory>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio/io_context.hpp>

#include "offload/transport.hpp"

namespace longattn::offload {

// The stream's socket lives as long as any operation on it: destroying the stream right after
// close() is safe even while a write or read has not yet delivered its (cancelled) completion.
std::unique_ptr<ByteStream> make_tcp_byte_stream(boost::asio::io_context& io);

}  // namespace longattn::offload
