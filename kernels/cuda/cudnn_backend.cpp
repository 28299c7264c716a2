// The "cudnn" backend: cuDNN 9's fused SDPA through the backend API. NOT WRITTEN YET: the native
// SDPA operation of cuDNN 9.19's backend API (CUDNN_BACKEND_OPERATION_SDPA_FWD/BWD_DESCRIPTOR) has
// no causal attribute, so causal attention needs the composite graph (matmul, pointwise mask from
// generated indices, softmax with stats, matmul) that cudnn-frontend builds; that graph is the
// remaining work. Until then the backend reports itself unavailable, and "auto" picks "cuda".
#include "common/check.hpp"
#include "kernels/cuda/cuda_backends.hpp"

namespace longattn::kernels {

bool cudnn_backend_available() { return false; }

std::unique_ptr<AttentionBackend> make_cudnn_backend() {
  throw Error(ErrorCode::unsupported, "the cudnn backend is not implemented in this build yet; use the cuda backend");
}

}  // namespace longattn::kernels
