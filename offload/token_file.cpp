// The token file's checks (see token_file.hpp). The file is opened without blocking and checked
// through its descriptor, so what is checked is what is read.
#include "offload/token_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/check.hpp"

namespace longattn::offload {
namespace {

constexpr std::size_t kMinTokenBytes = 16, kMaxTokenBytes = 4096;

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string read_token_file(const std::string& path) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
  Fd f{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  LONGATTN_REQUIRE(f.fd >= 0, ErrorCode::io, "cannot read token file {}: {}", path, std::strerror(errno));
  struct stat st {};
  LONGATTN_REQUIRE(::fstat(f.fd, &st) == 0, ErrorCode::io, "cannot read token file {}: {}", path, std::strerror(errno));
  LONGATTN_REQUIRE(S_ISREG(st.st_mode), ErrorCode::invalid_argument,
                   "token file {} is not a regular file (a FIFO, device or directory); put the token in a plain file "
                   "(umask 077; openssl rand -hex 32 > FILE)",
                   path);
  LONGATTN_REQUIRE((st.st_mode & S_IROTH) == 0, ErrorCode::invalid_argument,
                   "token file {} is readable by every user; run chmod 600 {} (or 640 with a dedicated group)", path, path);
  LONGATTN_REQUIRE(static_cast<std::size_t>(st.st_size) <= 4 * kMaxTokenBytes, ErrorCode::invalid_argument,
                   "token file {} is {} bytes; a token is at most {} bytes", path, st.st_size, kMaxTokenBytes);
  std::string text(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t got = 0;
  while (got < text.size()) {
    const auto n = ::read(f.fd, text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    LONGATTN_REQUIRE(n >= 0, ErrorCode::io, "cannot read token file {}: {}", path, std::strerror(errno));
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  text.resize(got);
  const std::string tok = trim(text);
  LONGATTN_REQUIRE(tok.size() >= kMinTokenBytes, ErrorCode::invalid_argument,
                   "token in {} is {} bytes; use at least {} random bytes (e.g. openssl rand -hex 32)", path, tok.size(), kMinTokenBytes);
  LONGATTN_REQUIRE(tok.size() <= kMaxTokenBytes, ErrorCode::invalid_argument, "token in {} is longer than {} bytes", path, kMaxTokenBytes);
  return tok;
}

}  // namespace longattn::offload
