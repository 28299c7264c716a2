// The TCP communicator's moving parts: one connection per peer (the mesh), a sender thread and a
// receiver thread per connection, and matching of received messages to posted receives by
// (communicator id, source, tag) in arrival order, as MPI matches. Sub-communicators share the
// transport and differ by id. A connection that breaks marks its peer dead: every pending and
// later operation with it fails with an Error naming the peer instead of waiting.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/tcp_bootstrap.hpp"

namespace longattn::comm {

// One side of a point-to-point operation, shared by the request and the transport's threads.
struct TcpOperation {
  void* buffer = nullptr;  // receives: where the message goes
  std::size_t bytes = 0;
  bool done = false;
  std::string error;  // set instead of done when the peer died or the sizes differ
};

class TcpTransport {
 public:
  // `io` is the context the mesh's sockets were made on: it must outlive them, so it lives here.
  TcpTransport(std::unique_ptr<boost::asio::io_context> io, TcpMesh mesh);
  // Lets every sender finish its queued messages for at most the teardown bound, then closes the
  // connections (a live peer that stopped reading would otherwise block a sender forever) with a
  // logged warning naming the peers whose messages were dropped.
  ~TcpTransport();
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  const std::vector<std::string>& hostnames() const noexcept { return hostnames_; }
  // How long the destructor waits for queued messages to be written (the communicator's timeout).
  void set_teardown_bound(std::chrono::milliseconds bound);
  // "rank 3 (host, 10.0.0.3:40123)", for errors.
  std::string describe(int global_rank) const;

  // The bytes are copied, so the caller's buffer is free at once; the operation completes when
  // they are written to the socket.
  std::shared_ptr<TcpOperation> send(std::uint64_t comm_id, int peer, int tag, const void* data, std::size_t bytes);
  std::shared_ptr<TcpOperation> receive(std::uint64_t comm_id, int peer, int tag, void* buffer, std::size_t bytes);
  // Forgets a receive that will not be waited for (its request is gone), so no message lands in
  // freed memory.
  void cancel(const std::shared_ptr<TcpOperation>& op);
  // Waits until `op` is done; throws Error(communication) with its error, or Error(timeout)
  // saying `what` did not complete.
  void wait(const std::shared_ptr<TcpOperation>& op, std::chrono::seconds timeout, const std::string& what, int peer);
  bool test(const std::shared_ptr<TcpOperation>& op);

 private:
  struct Outgoing {
    std::uint64_t comm_id;
    std::int32_t tag;
    std::vector<char> payload;
    std::shared_ptr<TcpOperation> op;
  };
  struct Peer {
    std::unique_ptr<tcp::socket> socket;
    std::deque<Outgoing> outbox;
    std::thread sender, receiver;
    std::string dead;  // why the connection broke; empty while it works
    bool sending = false;  // the sender is writing a message
  };
  using Key = std::tuple<std::uint64_t, int, int>;  // communicator id, source, tag

  void send_loop(int peer);
  void receive_loop(int peer);
  void deliver(const Key& key, std::vector<char> payload);  // with mu_ held
  void mark_dead(int peer, const std::string& why);          // with mu_ held

  std::unique_ptr<boost::asio::io_context> io_;  // first member: destroyed after every socket
  int rank_, size_;
  std::vector<std::string> hostnames_, addresses_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  int senders_running_ = 0;
  std::chrono::milliseconds teardown_bound_{std::chrono::seconds(300)};
  std::vector<Peer> peers_;
  std::map<Key, std::deque<std::shared_ptr<TcpOperation>>> posted_;
  std::map<Key, std::deque<std::vector<char>>> unexpected_;
};

}  // namespace longattn::comm
