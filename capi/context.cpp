// Context handles of the C API: the backend name and device every attention object of the context
// runs on. The backend is made per attention object, so contexts hold no device state.
#include <fmt/format.h>

#include <algorithm>
#include <memory>

#include "capi/guard.hpp"
#include "capi/handles.hpp"
#include "capi/tensor_descriptor.hpp"
#include "longattn/backend.hpp"

using longattn::capi::guarded;
using longattn::capi::require_non_null;

extern "C" {

longattn_status longattn_context_create(const char* backend, longattn_device device, longattn_context** out) {
  return guarded(__func__, [&] {
    require_non_null(out, "out");
    auto handle = std::make_unique<longattn_context>();
    handle->backend = backend ? backend : "auto";
    handle->device = longattn::capi::to_device(device);
    // Made once here so that an unknown name or a backend this build lacks is refused now, with the
    // registry's own message, rather than at the first attention object.
    longattn::make_backend(handle->backend, handle->device.kind);
    *out = handle.release();
  });
}

void longattn_context_destroy(longattn_context* context) { delete context; }

}  // extern "C"
