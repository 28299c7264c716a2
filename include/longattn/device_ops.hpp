// What a device's runtime gives the distributed code: owned memory, and the few element-wise
// operations that hold, move and combine tensors on it. One set per device kind, shared by every
// attention backend on that device, so a new backend (backend.hpp) implements only the math.
#pragma once

#include <cstddef>
#include <memory>

#include "longattn/tensor.hpp"

namespace longattn {

// Owned memory on a device; freed by its destructor.
class DeviceBuffer {
 public:
  virtual ~DeviceBuffer() = default;
  virtual void* data() = 0;
  virtual std::size_t bytes() const = 0;
};

// `stream`: the queue the operation joins on devices that have queues (a cudaStream_t on CUDA;
// null is the default stream); host memory ignores it and works at once.
class DeviceOps {
 public:
  virtual ~DeviceOps() = default;
  virtual std::unique_ptr<DeviceBuffer> allocate(std::size_t bytes) = 0;
  virtual void fill(TensorView dst, float value, void* stream) = 0;
  // dst and src have the same number of elements.
  virtual void add_into(TensorView dst_f32, TensorView src, void* stream) = 0;  // dst += src
  virtual void convert(TensorView dst, TensorView src, void* stream) = 0;       // dtype cast / copy
  virtual void copy_bytes(void* dst, const void* src, std::size_t bytes, void* stream) = 0;
  // `rows` rows of `width` bytes from src (rows src_pitch bytes apart) to dst (dst_pitch apart):
  // e.g. a range of tokens out of every head's row of an [H, T] lse. Default: copy_bytes per row.
  virtual void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
                       std::size_t rows, void* stream);
  // Returns when everything queued on `stream` has run.
  virtual void synchronize(void* stream) = 0;
};

// The operations of a device kind: cpu always; cuda where built with CUDA and a GPU is present
// (otherwise Error(unsupported) saying so).
DeviceOps& device_ops_for(DeviceKind kind);

// Bytes of GPU memory in use on the current device (cudaMemGetInfo: total - free); 0 without CUDA.
std::size_t gpu_memory_used_bytes();

}  // namespace longattn
