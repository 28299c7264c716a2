// Setting up the TCP communicator's full mesh: torchrun's environment read and checked, a
// rendezvous at the master (rank 0 gathers every rank's listening port, host name and address, and
// sends the table back), then every rank connects to each lower rank and accepts each higher one.
#pragma once

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/tcp_socket_io.hpp"
#include "longattn/communicator.hpp"

namespace longattn::comm {

struct TcpMesh {
  int rank = 0, size = 1;
  std::vector<std::unique_ptr<tcp::socket>> peers;  // size entries; null for this rank
  std::vector<std::string> hostnames;               // per rank, for topology and messages
  std::vector<std::string> addresses;               // per rank, "address:port" for messages
};

// Collective over the ranks of `where`. Every step is bounded by `timeout`; a missing, mismatched
// or duplicated rank is an Error naming it.
TcpMesh build_mesh(boost::asio::io_context& io, const TcpRendezvous& where, std::chrono::seconds timeout);

}  // namespace longattn::comm
