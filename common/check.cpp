// The out-of-line halves of common/check.hpp's library checks.
#include "common/check.hpp"

#include <string>

namespace longattn {

void throw_call_failed(ErrorCode code, const char* call, const char* status_text, const char* file, int line) {
  throw Error(code, std::string(call) + " failed: " + status_text + " (" + file + ":" + std::to_string(line) + ")");
}

void throw_unsupported(const char* what) { throw Error(ErrorCode::unsupported, what); }

}  // namespace longattn
