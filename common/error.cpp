// Names of error codes, for messages and RESULT lines.
#include "longattn/error.hpp"

namespace longattn {

const char* to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::unsupported: return "unsupported";
    case ErrorCode::io: return "io";
    case ErrorCode::communication: return "communication";
    case ErrorCode::timeout: return "timeout";
    case ErrorCode::out_of_capacity: return "out_of_capacity";
    case ErrorCode::protocol: return "protocol";
    case ErrorCode::unauthorized: return "unauthorized";
    case ErrorCode::internal: return "internal";
  }
  return "unknown";
}

}  // namespace longattn
