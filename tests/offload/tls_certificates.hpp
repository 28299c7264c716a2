// Certificates made at run time for the TLS tests (OpenSSL API; no key is ever committed): a CA,
// certificates it signs for a server or a client, valid now or already expired, and a second CA
// whose certificates the first one's holders must refuse. Written as PEM files into a folder.
#pragma once

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

namespace longattn::offload::test {

struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct X509Free {
  void operator()(X509* c) const { X509_free(c); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using Cert = std::unique_ptr<X509, X509Free>;

inline void require(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("test certificates: ") + what + " failed");
}

inline Pkey new_key() {
  Pkey k(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  require(k != nullptr, "EC key generation");
  return k;
}

inline void add_extension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  require(ext != nullptr, "X509 extension");
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

// A certificate for `key` named `common_name`, valid from now + not_before_s to now + not_after_s,
// signed by (issuer, issuer_key), or self-signed when issuer is null.
inline Cert make_cert(EVP_PKEY* key, const std::string& common_name, X509* issuer, EVP_PKEY* issuer_key, long not_before_s,
                      long not_after_s, bool is_ca, long serial) {
  Cert cert(X509_new());
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), not_before_s);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), not_after_s);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1, 0);
  X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509* signer = issuer ? issuer : cert.get();
  if (is_ca) {
    add_extension(cert.get(), signer, NID_basic_constraints, "critical,CA:TRUE");
    add_extension(cert.get(), signer, NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    add_extension(cert.get(), signer, NID_basic_constraints, "critical,CA:FALSE");
    add_extension(cert.get(), signer, NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1");
    add_extension(cert.get(), signer, NID_ext_key_usage, "serverAuth,clientAuth");
  }
  add_extension(cert.get(), signer, NID_subject_key_identifier, "hash");
  require(X509_sign(cert.get(), issuer_key ? issuer_key : key, EVP_sha256()) > 0, "signing");
  return cert;
}

inline void write_pem(const std::string& path, X509* cert) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  require(f != nullptr, "opening a certificate file");
  PEM_write_X509(f, cert);
  std::fclose(f);
}
inline void write_pem(const std::string& path, EVP_PKEY* key) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  require(f != nullptr, "opening a key file");
  PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr);
  std::fclose(f);
}

// The files of one test PKI under `dir`: ca.pem; server.{pem,key} and client.{pem,key} signed by
// it; expired.{pem,key} signed by it but no longer valid; other-ca.pem and stranger.{pem,key}
// signed by that other CA.
struct TestPki {
  std::string dir;
  std::string file(const std::string& name) const { return dir + "/" + name; }

  explicit TestPki(std::string folder) : dir(std::move(folder)) {
    constexpr long day = 24 * 3600;
    auto ca_key = new_key(), other_key = new_key();
    auto ca = make_cert(ca_key.get(), "longattn test CA", nullptr, nullptr, -day, 30 * day, true, 1);
    auto other = make_cert(other_key.get(), "another CA", nullptr, nullptr, -day, 30 * day, true, 1);
    write_pem(file("ca.pem"), ca.get());
    write_pem(file("other-ca.pem"), other.get());
    struct Leaf {
      const char* name;
      X509* issuer;
      EVP_PKEY* issuer_key;
      long from, to;
    };
    const Leaf leaves[] = {{"server", ca.get(), ca_key.get(), -day, 30 * day},
                           {"client", ca.get(), ca_key.get(), -day, 30 * day},
                           {"expired", ca.get(), ca_key.get(), -10 * day, -day},
                           {"stranger", other.get(), other_key.get(), -day, 30 * day}};
    long serial = 2;
    for (const auto& l : leaves) {
      auto key = new_key();
      auto cert = make_cert(key.get(), l.name, l.issuer, l.issuer_key, l.from, l.to, false, serial++);
      write_pem(file(std::string(l.name) + ".pem"), cert.get());
      write_pem(file(std::string(l.name) + ".key"), key.get());
    }
  }
};

}  // namespace longattn::offload::test
