// Versions, status names and the per-thread last-error message of the C API.
#include <new>
#include <string>

#include "capi/guard.hpp"

namespace longattn::capi {
namespace {
// Per thread, so that two threads' failures never overwrite each other's message.
thread_local std::string last_error;
}  // namespace

void set_last_error(const std::string& message) noexcept {
  try {
    last_error = message;
  } catch (...) {
    last_error.clear();  // no memory even for the message: an empty one beats none
  }
}

longattn_status status_of(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::invalid_argument: return LONGATTN_ERROR_INVALID_ARGUMENT;
    case ErrorCode::unsupported: return LONGATTN_ERROR_UNSUPPORTED;
    case ErrorCode::io: return LONGATTN_ERROR_IO;
    case ErrorCode::communication: return LONGATTN_ERROR_COMMUNICATION;
    case ErrorCode::timeout: return LONGATTN_ERROR_TIMEOUT;
    case ErrorCode::out_of_capacity: return LONGATTN_ERROR_OUT_OF_CAPACITY;
    case ErrorCode::protocol: return LONGATTN_ERROR_PROTOCOL;
    case ErrorCode::unauthorized: return LONGATTN_ERROR_UNAUTHORIZED;
    case ErrorCode::internal: return LONGATTN_ERROR_INTERNAL;
  }
  return LONGATTN_ERROR_INTERNAL;
}

}  // namespace longattn::capi

extern "C" {

int longattn_abi_version(void) { return LONGATTN_ABI_VERSION; }

const char* longattn_version_string(void) { return LONGATTN_VERSION_STRING; }

const char* longattn_last_error(void) { return longattn::capi::last_error.c_str(); }

const char* longattn_status_name(longattn_status status) {
  switch (longattn::capi::enum_value(status)) {
    case LONGATTN_OK: return "ok";
    case LONGATTN_ERROR_INVALID_ARGUMENT: return "invalid_argument";
    case LONGATTN_ERROR_UNSUPPORTED: return "unsupported";
    case LONGATTN_ERROR_IO: return "io";
    case LONGATTN_ERROR_COMMUNICATION: return "communication";
    case LONGATTN_ERROR_TIMEOUT: return "timeout";
    case LONGATTN_ERROR_OUT_OF_CAPACITY: return "out_of_capacity";
    case LONGATTN_ERROR_PROTOCOL: return "protocol";
    case LONGATTN_ERROR_UNAUTHORIZED: return "unauthorized";
    case LONGATTN_ERROR_INTERNAL: return "internal";
    default: return "unknown status";
  }
}

}  // extern "C"
