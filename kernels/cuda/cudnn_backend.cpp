// The "cudnn" backend: cuDNN 9's fused SDPA through the backend API. Not written yet: the backend
// reports itself unavailable so that "auto" picks the own "cuda" kernels.
#include "kernels/cuda/cuda_backends.hpp"

namespace longattn::kernels {

bool cudnn_backend_available() { return false; }

std::unique_ptr<AttentionBackend> make_cudnn_backend() { return nullptr; }

}  // namespace longattn::kernels
