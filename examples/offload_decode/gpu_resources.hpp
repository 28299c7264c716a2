// The CUDA resources offload_decode's GPU side owns: device and page-locked host memory, streams and
// events as RAII types, the error check that turns a CUDA status into longattn::Error, and the
// element type of the small model kernels for a longattn dtype.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include <fmt/format.h>

#include "gpu_kernels.hpp"
#include "longattn/error.hpp"
#include "longattn/tensor.hpp"

namespace offload_decode {

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw longattn::Error(longattn::ErrorCode::internal, fmt::format("{} failed: {}", what, cudaGetErrorString(e)));
}

// Owned GPU memory.
struct DeviceMem {
  void* p = nullptr;
  std::size_t bytes = 0;
  explicit DeviceMem(std::size_t n) : bytes(n) {
    const cudaError_t e = cudaMalloc(&p, std::max<std::size_t>(n, 16));
    if (e != cudaSuccess)
      throw longattn::Error(longattn::ErrorCode::out_of_capacity,
                            fmt::format("cannot allocate {:.2f} GiB of GPU memory ({}); use smaller --batch/--context/--layers",
                                        static_cast<double>(n) / (1 << 30), cudaGetErrorString(e)));
  }
  ~DeviceMem() { cudaFree(p); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  template <class T = std::byte>
  T* as() const { return static_cast<T*>(p); }
};

// Owned page-locked host memory (copies to and from the GPU at full speed).
struct PinnedMem {
  void* p = nullptr;
  explicit PinnedMem(std::size_t n) { cuda_ok(cudaMallocHost(&p, std::max<std::size_t>(n, 16)), "cudaMallocHost"); }
  ~PinnedMem() { cudaFreeHost(p); }
  PinnedMem(const PinnedMem&) = delete;
  PinnedMem& operator=(const PinnedMem&) = delete;
  template <class T = std::byte>
  T* as() const { return static_cast<T*>(p); }
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void sync() const { cuda_ok(cudaStreamSynchronize(s), "cudaStreamSynchronize"); }
};

struct Event {
  cudaEvent_t e = nullptr;
  Event() { cuda_ok(cudaEventCreate(&e), "cudaEventCreate"); }
  ~Event() { cudaEventDestroy(e); }
  Event(const Event&) = delete;
  Event(Event&& o) noexcept : e(o.e) { o.e = nullptr; }
};

inline gpu::Elem elem_of(longattn::DType t) {
  return t == longattn::DType::bf16 ? gpu::kBf16 : t == longattn::DType::f16 ? gpu::kF16 : gpu::kF32;
}

}  // namespace offload_decode
