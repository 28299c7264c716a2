// The one error type of longattn: a code to branch on and a message that tells the user what to do.
#pragma once

#include <stdexcept>
#include <string>

namespace longattn {

enum class ErrorCode {
  invalid_argument,  // a value the caller passed is wrong (shape, flag, option)
  unsupported,       // valid, but this backend/build cannot do it
  io,                // files: missing, unreadable, malformed
  communication,     // a peer failed, disagreed or went away
  timeout,           // a peer did not answer in time
  out_of_capacity,   // a memory or size limit was reached
  protocol,          // a malformed or unexpected message on the wire
  unauthorized,      // a peer did not present the right credentials
  internal,          // a bug in longattn: please report it
};

const char* to_string(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace longattn
