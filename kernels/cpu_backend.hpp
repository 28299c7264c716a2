// Factories of the CPU backends (used by the registry), and the host memory they run on.
#pragma once

#include <memory>

#include "longattn/backend.hpp"

namespace longattn::kernels {
std::unique_ptr<AttentionBackend> make_reference_backend();
std::unique_ptr<AttentionBackend> make_cpu_fast_backend();
// Host memory and element-wise operations (device_ops_for(DeviceKind::cpu)).
DeviceOps& cpu_device_ops();
}  // namespace longattn::kernels
