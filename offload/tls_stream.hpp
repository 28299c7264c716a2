// A TCP stream that is either plain or TLS, chosen per connection, with the interface Boost.Asio's
// composed reads and writes need: the server's connections and the client's stream are written
// once against it, whether TLS is on or off.
#pragma once

#include <memory>
#include <optional>
#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>

namespace longattn::offload {

class TcpOrTlsStream {
 public:
  using tcp = boost::asio::ip::tcp;
  using TlsStream = boost::asio::ssl::stream<tcp::socket>;
  using executor_type = tcp::socket::executor_type;

  // `tls` null: plain TCP. Otherwise the context must outlive the stream.
  TcpOrTlsStream(tcp::socket socket, boost::asio::ssl::context* tls) {
    if (tls) {
      tls_.emplace(std::move(socket), *tls);
    } else {
      plain_.emplace(std::move(socket));
    }
  }

  // A fresh, unconnected socket on `io` (the client side).
  TcpOrTlsStream(boost::asio::io_context& io, boost::asio::ssl::context* tls) {
    if (tls) {
      tls_.emplace(io, *tls);
    } else {
      plain_.emplace(io);
    }
  }

  bool is_tls() const { return tls_.has_value(); }
  TlsStream* tls() { return tls_ ? &*tls_ : nullptr; }
  SSL* ssl() { return tls_ ? tls_->native_handle() : nullptr; }
  tcp::socket& socket() { return tls_ ? tls_->next_layer() : *plain_; }
  executor_type get_executor() { return socket().get_executor(); }

  // Plain TCP has nothing to negotiate: `done` runs at once (posted) with success.
  template <class Handler>
  void async_handshake(boost::asio::ssl::stream_base::handshake_type side, Handler&& done) {
    if (tls_) {
      tls_->async_handshake(side, std::forward<Handler>(done));
    } else {
      boost::asio::post(get_executor(), [done = std::forward<Handler>(done)]() mutable { done(boost::system::error_code()); });
    }
  }

  template <class Buffers, class Handler>
  void async_read_some(const Buffers& buffers, Handler&& done) {
    if (tls_) {
      tls_->async_read_some(buffers, std::forward<Handler>(done));
    } else {
      plain_->async_read_some(buffers, std::forward<Handler>(done));
    }
  }
  template <class Buffers, class Handler>
  void async_write_some(const Buffers& buffers, Handler&& done) {
    if (tls_) {
      tls_->async_write_some(buffers, std::forward<Handler>(done));
    } else {
      plain_->async_write_some(buffers, std::forward<Handler>(done));
    }
  }

 private:
  std::optional<tcp::socket> plain_;
  std::optional<TlsStream> tls_;
};

}  // namespace longattn::offload
