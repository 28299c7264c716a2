// TLS contexts and handshake failure messages (see tls_context.hpp).
#include "offload/tls_context.hpp"

#include <functional>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include <fmt/format.h>

#include "common/check.hpp"

namespace longattn::offload {

namespace ssl = boost::asio::ssl;

namespace {

// TLS 1.2 is the oldest version still considered sound; 1.3 is what both sides normally agree on.
std::shared_ptr<ssl::context> new_context(ssl::context::method method) {
  auto ctx = std::make_shared<ssl::context>(method);
  ctx->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 | ssl::context::no_tlsv1 |
                   ssl::context::no_tlsv1_1 | ssl::context::single_dh_use);
  return ctx;
}

void load(const char* what, const std::string& file, const std::function<void(boost::system::error_code&)>& fn) {
  boost::system::error_code ec;
  fn(ec);
  LONGATTN_REQUIRE(!ec, ErrorCode::io, "cannot load the TLS {} from '{}': {} (a PEM file readable by this process is needed)", what, file,
                   ec.message());
}

bool contains(const std::string& text, const char* part) { return text.find(part) != std::string::npos; }

// OpenSSL checks the key against the certificate loaded before it: a mismatch gets its own message.
void load_key(ssl::context& ctx, const std::string& key_file, const std::string& cert_file, const char* who) {
  boost::system::error_code ec;
  ctx.use_private_key_file(key_file, ssl::context::pem, ec);
  LONGATTN_REQUIRE(!ec || !contains(ec.message(), "mismatch"), ErrorCode::invalid_argument,
                   "{}the TLS private key '{}' does not belong to the certificate '{}'", who, key_file, cert_file);
  LONGATTN_REQUIRE(!ec, ErrorCode::io, "{}cannot load the TLS private key from '{}': {} (a PEM file readable by this process is needed)", who,
                   key_file, ec.message());
  LONGATTN_REQUIRE(SSL_CTX_check_private_key(ctx.native_handle()) == 1, ErrorCode::invalid_argument,
                   "{}the TLS private key '{}' does not belong to the certificate '{}'", who, key_file, cert_file);
}

}  // namespace

std::shared_ptr<ssl::context> make_server_tls_context(const ServerTlsOptions& opt) {
  LONGATTN_INVALID(!opt.cert_file.empty() && !opt.key_file.empty(),
                   "TLS needs both a certificate and its private key (--tls-cert and --tls-key)");
  LONGATTN_INVALID(!opt.require_client_cert || !opt.ca_file.empty(),
                   "--tls-require-client-cert needs --tls-ca: the CA that client certificates must be signed by");
  auto ctx = new_context(ssl::context::tls_server);
  load("certificate chain", opt.cert_file, [&](auto& ec) { ctx->use_certificate_chain_file(opt.cert_file, ec); });
  load_key(*ctx, opt.key_file, opt.cert_file, "");
  if (!opt.ca_file.empty()) {
    load("CA certificates", opt.ca_file, [&](auto& ec) { ctx->load_verify_file(opt.ca_file, ec); });
    // With a CA but without the requirement, a client certificate is checked when one is offered.
    ctx->set_verify_mode(opt.require_client_cert ? ssl::verify_peer | ssl::verify_fail_if_no_peer_cert : ssl::verify_peer);
  }
  return ctx;
}

std::shared_ptr<ssl::context> make_client_tls_context(const ClientTls& opt) {
  LONGATTN_INVALID(opt.cert_file.empty() == opt.key_file.empty(),
                   "offload client: a TLS client certificate needs both tls.cert_file and tls.key_file");
  auto ctx = new_context(ssl::context::tls_client);
  if (opt.ca_file.empty()) {
    load("system CA certificates", "(the system's default paths)", [&](auto& ec) { ctx->set_default_verify_paths(ec); });
  } else {
    load("CA certificates", opt.ca_file, [&](auto& ec) { ctx->load_verify_file(opt.ca_file, ec); });
  }
  ctx->set_verify_mode(ssl::verify_peer);
  if (!opt.cert_file.empty()) {
    load("client certificate chain", opt.cert_file, [&](auto& ec) { ctx->use_certificate_chain_file(opt.cert_file, ec); });
    load_key(*ctx, opt.key_file, opt.cert_file, "offload client: ");
  }
  return ctx;
}

std::string describe_tls_failure(const boost::system::error_code& ec, SSL* ssl, bool client_side) {
  std::string reason = ec.message();
  if (ssl) {
    const long verify = SSL_get_verify_result(ssl);
    if (verify != X509_V_OK) reason += fmt::format(" ({})", X509_verify_cert_error_string(verify));
  }
  std::string hint;
  if (client_side) {
    if (contains(reason, "certificate verify failed"))
      hint = "the server's certificate is not trusted: it must be signed by the CA of tls.ca_file, be valid now, and name the host "
             "(or tls.server_name)";
    else if (contains(reason, "certificate required"))
      hint = "the server requires a client certificate: set tls.cert_file and tls.key_file";
    else if (contains(reason, "alert unknown ca") || contains(reason, "alert bad certificate") || contains(reason, "certificate expired") ||
             contains(reason, "alert certificate"))
      hint = "the server refused this client's certificate: it must be signed by the CA the server was given (--tls-ca) and be valid now";
    else if (contains(reason, "wrong version number") || contains(reason, "packet length too long") || contains(reason, "record layer"))
      hint = "the server does not speak TLS: start it with --tls-cert and --tls-key, or turn TLS off in the client";
  } else {
    if (contains(reason, "peer did not return a certificate") || contains(reason, "certificate required"))
      hint = "the client sent no certificate and --tls-require-client-cert is set";
    else if (contains(reason, "certificate verify failed"))
      hint = "the client's certificate is not signed by --tls-ca or is not valid now";
    else if (contains(reason, "wrong version number") || contains(reason, "http request") || contains(reason, "unsupported protocol"))
      hint = "the client does not speak TLS (turn TLS on in the client)";
  }
  return hint.empty() ? reason : reason + "; " + hint;
}

}  // namespace longattn::offload
