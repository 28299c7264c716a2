// The seam between the offload protocol and the byte transports (TCP via Boost.Asio, UCX where
// built). A server transport reads whole frames and hands them to a FrameService (the server's
// request logic, written once); a client drives a ByteStream. Both move the same frames.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "offload/protocol.hpp"

namespace boost::asio {
class io_context;
}

namespace longattn::offload {

// What the server knows about one connection.
struct Session {
  bool authed = false;
  std::uint64_t client = 0;
  std::string peer;
};

// Sends one reply frame, then closes the connection when `close`. Thread-safe (attends answer from
// the compute thread); a transport drops replies to connections already gone.
using Respond = std::function<void(std::vector<std::byte> frame, bool close)>;

class FrameService {
 public:
  virtual ~FrameService() = default;
  virtual const Limits& limits() const = 0;
  // A header that passed decode_header, before its payload is read: throws Error for a frame this
  // session may not send (before hello, only a hello-sized frame).
  virtual void check_header(const Session& s, const FrameHeader& h) = 0;
  // Receive buffers count against the memory limit (ReceiveBuffer, receive_buffer.hpp): reserve
  // throws Error(out_of_capacity) when `bytes` more do not fit.
  virtual void reserve_receive_buffer(std::size_t bytes) = 0;
  virtual void release_receive_buffer(std::size_t bytes) noexcept = 0;
  // A complete request frame whose header passed decode_header. The service may take the payload
  // (move from it) when it answers later; otherwise the transport reuses the buffer for the next
  // frame, so bulk appends do not allocate (and page-fault) a fresh buffer per frame.
  virtual void on_frame(Session& s, const FrameHeader& h, std::vector<std::byte>& payload, Respond respond) = 0;
  // The error frame to send before closing a connection whose header was refused.
  virtual std::vector<std::byte> on_bad_header(Session& s, const Error& e) = 0;
  // The error reply to a frame whose payload had no room and was read and thrown away; the
  // connection stays open.
  virtual std::vector<std::byte> on_discarded_frame(Session& s, const FrameHeader& h, const Error& e) = 0;
  virtual void on_bytes(std::size_t in, std::size_t out) = 0;
  virtual void on_connection_opened() = 0;
  virtual void on_connection_closed(const Session& s) = 0;
  virtual void on_timeout() = 0;        // a connection closed for a hello or frame timeout
  virtual void on_accept_failed() = 0;  // e.g. out of file descriptors
  virtual bool draining() const = 0;
  virtual double hello_timeout_s() const = 0;  // a connection must authenticate within this
  virtual double frame_timeout_s() const = 0;  // a started frame (header and payload) must arrive within this
  // Connections that have not authenticated yet, at most: past it, the oldest of them is closed,
  // so that strangers can neither take the slots of token holders nor keep them from saying hello.
  virtual int max_unauthenticated() const = 0;
};

// Client side: an ordered byte stream; every handler runs on the client's I/O thread.
class ByteStream {
 public:
  using Handler = std::function<void(const std::string& error, std::size_t bytes)>;  // error empty = success
  virtual ~ByteStream() = default;
  virtual void connect(const std::string& host, const std::string& port, Handler done) = 0;
  virtual void write(const void* data, std::size_t bytes, Handler done) = 0;  // data valid until done
  virtual void read(void* data, std::size_t bytes, Handler done) = 0;         // exactly `bytes`
  virtual void close() = 0;  // pending handlers may still run (with an error)
};

// A server transport: listens, reads whole frames into a FrameService, writes its replies.
class ServerTransport {
 public:
  virtual ~ServerTransport() = default;
  virtual int port() const = 0;
  // New connections are refused from now on; open ones are served on.
  virtual void stop_accepting() = 0;
  // Closes the listener and every connection (abrupt: reset, like a crashed process).
  virtual void stop(bool abrupt) = 0;
  virtual void join() = 0;  // after stop: waits for the transport's own threads
};

// TCP (Boost.Asio): connections run on `io`, whose threads the caller runs.
std::unique_ptr<ServerTransport> make_tcp_server(boost::asio::io_context& io, const std::string& host, int port, FrameService& service);

// UCX (stream API over whatever UCX picks: TCP, shared memory, RDMA). Available only where longattn
// was built with UCX; elsewhere the factories throw Error(unsupported).
bool ucx_available() noexcept;
std::unique_ptr<ServerTransport> make_ucx_server(const std::string& host, int port, FrameService& service);

// One UCX worker thread per client; streams post their completions to `post` (the client's I/O thread).
class UcxClientEngine {
 public:
  virtual ~UcxClientEngine() = default;
  virtual std::unique_ptr<ByteStream> stream() = 0;
};
std::unique_ptr<UcxClientEngine> make_ucx_client(std::function<void(std::function<void()>)> post);

}  // namespace longattn::offload
