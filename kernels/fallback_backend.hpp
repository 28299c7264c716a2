// "auto" on a device with several backends: each call goes to the first backend (in order of
// preference) that supports it, so the fastest is used where it can run and the general one
// elsewhere (cuDNN for plain causal/full attention, the own kernels for ring steps with explicit
// positions).
#pragma once

#include <memory>
#include <vector>

#include "longattn/backend.hpp"

namespace longattn::kernels {

// candidates: in order of preference, all on the same device, at least one. Merge, delta and the
// device operations are the last candidate's, the most general one.
std::unique_ptr<AttentionBackend> make_fallback_backend(std::vector<std::unique_ptr<AttentionBackend>> candidates);

}  // namespace longattn::kernels
