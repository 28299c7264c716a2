// One way to launch the kernels that take more than 48 KiB of dynamic shared memory (Hopper gives
// up to 227 KiB to a kernel that opts in): opt in, launch, check the launch.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "common/check.hpp"

namespace longattn::kernels::cuda {

template <class... Params, class... Args>
void launch_with_smem(void (*kernel)(Params...), dim3 grid, int threads, int smem_bytes, cudaStream_t stream, Args&&... args) {
  LONGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, threads, smem_bytes, stream>>>(std::forward<Args>(args)...);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace longattn::kernels::cuda
