// Blocking socket steps with a deadline, for setting up TCP connections: a peer that never
// connects or never answers becomes an Error(timeout) saying who was waited for, not a hang.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <chrono>
#include <cstddef>
#include <string>

namespace longattn::comm {

using tcp = boost::asio::ip::tcp;
using Deadline = std::chrono::steady_clock::time_point;

// Connects to host:port, retrying refused connections (the listener may not be up yet) until the
// deadline. `who` names the peer in the error.
tcp::socket connect_with_retry(boost::asio::io_context& io, const std::string& host, int port, Deadline deadline,
                               const std::string& who);
// Accepts one connection; Error(timeout) with `waiting_for` in the message at the deadline.
tcp::socket accept_before(tcp::acceptor& acceptor, Deadline deadline, const std::string& waiting_for);
// Reads exactly `bytes`; Error(timeout) at the deadline, Error(communication) when the peer closes.
void read_before(tcp::socket& socket, void* buffer, std::size_t bytes, Deadline deadline, const std::string& peer);
void write_all(tcp::socket& socket, const void* buffer, std::size_t bytes, const std::string& peer);

}  // namespace longattn::comm
