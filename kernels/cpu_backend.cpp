// The two CPU backends ("reference" and "cpu"): one class, differing only in the attention
// functions they call; merge and delta are shared, memory is the host's (cpu_device_ops.cpp).
#include "kernels/cpu_backend.hpp"

#include "kernels/cpu_kernels.hpp"
#include "kernels/validate.hpp"

namespace longattn::kernels {
namespace {

using ForwardFn = void (*)(const AttentionArgs&, const ForwardOutputs&);
using BackwardFn = void (*)(const AttentionArgs&, const BackwardArgs&);

class CpuBackend final : public AttentionBackend {
 public:
  CpuBackend(std::string name, ForwardFn f, BackwardFn b) : name_(std::move(name)), fwd_(f), bwd_(b) {}
  std::string name() const override { return name_; }
  Device device() const override { return {DeviceKind::cpu, 0}; }

  std::string unsupported_reason(const AttentionArgs& a) const override {
    for (const auto* t : {&a.q, &a.k, &a.v})
      if (t->device.kind != DeviceKind::cpu) return "tensors are on " + std::string(to_string(t->device.kind));
    return {};
  }
  void forward(const AttentionArgs& a, const ForwardOutputs& out) override { fwd_(a, out); }
  void backward(const AttentionArgs& a, const BackwardArgs& g) override { bwd_(a, g); }
  void merge_into(TensorView oa, TensorView la, TensorView op, TensorView lp, void*) override {
    cpu_merge_into(oa, la, op, lp);
  }
  void compute_delta(TensorView o, TensorView d_o, TensorView delta, void*) override { cpu_compute_delta(o, d_o, delta); }

 private:
  std::string name_;
  ForwardFn fwd_;
  BackwardFn bwd_;
};

}  // namespace

std::unique_ptr<AttentionBackend> make_reference_backend() {
  return std::make_unique<CpuBackend>("reference", reference_forward, reference_backward);
}
std::unique_ptr<AttentionBackend> make_cpu_fast_backend() {
  return std::make_unique<CpuBackend>("cpu", cpu_fast_forward, cpu_fast_backward);
}

}  // namespace longattn::kernels
