// TLS for the offload protocol over TCP (Boost.Asio ssl over OpenSSL): the contexts a server and
// a client use, built once from certificate files, and the readable message of a failed handshake.
// Authentication stays the token's job; TLS adds encryption and, with client certificates checked
// against a CA (mutual TLS), a second factor that a leaked token alone does not pass.
#pragma once

#include <memory>
#include <string>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio/ssl.hpp>

#include "longattn/offload_client.hpp"

namespace longattn::offload {

struct ServerTlsOptions {
  std::string cert_file;  // PEM certificate chain the server presents; empty = TLS off
  std::string key_file;   // PEM private key of that certificate
  std::string ca_file;    // PEM CA certificates that client certificates must chain to
  bool require_client_cert = false;  // mutual TLS: a client without a valid certificate is refused
  bool enabled() const { return !cert_file.empty(); }
};

// Throws Error(invalid_argument) for inconsistent options and Error(io) for a file OpenSSL cannot
// load, naming the file and OpenSSL's reason.
std::shared_ptr<boost::asio::ssl::context> make_server_tls_context(const ServerTlsOptions& opt);
std::shared_ptr<boost::asio::ssl::context> make_client_tls_context(const ClientTls& opt);

// Errors of a TLS stream start with this, so that a client can tell a refused handshake (not worth
// retrying) from a lost connection.
inline constexpr const char* kTlsFailurePrefix = "TLS: ";
inline bool is_tls_failure(const std::string& error) { return error.rfind(kTlsFailurePrefix, 0) == 0; }

// The reason a handshake or a TLS read failed, with the certificate check's own reason where
// there is one ("certificate has expired") and what to do about it. `client_side` picks the hint.
std::string describe_tls_failure(const boost::system::error_code& ec, SSL* ssl, bool client_side);

}  // namespace longattn::offload
