// A local attention backend: one device's math (attention forward/backward, merge of partial
// results, the few element-wise helpers the distributed runtime needs). Backends register by name;
// CPU ones are always there, CUDA/cuDNN when built and a GPU is present.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "longattn/attention.hpp"

namespace longattn {

// Owned memory on a backend's device; freed by its destructor.
class DeviceBuffer {
 public:
  virtual ~DeviceBuffer() = default;
  virtual void* data() = 0;
  virtual std::size_t bytes() const = 0;
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;

  // Empty when this backend can run these arguments; otherwise the reason it cannot.
  virtual std::string unsupported_reason(const AttentionArgs& args) const = 0;

  virtual void forward(const AttentionArgs& args, const ForwardOutputs& out) = 0;
  virtual void backward(const AttentionArgs& args, const BackwardArgs& grads) = 0;

  // (o_acc, lse_acc) <- merge((o_acc, lse_acc), (o_part, lse_part)), the LSE identity of
  // DESIGN.md; o_acc f32, lse f32; exact for rows where either side saw no key (lse = -inf).
  virtual void merge_into(TensorView o_acc, TensorView lse_acc, TensorView o_part, TensorView lse_part,
                          void* stream) = 0;
  // delta[h, t] = sum_d dO[t, h, d] * O[t, h, d], in f32.
  virtual void compute_delta(TensorView o, TensorView d_o, TensorView delta, void* stream) = 0;

  // Element-wise helpers on this device. dst and src have the same number of elements.
  virtual std::unique_ptr<DeviceBuffer> allocate(std::size_t bytes) = 0;
  virtual void fill(TensorView dst, float value, void* stream) = 0;
  virtual void add_into(TensorView dst_f32, TensorView src, void* stream) = 0;  // dst += src
  virtual void convert(TensorView dst, TensorView src, void* stream) = 0;       // dtype cast / copy
  virtual void copy_bytes(void* dst, const void* src, std::size_t bytes, void* stream) = 0;
  // `rows` rows of `width` bytes from src (rows src_pitch bytes apart) to dst (dst_pitch apart):
  // e.g. a range of tokens out of every head's row of an [H, T] lse. Default: copy_bytes per row.
  virtual void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
                       std::size_t rows, void* stream);
  virtual void synchronize(void* stream) = 0;
};

// Names: "reference" (double precision oracle), "cpu" (fast CPU), and where built "cuda",
// "cudnn". "auto": on CPUs the fast kernels; on GPUs every available GPU backend, each call going to
// the first that supports it (cudnn, then cuda). LONGATTN_BACKEND overrides the choice.
std::unique_ptr<AttentionBackend> make_backend(const std::string& name, DeviceKind kind = DeviceKind::cpu);
std::vector<std::string> available_backends();

}  // namespace longattn

namespace longattn {
// Bytes of GPU memory in use on the current device (cudaMemGetInfo: total - free); 0 without CUDA.
std::size_t gpu_memory_used_bytes();
}  // namespace longattn
