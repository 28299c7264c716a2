// Factories of the CPU backends (used by the registry).
#pragma once

#include <memory>

#include "longattn/backend.hpp"

namespace longattn::kernels {
std::unique_ptr<AttentionBackend> make_reference_backend();
std::unique_ptr<AttentionBackend> make_cpu_fast_backend();
}  // namespace longattn::kernels
