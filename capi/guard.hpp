// The boundary between C callers and the C++ core: every entry point runs its body through
// guarded(), which turns any exception into a status and this thread's last-error message, so
// that no C++ exception ever unwinds into C.
#pragma once

#include <cstring>
#include <string>

#include "longattn/error.hpp"
#include "longattn/longattn.h"

namespace longattn::capi {

void set_last_error(const std::string& message) noexcept;
longattn_status status_of(ErrorCode code) noexcept;

// The integer a C caller stored in an enum field or argument. C lets any int live there; C++ may
// not read an out-of-range value as the enum type, so the C API reads the bytes and checks the
// integer against the enum's values.
template <class CEnum>
int enum_value(const CEnum& field) noexcept {
  static_assert(sizeof(CEnum) == sizeof(int), "C enums of this API are ints");
  int value;
  std::memcpy(&value, &field, sizeof value);
  return value;
}

// Throws Error(invalid_argument) naming `what` when `p` is null.
inline void require_non_null(const void* p, const char* what) {
  if (!p) throw Error(ErrorCode::invalid_argument, std::string(what) + " must not be NULL");
}

template <class Body>
longattn_status guarded(const char* function, Body&& body) noexcept {
  try {
    body();
    return LONGATTN_OK;
  } catch (const Error& e) {
    set_last_error(e.what());
    return status_of(e.code());
  } catch (const std::bad_alloc&) {
    set_last_error(std::string(function) + ": out of host memory");
    return LONGATTN_ERROR_OUT_OF_CAPACITY;
  } catch (const std::exception& e) {
    set_last_error(std::string(function) + ": " + e.what());
    return LONGATTN_ERROR_INTERNAL;
  } catch (...) {
    set_last_error(std::string(function) + ": an unknown C++ exception (a bug in longattn: please report it)");
    return LONGATTN_ERROR_INTERNAL;
  }
}

}  // namespace longattn::capi
