// The offload server: puts its parts together and runs their lifecycle. The KV store holds the
// sequences, the request handler serves the protocol (request_handler.cpp), a transport carries it
// (tcp_transport.cpp, ucx_transport.cpp), attends run on the compute queue, the HTTP port answers
// metrics and admin requests (admin.cpp), and a housekeeping tick releases orphaned KV.
#include "offload/server.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "common/check.hpp"
#include "longattn/log.hpp"
#include "offload/admin.hpp"
#include "offload/compute_queue.hpp"
#include "offload/http_endpoint.hpp"
#include "offload/metrics.hpp"
#include "offload/open_files.hpp"
#include "offload/request_handler.hpp"
#include "offload/tcp_listener.hpp"
#include "offload/tcp_transport.hpp"

namespace longattn::offload {

namespace asio = boost::asio;

bool secrets_equal(const std::string& a, const std::string& b) noexcept {
  // Length is not secret-bearing here (the token file's length is not the secret), but the bytes
  // are compared without an early exit.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const std::size_t n = std::max(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

std::pair<std::string, int> parse_host_port(const std::string& text) {
  const auto colon = text.rfind(':');
  LONGATTN_INVALID(colon != std::string::npos && colon + 1 < text.size(), "'{}' is not HOST:PORT", text);
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  const long port = std::strtol(text.c_str() + colon + 1, &end, 10);
  LONGATTN_INVALID(end && *end == '\0' && port >= 0 && port <= 65535, "'{}': the port must be a number in [0, 65535]", text);
  LONGATTN_INVALID(!host.empty(), "'{}': missing host (use 0.0.0.0 to listen on every interface)", text);
  return {host, static_cast<int>(port)};
}

namespace {

// How often the housekeeping tick runs (orphan release, the failed-authentication summary).
constexpr auto kHousekeepingPeriod = std::chrono::milliseconds(250);
// How long a graceful shutdown waits for the attends in flight.
constexpr auto kDrainLimit = std::chrono::seconds(30);

}  // namespace

struct Server::Impl {
  explicit Impl(ServerOptions o, const Server& server)
      : opt(std::move(o)),
        store(KvStoreOptions{opt.memory_limit, opt.per_client_limit, opt.page_tokens, opt.device}),
        requests(opt, store, counters, compute, [&server] { return server.metrics_text(); }),
        admin(opt.token, store, requests, [&server] { return server.metrics_text(); }),
        tls(opt.tls.enabled() ? make_server_tls_context(opt.tls) : nullptr) {}

  // Raises the open-file limit to what the connection limits need, or says that it cannot.
  void check_open_file_limit() const {
    const std::size_t wanted = static_cast<std::size_t>(opt.max_connections) + static_cast<std::size_t>(opt.max_unauthenticated) + 64;
    const auto lim = raise_open_file_limit(wanted);
    if (lim.soft >= wanted || lim.soft == 0) return;
    logger(Subsystem::offload)
        .warn("the open-file limit is {} (hard limit {}), below the {} descriptors that --max-connections {} and "
              "--max-unauthenticated {} need; connections past it wait in the listen queue. Raise it (ulimit -n, "
              "LimitNOFILE= in the systemd unit) or lower --max-connections",
              lim.soft, lim.hard, wanted, opt.max_connections, opt.max_unauthenticated);
  }

  void housekeeping_tick() {
    housekeeping.expires_after(kHousekeepingPeriod);
    housekeeping.async_wait([this](boost::system::error_code ec) {
      if (ec || stopped) return;
      requests.housekeeping(std::chrono::steady_clock::now());
      if (!requests.draining()) housekeeping_tick();
    });
  }

  void stop_listening() {
    if (transport) transport->stop_accepting();
    if (http) http->close();
    asio::post(io, [this] { housekeeping.cancel(); });
  }

  ServerOptions opt;
  KvStore store;
  ServerCounters counters;
  ComputeQueue compute;
  RequestHandler requests;
  AdminRequests admin;
  std::shared_ptr<asio::ssl::context> tls;  // null: plain TCP
  asio::io_context io;
  std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::unique_ptr<ServerTransport> transport;
  std::unique_ptr<HttpEndpoint> http;
  asio::steady_timer housekeeping{io};
  std::vector<std::thread> io_threads;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::atomic<bool> stopped{false};
};

Server::Server(ServerOptions opt) {
  LONGATTN_INVALID(!opt.token.empty(), "the server needs a token (--token-file): refusing to serve without authentication");
  LONGATTN_INVALID(opt.io_threads >= 1 && opt.io_threads <= 256, "io_threads {} outside [1, 256]", opt.io_threads);
  LONGATTN_INVALID(opt.transport == "tcp" || opt.transport == "ucx", "transport must be tcp or ucx, got '{}'", opt.transport);
  LONGATTN_INVALID(opt.max_connections >= 1, "max_connections {} must be at least 1", opt.max_connections);
  LONGATTN_INVALID(opt.max_unauthenticated >= 1, "max_unauthenticated {} must be at least 1", opt.max_unauthenticated);
  LONGATTN_INVALID(opt.orphan_timeout_s >= 0, "orphan_timeout_s {} must be >= 0 (0 = never)", opt.orphan_timeout_s);
  LONGATTN_REQUIRE(opt.transport == "tcp" || ucx_available(), ErrorCode::unsupported,
                   "transport 'ucx' is not available in this build (built without UCX headers); use --transport tcp or "
                   "rebuild where UCX is installed (libucx-dev)");
  LONGATTN_REQUIRE(!opt.tls.enabled() || opt.transport == "tcp", ErrorCode::unsupported,
                   "TLS (--tls-cert) is available on the tcp transport only; use --transport tcp, or secure the UCX network by other means");
  LONGATTN_INVALID(opt.tls.enabled() || (opt.tls.ca_file.empty() && opt.tls.key_file.empty() && !opt.tls.require_client_cert),
                   "--tls-key, --tls-ca and --tls-require-client-cert need --tls-cert (the server's certificate)");
  // A bare port keeps the unauthenticated metrics on loopback.
  if (!opt.metrics_listen.empty() && opt.metrics_listen.find(':') == std::string::npos) opt.metrics_listen = "127.0.0.1:" + opt.metrics_listen;
  impl_ = std::make_unique<Impl>(std::move(opt), *this);
}

Server::~Server() {
  if (impl_ && !impl_->io_threads.empty() && !impl_->stopped) {
    kill();
    wait();
  }
}

void Server::start() {
  auto& impl = *impl_;
  impl.check_open_file_limit();
  const auto [host, port] = parse_host_port(impl.opt.listen);
  impl.transport = impl.opt.transport == "ucx"
                       ? make_ucx_server(host, port, impl.requests)
                       : make_tcp_server(impl.io, host, port, impl.requests, TcpServerTls{impl.tls, [&impl] { impl.counters.tls_handshake_failures++; }});
  if (!impl.opt.metrics_listen.empty())
    impl.http = std::make_unique<HttpEndpoint>(
        impl.io, impl.opt.metrics_listen, [&impl](const HttpRequest& r) { return impl.admin.answer(r); }, [&impl] { impl.counters.accept_errors++; });
  impl.work = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(impl.io.get_executor());
  impl.housekeeping_tick();
  impl.compute.start();
  for (int i = 0; i < impl.opt.io_threads; ++i) impl.io_threads.emplace_back([&impl] { impl.io.run(); });
  logger(Subsystem::offload)
      .info("serving on {} port {} ({}{}; KV in {} memory, limit {}){}", impl.opt.listen, this->port(), impl.opt.transport,
            impl.tls ? (impl.opt.tls.require_client_cert ? " with mutual TLS" : " with TLS") : "", impl.opt.device == "cuda" ? "GPU" : "host",
            format_bytes(impl.opt.memory_limit),
            impl.opt.metrics_listen.empty() ? "" : fmt::format("; metrics on port {}", metrics_port()));
}

int Server::port() const { return impl_->transport ? impl_->transport->port() : 0; }
int Server::metrics_port() const { return impl_->http ? impl_->http->port() : 0; }

void Server::shutdown() {
  auto& impl = *impl_;
  if (impl.requests.draining()) return;
  impl.requests.start_draining();
  logger(Subsystem::offload).info("shutting down: refusing new requests, finishing {} in flight", impl.compute.in_flight());
  if (impl.transport) impl.transport->stop_accepting();
  // In-flight attends finish on the compute thread and their replies are written; then close.
  const auto deadline = std::chrono::steady_clock::now() + kDrainLimit;
  while (impl.compute.in_flight() > 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let the last replies flush
  impl.stop_listening();
  if (impl.transport) impl.transport->stop(false);
  impl.work.reset();
}

void Server::kill() {
  auto& impl = *impl_;
  impl.requests.start_draining();
  impl.stop_listening();
  if (impl.transport) impl.transport->stop(true);
  impl.work.reset();
}

void Server::wait() {
  auto& impl = *impl_;
  for (auto& t : impl.io_threads)
    if (t.joinable()) t.join();
  if (impl.transport) impl.transport->join();
  impl.compute.stop();
  impl.stopped = true;
}

std::string Server::metrics_text() const {
  auto& impl = *impl_;
  ServerGauges g;
  g.store = impl.store.stats();
  g.orphaned_sequences = impl.requests.orphaned_sequences();
  g.auth_failures = impl.requests.auth().failures_total();
  g.auth_rate_limited = impl.requests.auth().refused_total();
  return prometheus_text(impl.counters, g);
}

std::string Server::result_json() const {
  const auto& impl = *impl_;
  return offload::result_json(impl.counters, std::chrono::duration<double>(std::chrono::steady_clock::now() - impl.started).count());
}

}  // namespace longattn::offload
