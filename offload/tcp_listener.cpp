// TCP listening shared by the protocol and HTTP ports (see tcp_listener.hpp).
#include "offload/tcp_listener.hpp"

#include <cerrno>

#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "offload/server.hpp"

namespace longattn::offload {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

void bind_listener(tcp::acceptor& acceptor, asio::io_context& io, const std::string& where) {
  const auto [host, port] = parse_host_port(where);
  boost::system::error_code ec;
  const auto addr = asio::ip::make_address(host, ec);
  tcp::endpoint ep;
  if (ec) {
    tcp::resolver res(io);
    auto r = res.resolve(host, std::to_string(port), ec);
    LONGATTN_REQUIRE(!ec && !r.empty(), ErrorCode::invalid_argument, "cannot resolve listen address '{}': {}", where, ec.message());
    ep = *r.begin();
  } else {
    ep = tcp::endpoint(addr, static_cast<unsigned short>(port));
  }
  acceptor.open(ep.protocol());
  acceptor.set_option(tcp::acceptor::reuse_address(true));
  acceptor.bind(ep, ec);
  LONGATTN_REQUIRE(!ec, ErrorCode::io, "cannot listen on {}: {}", where, ec.message());
  acceptor.listen(asio::socket_base::max_listen_connections);
}

bool out_of_descriptors(const boost::system::error_code& ec) {
  return ec == asio::error::no_descriptors || ec == asio::error::no_buffer_space || ec == asio::error::no_memory ||
         ec.value() == ENFILE;
}

void AcceptPacer::failed(const boost::system::error_code& ec, std::function<void()> retry) {
  count_failure_();
  unlogged_++;
  const auto now = std::chrono::steady_clock::now();
  if (now - logged_ >= kLogInterval) {
    const bool fds = ec == asio::error::no_descriptors || ec.value() == ENFILE;
    logger(Subsystem::offload)
        .warn("accept failed {} time{} since the last report: {}{}", unlogged_, unlogged_ == 1 ? "" : "s", ec.message(),
              fds ? "; the process is out of file descriptors: raise its open-file limit (ulimit -n, LimitNOFILE=) or lower "
                    "--max-connections; new connections wait meanwhile"
                  : "");
    logged_ = now;
    unlogged_ = 0;
  }
  timer_.expires_after(delay_);
  delay_ = std::min<std::chrono::steady_clock::duration>(delay_ * 2, kMaxDelay);
  timer_.async_wait([retry = std::move(retry)](boost::system::error_code e) {
    if (!e) retry();
  });
}

}  // namespace longattn::offload
