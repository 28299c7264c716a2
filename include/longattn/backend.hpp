// A local attention backend: one device's attention math (forward, backward, the merge of partial
// results and the backward's delta). Memory and element-wise operations are the device's
// (device_ops.hpp), so a backend needs no device runtime of its own. Backends register by name;
// CPU ones are always there, CUDA/cuDNN when built and a GPU is present.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "longattn/attention.hpp"
#include "longattn/device_ops.hpp"

namespace longattn {

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

  // Memory and element-wise operations on this backend's device: device_ops_for(device().kind)
  // unless overridden (a test double that counts allocations, say).
  virtual DeviceOps& device_ops();
};

// Names: "reference" (double precision oracle), "cpu" (fast CPU), and where built "cuda",
// "cudnn". "auto": on CPUs the fast kernels; on GPUs every available GPU backend, each call going to
// the first that supports it (cudnn, then cuda). LONGATTN_BACKEND overrides the choice.
std::unique_ptr<AttentionBackend> make_backend(const std::string& name, DeviceKind kind = DeviceKind::cpu);
std::vector<std::string> available_backends();

}  // namespace longattn
