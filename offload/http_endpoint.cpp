// The HTTP listener (see http_endpoint.hpp).
#include "offload/http_endpoint.hpp"

#include <cctype>
#include <istream>

#include <fmt/format.h>

namespace longattn::offload {
namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

class HttpConnection : public std::enable_shared_from_this<HttpConnection> {
 public:
  HttpConnection(tcp::socket socket, const HttpHandler& handler) : socket_(std::move(socket)), timer_(socket_.get_executor()), handler_(handler) {}

  void start() {
    // A scraper that does not finish its request within 5 s is dropped.
    timer_.expires_after(std::chrono::seconds(5));
    timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec) return;
      boost::system::error_code e;
      self->socket_.close(e);
    });
    asio::async_read_until(socket_, head_, "\r\n\r\n", [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
      self->timer_.cancel();
      if (ec) return;
      self->answer(self->parse());
    });
  }

 private:
  HttpRequest parse() {
    HttpRequest r;
    std::istream in(&head_);
    std::string line;
    in >> r.method >> r.target;
    std::getline(in, line);
    while (std::getline(in, line) && line != "\r" && !line.empty()) {
      if (line.back() == '\r') line.pop_back();
      const auto colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::string name = line.substr(0, colon);
      for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      std::string value = line.substr(colon + 1);
      value.erase(0, value.find_first_not_of(' '));
      if (name == "authorization" && value.rfind("Bearer ", 0) == 0) r.bearer = value.substr(7);
    }
    boost::system::error_code ec;
    const auto ep = socket_.remote_endpoint(ec);
    r.peer = ec ? "?" : fmt::format("{}:{}", ep.address().to_string(), ep.port());
    return r;
  }

  void answer(const HttpRequest& request) {
    const HttpResponse response = handler_(request);
    out_ = fmt::format("HTTP/1.1 {}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                       response.status, response.body.size(), response.body);
    asio::async_write(socket_, asio::buffer(out_), [self = shared_from_this()](boost::system::error_code, std::size_t) {
      boost::system::error_code e;
      self->socket_.shutdown(tcp::socket::shutdown_both, e);
      self->socket_.close(e);
    });
  }

  tcp::socket socket_;
  asio::steady_timer timer_;
  HttpHandler handler_;
  asio::streambuf head_{8192};
  std::string out_;
};

}  // namespace

HttpEndpoint::HttpEndpoint(asio::io_context& io, const std::string& where, HttpHandler handler, std::function<void()> count_accept_failure)
    : io_(io), acceptor_(io), handler_(std::move(handler)), pacer_(io, std::move(count_accept_failure)) {
  bind_listener(acceptor_, io_, where);
  accept();
}

int HttpEndpoint::port() const { return acceptor_.is_open() ? acceptor_.local_endpoint().port() : 0; }

void HttpEndpoint::close() {
  asio::post(io_, [this] {
    boost::system::error_code ec;
    acceptor_.close(ec);
    pacer_.cancel();
  });
}

void HttpEndpoint::accept() {
  acceptor_.async_accept(asio::make_strand(io_), [this](boost::system::error_code ec, tcp::socket socket) {
    if (ec) {
      if (!acceptor_.is_open() || ec == asio::error::operation_aborted) return;
      if (out_of_descriptors(ec)) {
        pacer_.failed(ec, [this] {
          if (acceptor_.is_open()) accept();
        });
        return;
      }
      accept();
      return;
    }
    pacer_.succeeded();
    std::make_shared<HttpConnection>(std::move(socket), handler_)->start();
    accept();
  });
}

}  // namespace longattn::offload
