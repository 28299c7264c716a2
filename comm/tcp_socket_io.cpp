// See tcp_socket_io.hpp. Deadlines use poll() on the native descriptor: Asio's synchronous calls
// have none, and an io_context run loop per step would be more machinery than the step.
#include "comm/tcp_socket_io.hpp"

#include <poll.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/write.hpp>
#include <thread>

#include "common/check.hpp"

namespace longattn::comm {
namespace {

int millis_left(Deadline deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
  return left > 0 ? static_cast<int>(std::min<long long>(left, 1000)) : 0;
}

// True when the descriptor is ready for `events` before the deadline.
bool wait_ready(int fd, short events, Deadline deadline) {
  while (true) {
    pollfd p{fd, events, 0};
    const int ms = millis_left(deadline);
    const int n = ::poll(&p, 1, ms);
    if (n > 0) return true;
    if (ms == 0) return false;
  }
}

}  // namespace

tcp::socket connect_with_retry(boost::asio::io_context& io, const std::string& host, int port, Deadline deadline,
                               const std::string& who) {
  tcp::resolver resolver(io);
  boost::system::error_code ec;
  const auto endpoints = resolver.resolve(host, std::to_string(port), ec);
  LONGATTN_REQUIRE(!ec, ErrorCode::invalid_argument, "cannot resolve {} address '{}': {}", who, host, ec.message());
  while (true) {
    tcp::socket socket(io);
    boost::asio::connect(socket, endpoints, ec);
    if (!ec) {
      socket.set_option(tcp::no_delay(true));
      return socket;
    }
    if (std::chrono::steady_clock::now() > deadline)
      throw Error(ErrorCode::timeout, fmt::format("could not connect to {} at {}:{} before the timeout (last error: {}); is it "
                                                  "running, and are MASTER_ADDR and MASTER_PORT the same on every rank?",
                                                  who, host, port, ec.message()));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

tcp::socket accept_before(tcp::acceptor& acceptor, Deadline deadline, const std::string& waiting_for) {
  while (true) {
    LONGATTN_REQUIRE(wait_ready(acceptor.native_handle(), POLLIN, deadline), ErrorCode::timeout,
                     "timed out waiting for {} to connect (LONGATTN_COMM_TIMEOUT_S); did every rank start, with the same "
                     "WORLD_SIZE, MASTER_ADDR and MASTER_PORT?", waiting_for);
    boost::system::error_code ec;
    tcp::socket socket = acceptor.accept(ec);
    if (!ec) {
      socket.set_option(tcp::no_delay(true));
      return socket;
    }
  }
}

void read_before(tcp::socket& socket, void* buffer, std::size_t bytes, Deadline deadline, const std::string& peer) {
  auto* at = static_cast<char*>(buffer);
  while (bytes > 0) {
    LONGATTN_REQUIRE(wait_ready(socket.native_handle(), POLLIN, deadline), ErrorCode::timeout,
                     "{} connected but did not answer before the timeout", peer);
    boost::system::error_code ec;
    const std::size_t n = socket.read_some(boost::asio::buffer(at, bytes), ec);
    LONGATTN_REQUIRE(!ec, ErrorCode::communication, "the connection to {} broke while setting up: {}", peer, ec.message());
    at += n;
    bytes -= n;
  }
}

void write_all(tcp::socket& socket, const void* buffer, std::size_t bytes, const std::string& peer) {
  boost::system::error_code ec;
  boost::asio::write(socket, boost::asio::buffer(buffer, bytes), ec);
  LONGATTN_REQUIRE(!ec, ErrorCode::communication, "sending to {} failed: {}", peer, ec.message());
}

}  // namespace longattn::comm
