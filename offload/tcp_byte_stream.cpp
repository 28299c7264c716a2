// The offload client's TCP ByteStream, plain or TLS (see tcp_byte_stream.hpp).
#include "offload/tcp_byte_stream.hpp"

#include <string>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>

#include "offload/tls_context.hpp"
#include "offload/tls_stream.hpp"

namespace longattn::offload {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

// What the pending operations use. Asio's composed reads and writes call the socket again after
// each partial transfer, so every completion handler holds this state: a completion that was
// already queued when the stream closed then finds a closed socket, not freed memory.
struct SocketState {
  SocketState(asio::io_context& io, std::shared_ptr<asio::ssl::context> ctx)
      : tls(std::move(ctx)), stream(io, tls.get()), resolver(io) {}
  std::shared_ptr<asio::ssl::context> tls;  // null: plain TCP
  TcpOrTlsStream stream;
  tcp::resolver resolver;

  std::string error(const boost::system::error_code& ec) {
    if (ec.category() == asio::error::get_ssl_category()) return kTlsFailurePrefix + describe_tls_failure(ec, stream.ssl(), true);
    return ec.message();
  }
};

class TcpByteStream final : public ByteStream {
 public:
  TcpByteStream(asio::io_context& io, std::shared_ptr<asio::ssl::context> tls, std::string server_name)
      : state_(std::make_shared<SocketState>(io, std::move(tls))), server_name_(std::move(server_name)) {}
  ~TcpByteStream() override { close(); }

  void connect(const std::string& host, const std::string& port, Handler done) override {
    auto st = state_;
    const std::string name = server_name_.empty() ? host : server_name_;
    st->resolver.async_resolve(host, port, [st, name, done = std::move(done)](boost::system::error_code ec, tcp::resolver::results_type res) mutable {
      if (ec) {
        done("cannot resolve: " + ec.message(), 0);
        return;
      }
      asio::async_connect(st->stream.socket(), res, [st, name, done = std::move(done)](boost::system::error_code connect_ec, const tcp::endpoint&) {
        if (connect_ec) {
          done(connect_ec.message(), 0);
          return;
        }
        boost::system::error_code ignored;
        st->stream.socket().set_option(tcp::no_delay(true), ignored);
        if (!st->stream.is_tls()) {
          done("", 0);
          return;
        }
        handshake(st, name, std::move(done));
      });
    });
  }
  void write(const void* data, std::size_t bytes, Handler done) override {
    auto st = state_;
    asio::async_write(st->stream, asio::buffer(data, bytes), [st, done = std::move(done)](boost::system::error_code ec, std::size_t n) {
      done(ec ? st->error(ec) : std::string(), n);
    });
  }
  void read(void* data, std::size_t bytes, Handler done) override {
    auto st = state_;
    asio::async_read(st->stream, asio::buffer(data, bytes), [st, done = std::move(done)](boost::system::error_code ec, std::size_t n) {
      done(ec ? st->error(ec) : std::string(), n);
    });
  }
  void close() override {
    boost::system::error_code ignored;
    state_->resolver.cancel();
    state_->stream.socket().close(ignored);
  }

 private:
  // The certificate must name `name`: a DNS name, or an IP address (matched against its IP
  // entries). SNI carries DNS names only.
  static void handshake(const std::shared_ptr<SocketState>& st, const std::string& name, Handler done) {
    boost::system::error_code not_ip;
    asio::ip::make_address(name, not_ip);
    if (not_ip) SSL_set_tlsext_host_name(st->stream.ssl(), name.c_str());
    st->stream.tls()->set_verify_callback(asio::ssl::host_name_verification(name));
    st->stream.async_handshake(asio::ssl::stream_base::client, [st, done = std::move(done)](boost::system::error_code ec) {
      done(ec ? st->error(ec) : std::string(), 0);
    });
  }

  std::shared_ptr<SocketState> state_;
  std::string server_name_;
};

}  // namespace

std::unique_ptr<ByteStream> make_tcp_byte_stream(asio::io_context& io) { return std::make_unique<TcpByteStream>(io, nullptr, ""); }

std::unique_ptr<ByteStream> make_tls_byte_stream(asio::io_context& io, std::shared_ptr<asio::ssl::context> tls, std::string server_name) {
  return std::make_unique<TcpByteStream>(io, std::move(tls), std::move(server_name));
}

}  // namespace longattn::offload
