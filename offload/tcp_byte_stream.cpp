// The offload client's TCP ByteStream (see tcp_byte_stream.hpp).
#include "offload/tcp_byte_stream.hpp"

#include <string>

#include <boost/asio.hpp>

namespace longattn::offload {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

// What the pending operations use. Asio's composed reads and writes call the socket again after
// each partial transfer, so every completion handler holds this state: a completion that was
// already queued when the stream closed then finds a closed socket, not freed memory.
struct SocketState {
  explicit SocketState(asio::io_context& io) : socket(io), resolver(io) {}
  tcp::socket socket;
  tcp::resolver resolver;
};

class TcpByteStream final : public ByteStream {
 public:
  explicit TcpByteStream(asio::io_context& io) : state_(std::make_shared<SocketState>(io)) {}
  ~TcpByteStream() override { close(); }

  void connect(const std::string& host, const std::string& port, Handler done) override {
    auto st = state_;
    st->resolver.async_resolve(host, port, [st, done = std::move(done)](boost::system::error_code ec, tcp::resolver::results_type res) mutable {
      if (ec) {
        done("cannot resolve: " + ec.message(), 0);
        return;
      }
      asio::async_connect(st->socket, res, [st, done = std::move(done)](boost::system::error_code connect_ec, const tcp::endpoint&) {
        if (connect_ec) {
          done(connect_ec.message(), 0);
          return;
        }
        boost::system::error_code ignored;
        st->socket.set_option(tcp::no_delay(true), ignored);
        done("", 0);
      });
    });
  }
  void write(const void* data, std::size_t bytes, Handler done) override {
    auto st = state_;
    asio::async_write(st->socket, asio::buffer(data, bytes), [st, done = std::move(done)](boost::system::error_code ec, std::size_t n) {
      done(ec ? ec.message() : std::string(), n);
    });
  }
  void read(void* data, std::size_t bytes, Handler done) override {
    auto st = state_;
    asio::async_read(st->socket, asio::buffer(data, bytes), [st, done = std::move(done)](boost::system::error_code ec, std::size_t n) {
      done(ec ? ec.message() : std::string(), n);
    });
  }
  void close() override {
    boost::system::error_code ignored;
    state_->resolver.cancel();
    state_->socket.close(ignored);
  }

 private:
  std::shared_ptr<SocketState> state_;
};

}  // namespace

std::unique_ptr<ByteStream> make_tcp_byte_stream(asio::io_context& io) { return std::make_unique<TcpByteStream>(io); }

}  // namespace longattn::offload
