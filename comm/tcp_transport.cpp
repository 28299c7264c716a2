// See tcp_transport.hpp. Messages are a fixed header (communicator id, tag, length) and the bytes.
// A receiver thread always drains its socket, into a posted receive or the unexpected queue, so two
// ranks sending to each other at once never block on full socket buffers.
#include "comm/tcp_transport.hpp"

#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <array>
#include <cstring>

#include "common/check.hpp"
#include "longattn/log.hpp"

namespace longattn::comm {
namespace {
struct WireHeader {
  std::uint64_t comm_id;
  std::uint64_t bytes;
  std::int32_t tag;
  std::int32_t reserved;
};
}  // namespace

TcpTransport::TcpTransport(std::unique_ptr<boost::asio::io_context> io, TcpMesh mesh)
    : io_(std::move(io)), rank_(mesh.rank), size_(mesh.size), hostnames_(std::move(mesh.hostnames)), addresses_(std::move(mesh.addresses)),
      peers_(static_cast<std::size_t>(mesh.size)) {
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    auto& peer = peers_[static_cast<std::size_t>(p)];
    peer.socket = std::move(mesh.peers[static_cast<std::size_t>(p)]);
    ++senders_running_;
    peer.sender = std::thread([this, p] { send_loop(p); });
    peer.receiver = std::thread([this, p] { receive_loop(p); });
  }
}

TcpTransport::~TcpTransport() {
  std::vector<int> stuck;
  {
    std::unique_lock lock(mu_);
    stopping_ = true;  // senders finish their outboxes first, so a last message still arrives
    cv_.notify_all();
    if (!cv_.wait_for(lock, teardown_bound_, [&] { return senders_running_ == 0; }))
      for (int p = 0; p < size_; ++p)
        if (peers_[static_cast<std::size_t>(p)].sending || !peers_[static_cast<std::size_t>(p)].outbox.empty()) stuck.push_back(p);
  }
  if (!stuck.empty()) {
    try {
      std::string who;
      for (int p : stuck) who += (who.empty() ? "" : ", ") + describe(p);
      logger(Subsystem::comm).warn("closing the TCP communicator: messages to {} were not written within {} ms "
                                   "(LONGATTN_COMM_TIMEOUT_S) and are dropped; is that rank stuck or not reading?",
                                   who, teardown_bound_.count());
    } catch (...) {
      // A destructor must not throw; the connections are closed below all the same.
    }
  }
  // Shutting a socket down wakes its receiver, and a sender blocked on a peer that does not read.
  for (auto& peer : peers_) {
    if (!peer.socket) continue;
    boost::system::error_code ignored;
    peer.socket->shutdown(tcp::socket::shutdown_both, ignored);
  }
  for (auto& peer : peers_) {
    if (peer.sender.joinable()) peer.sender.join();
    if (peer.receiver.joinable()) peer.receiver.join();
  }
}

void TcpTransport::set_teardown_bound(std::chrono::milliseconds bound) {
  std::lock_guard lock(mu_);
  teardown_bound_ = bound;
}

std::string TcpTransport::describe(int global_rank) const {
  const auto r = static_cast<std::size_t>(global_rank);
  return fmt::format("rank {} ({}, {})", global_rank, hostnames_[r], addresses_[r]);
}

std::shared_ptr<TcpOperation> TcpTransport::send(std::uint64_t comm_id, int peer, int tag, const void* data, std::size_t bytes) {
  auto op = std::make_shared<TcpOperation>();
  op->bytes = bytes;
  std::vector<char> payload(static_cast<const char*>(data), static_cast<const char*>(data) + bytes);
  std::lock_guard lock(mu_);
  if (peer == rank_) {
    deliver({comm_id, rank_, tag}, std::move(payload));
    op->done = true;
    return op;
  }
  auto& p = peers_[static_cast<std::size_t>(peer)];
  if (!p.dead.empty()) {
    op->error = p.dead;
    return op;
  }
  p.outbox.push_back({comm_id, tag, std::move(payload), op});
  cv_.notify_all();
  return op;
}

std::shared_ptr<TcpOperation> TcpTransport::receive(std::uint64_t comm_id, int peer, int tag, void* buffer, std::size_t bytes) {
  auto op = std::make_shared<TcpOperation>();
  op->buffer = buffer;
  op->bytes = bytes;
  const Key key{comm_id, peer, tag};
  std::lock_guard lock(mu_);
  auto waiting = unexpected_.find(key);
  if (waiting != unexpected_.end() && !waiting->second.empty()) {
    auto payload = std::move(waiting->second.front());
    waiting->second.pop_front();
    if (payload.size() != bytes)
      op->error = fmt::format("message size mismatch: {} sent {} bytes, {} expected", describe(peer), payload.size(), bytes);
    else {
      if (bytes) std::memcpy(buffer, payload.data(), bytes);
      op->done = true;
    }
    return op;
  }
  if (peer != rank_ && !peers_[static_cast<std::size_t>(peer)].dead.empty()) {
    op->error = peers_[static_cast<std::size_t>(peer)].dead;
    return op;
  }
  posted_[key].push_back(op);
  return op;
}

void TcpTransport::cancel(const std::shared_ptr<TcpOperation>& op) {
  std::lock_guard lock(mu_);
  if (op->done || !op->error.empty() || !op->buffer) return;
  for (auto& [key, queue] : posted_) std::erase(queue, op);
}

void TcpTransport::wait(const std::shared_ptr<TcpOperation>& op, std::chrono::seconds timeout, const std::string& what, int peer) {
  std::unique_lock lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return op->done || !op->error.empty(); }))
    throw Error(ErrorCode::timeout, fmt::format("{} {} did not complete within {} s (LONGATTN_COMM_TIMEOUT_S); is that rank alive, "
                                                "and running the same program with the same arguments?",
                                                what, describe(peer), timeout.count()));
  if (!op->error.empty()) throw Error(ErrorCode::communication, fmt::format("{} {}: {}", what, describe(peer), op->error));
}

bool TcpTransport::test(const std::shared_ptr<TcpOperation>& op) {
  std::lock_guard lock(mu_);
  return op->done || !op->error.empty();
}

void TcpTransport::deliver(const Key& key, std::vector<char> payload) {
  auto posted = posted_.find(key);
  if (posted == posted_.end() || posted->second.empty()) {
    unexpected_[key].push_back(std::move(payload));
    return;
  }
  auto op = posted->second.front();
  posted->second.pop_front();
  if (payload.size() != op->bytes)
    op->error = fmt::format("message size mismatch: {} sent {} bytes, {} expected", describe(std::get<1>(key)), payload.size(), op->bytes);
  else {
    if (!payload.empty()) std::memcpy(op->buffer, payload.data(), payload.size());
    op->done = true;
  }
  cv_.notify_all();
}

void TcpTransport::mark_dead(int peer, const std::string& why) {
  auto& p = peers_[static_cast<std::size_t>(peer)];
  if (!p.dead.empty()) return;
  p.dead = why;
  for (auto& [key, queue] : posted_) {
    if (std::get<1>(key) != peer) continue;
    for (auto& op : queue) op->error = why;
    queue.clear();
  }
  for (auto& out : p.outbox) out.op->error = why;
  p.outbox.clear();
  cv_.notify_all();
}

void TcpTransport::send_loop(int peer) {
  auto& p = peers_[static_cast<std::size_t>(peer)];
  std::unique_lock lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return stopping_ || !p.outbox.empty(); });
    if (p.outbox.empty()) {  // stopping, and everything was sent
      --senders_running_;
      cv_.notify_all();
      return;
    }
    Outgoing out = std::move(p.outbox.front());
    p.outbox.pop_front();
    p.sending = true;
    lock.unlock();
    const WireHeader header{out.comm_id, out.payload.size(), out.tag, 0};
    const std::array<boost::asio::const_buffer, 2> pieces{boost::asio::buffer(&header, sizeof header),
                                                          boost::asio::buffer(out.payload)};
    boost::system::error_code ec;
    boost::asio::write(*p.socket, pieces, ec);
    lock.lock();
    p.sending = false;
    if (ec) {
      out.op->error = fmt::format("the connection broke while sending ({}); did that rank exit or crash?", ec.message());
      mark_dead(peer, out.op->error);
    } else {
      out.op->done = true;
    }
    cv_.notify_all();
  }
}

void TcpTransport::receive_loop(int peer) {
  auto& p = peers_[static_cast<std::size_t>(peer)];
  while (true) {
    WireHeader header{};
    boost::system::error_code ec;
    boost::asio::read(*p.socket, boost::asio::buffer(&header, sizeof header), ec);
    std::vector<char> payload;
    if (!ec) {
      payload.resize(header.bytes);
      boost::asio::read(*p.socket, boost::asio::buffer(payload), ec);
    }
    std::lock_guard lock(mu_);
    if (ec) {
      mark_dead(peer, stopping_ ? "this communicator was destroyed"
                                : fmt::format("the connection closed ({}); did that rank exit or crash?", ec.message()));
      return;
    }
    deliver({header.comm_id, peer, header.tag}, std::move(payload));
  }
}

}  // namespace longattn::comm
