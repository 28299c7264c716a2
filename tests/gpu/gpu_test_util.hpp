// GPU test helpers: skip without a device, device copies of host tensors, poisoned device outputs.
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <limits>
#include <string>

#include "support/test_util.hpp"

namespace longattn::test {

// A reason to skip when no CUDA device is usable, else empty.
inline std::string no_gpu_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return std::string("no usable CUDA device: ") + cudaGetErrorString(e);
  if (n == 0) return "no CUDA device on this machine";
  return {};
}

#define LONGATTN_SKIP_WITHOUT_GPU()                              \
  do {                                                           \
    const auto why_ = ::longattn::test::no_gpu_reason();         \
    if (!why_.empty()) GTEST_SKIP() << why_;                     \
  } while (0)

#define GPU_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

// Device memory holding one tensor; the view is marked as living on cuda:0.
struct DeviceTensor {
  void* ptr = nullptr;
  TensorView view;
  DeviceTensor() = default;
  DeviceTensor(DType t, std::initializer_list<std::int64_t> dims) {
    view = TensorView(nullptr, t, dims, Device{DeviceKind::cuda, 0});
    cudaMalloc(&ptr, std::max<std::size_t>(view.bytes(), 16));
    view.data = ptr;
  }
  explicit DeviceTensor(const HostTensor& h) {
    view = h.view;
    view.device = Device{DeviceKind::cuda, 0};
    cudaMalloc(&ptr, std::max<std::size_t>(view.bytes(), 16));
    view.data = ptr;
    cudaMemcpy(ptr, h.view.data, h.view.bytes(), cudaMemcpyHostToDevice);
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  DeviceTensor(DeviceTensor&& o) noexcept : ptr(o.ptr), view(o.view) { o.ptr = nullptr; }
  DeviceTensor& operator=(DeviceTensor&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(view, o.view);
    return *this;
  }
  ~DeviceTensor() {
    if (ptr) cudaFree(ptr);
  }
  // Same shape, NaN everywhere: unwritten outputs show up in comparisons.
  static DeviceTensor poisoned(DType t, std::initializer_list<std::int64_t> dims) {
    return DeviceTensor(poisoned_tensor(t, dims));
  }
  HostTensor to_host() const {
    HostTensor h;
    h.buf = HostBuffer(std::max<std::size_t>(view.bytes(), 1));
    h.view = view;
    h.view.device = Device{};
    h.view.data = h.buf.data();
    cudaMemcpy(h.view.data, ptr, view.bytes(), cudaMemcpyDeviceToHost);
    return h;
  }
};

// A device copy of an int32 array (cu_seqlens, positions); null when empty.
struct DeviceInts {
  std::int32_t* ptr = nullptr;
  explicit DeviceInts(const std::vector<std::int32_t>& v) {
    if (v.empty()) return;
    cudaMalloc(&ptr, v.size() * 4);
    cudaMemcpy(ptr, v.data(), v.size() * 4, cudaMemcpyHostToDevice);
  }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  ~DeviceInts() {
    if (ptr) cudaFree(ptr);
  }
};

}  // namespace longattn::test
