// The device operations of each device kind, and what every backend shares of them: host memory is
// always there; CUDA joins where the build found it (LONGATTN_HAVE_CUDA) and a GPU is present.
#include "longattn/device_ops.hpp"

#include "common/check.hpp"
#include "kernels/cpu_backend.hpp"
#include "longattn/backend.hpp"

#ifdef LONGATTN_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_backends.hpp"
#endif

namespace longattn {

void DeviceOps::copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
                        std::size_t rows, void* stream) {
  for (std::size_t r = 0; r < rows; ++r)
    copy_bytes(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width, stream);
}

DeviceOps& device_ops_for(DeviceKind kind) {
  if (kind == DeviceKind::cpu) return kernels::cpu_device_ops();
#ifdef LONGATTN_HAVE_CUDA
  LONGATTN_REQUIRE(kernels::cuda_device_available(), ErrorCode::unsupported,
                   "no CUDA device is visible: run on a machine with a GPU, or use --device cpu");
  return kernels::cuda_device_ops();
#else
  throw Error(ErrorCode::unsupported, fmt::format("this build has no {} support: rebuild with CUDA (LONGATTN_CUDA=ON)", to_string(kind)));
#endif
}

DeviceOps& AttentionBackend::device_ops() { return device_ops_for(device().kind); }

std::size_t gpu_memory_used_bytes() {
#ifdef LONGATTN_HAVE_CUDA
  std::size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) return total - free_bytes;
#endif
  return 0;
}

}  // namespace longattn
