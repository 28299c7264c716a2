// The GPU backends the registry knows: "cuda" (own fused kernels) and "cudnn" (cuDNN 9 SDPA).
#pragma once

#include <memory>
#include <optional>

#include "kernels/cuda/flash_params.hpp"
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

// Which kernels a "cuda" backend runs on the shapes its Hopper wgmma kernels take. The registry's
// backend follows LONGATTN_CUDA_FWD_KERNEL, LONGATTN_CUDA_BWD_KERNEL and
// LONGATTN_CUDA_WGMMA_FWD_SCHEDULE (read per call); a test or benchmark that compares kernels in
// one process passes its choice here instead of setting those variables around calls.
struct CudaKernelChoice {
  enum class Kernel { from_environment, mma, wgmma };
  Kernel forward = Kernel::from_environment;
  Kernel backward = Kernel::from_environment;
  std::optional<cuda::WgmmaSchedule> forward_schedule;  // the wgmma forward's; none: the environment's
  bool deterministic = false;                           // see make_cuda_backend_deterministic
};
std::unique_ptr<AttentionBackend> make_cuda_backend(const CudaKernelChoice& choice);

// False when built without cuDNN or when no device is present.
bool cudnn_backend_available();
std::unique_ptr<AttentionBackend> make_cudnn_backend();

}  // namespace longattn::kernels
