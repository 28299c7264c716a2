// Error plumbing for the GPU code: every CUDA runtime status becomes a longattn::Error naming the
// call and file:line. Kept free of fmt so that nvcc-compiled files can include it (fmt's
// compile-time format checks do not survive nvcc); the throwing functions live in a .cpp.
#pragma once

#include <cuda_runtime.h>

namespace longattn::kernels::cuda {
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void throw_unsupported(const char* what);
}  // namespace longattn::kernels::cuda

#define LONGATTN_CUDA_CHECK(call)                                                                   \
  do {                                                                                              \
    const cudaError_t err_ = (call);                                                                \
    if (err_ != cudaSuccess) ::longattn::kernels::cuda::throw_cuda_error(err_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: catches bad launch configurations at once (asynchronous faults surface
// at the next synchronizing call).
#define LONGATTN_CUDA_CHECK_LAUNCH() LONGATTN_CUDA_CHECK(cudaGetLastError())
