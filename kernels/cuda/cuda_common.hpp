// Host-side pieces shared by the "cuda" and "cudnn" backends: device memory owner, argument
// checks, FlashParams from AttentionArgs.
#pragma once

#include <cstddef>
#include <string>

#include "kernels/cuda/flash_params.hpp"
#include "kernels/validate.hpp"
#include "longattn/backend.hpp"

namespace longattn::kernels::cuda {

// cudaMalloc'ed memory, freed (cudaFree) by the destructor.
class CudaDeviceBuffer final : public DeviceBuffer {
 public:
  explicit CudaDeviceBuffer(std::size_t bytes);
  ~CudaDeviceBuffer() override;
  CudaDeviceBuffer(const CudaDeviceBuffer&) = delete;
  CudaDeviceBuffer& operator=(const CudaDeviceBuffer&) = delete;
  void* data() override { return ptr_; }
  std::size_t bytes() const override { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// Empty when q/k/v are bf16/fp16 tensors on a CUDA device.
std::string device_tensor_reason(const AttentionArgs& a);

// Per-sequence maxima for grid sizing: the caller's hints, else read from the device cu_seqlens
// (a stream synchronization).
void sequence_maxima(const AttentionArgs& a, const ProblemShape& s, int& max_q, int& max_k);

FlashParams make_params(const AttentionArgs& a, const ProblemShape& s);

}  // namespace longattn::kernels::cuda
