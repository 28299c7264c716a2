// The GPU backends the registry knows: "cuda" (own fused kernels) and "cudnn" (cuDNN 9 SDPA).
#pragma once

#include <memory>

#include "longattn/backend.hpp"

namespace longattn::kernels {

// True when the CUDA runtime sees at least one device.
bool cuda_device_available();
// CUDA memory and element-wise operations (device_ops_for(DeviceKind::cuda)).
DeviceOps& cuda_device_ops();
std::unique_ptr<AttentionBackend> make_cuda_backend();
// Backward without atomics (a separate dQ kernel that recomputes the scores: bit-identical across
// runs, and slower; bench/results/gpu_kernels_h100_2026-11-23.md). The registry's "cuda" is the
// default, atomic dQ mode.
std::unique_ptr<AttentionBackend> make_cuda_backend_deterministic();

// False when built without cuDNN or when no device is present.
bool cudnn_backend_available();
std::unique_ptr<AttentionBackend> make_cudnn_backend();

}  // namespace longattn::kernels
