// The two CPU backends ("reference" and "cpu"): one class, differing only in the attention
// functions they call; merge, delta and the element-wise helpers are shared.
#include "kernels/cpu_backend.hpp"

#include <cstring>

#include "common/check.hpp"
#include "kernels/cpu_kernels.hpp"
#include "kernels/validate.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/host_buffer.hpp"

namespace longattn::kernels {
namespace {

class HostDeviceBuffer final : public DeviceBuffer {
 public:
  explicit HostDeviceBuffer(std::size_t bytes) : buf_(bytes) {}
  void* data() override { return buf_.data(); }
  std::size_t bytes() const override { return buf_.bytes(); }

 private:
  HostBuffer buf_;
};

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

  std::unique_ptr<DeviceBuffer> allocate(std::size_t bytes) override { return std::make_unique<HostDeviceBuffer>(bytes); }
  void fill(TensorView dst, float value, void*) override {
    const auto n = static_cast<std::size_t>(dst.numel());
    if (dst.dtype == DType::f32) {
      std::fill_n(dst.as<float>(), n, value);
    } else {
      for (std::size_t i = 0; i < n; ++i) store_from_f32(dst.data, dst.dtype, i, value);
    }
  }
  void add_into(TensorView dst, TensorView src, void*) override {
    LONGATTN_INVALID(dst.dtype == DType::f32 && dst.numel() == src.numel(), "add_into: dst {} must be fp32 and match src {}",
                     dst.describe(), src.describe());
    float* d = dst.as<float>();
    const auto n = static_cast<std::int64_t>(dst.numel());
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) d[i] += load_as_f32(src.data, src.dtype, static_cast<std::size_t>(i));
  }
  void convert(TensorView dst, TensorView src, void*) override {
    LONGATTN_INVALID(dst.numel() == src.numel(), "convert: {} and {} differ in size", dst.describe(), src.describe());
    const auto n = static_cast<std::size_t>(dst.numel());
    if (n == 0) return;  // empty views may hold null pointers
    if (dst.dtype == src.dtype) {
      std::memcpy(dst.data, src.data, dst.bytes());
    } else if (src.dtype == DType::f32) {
      convert_from_f32(src.as<const float>(), dst.data, dst.dtype, n);
    } else if (dst.dtype == DType::f32) {
      convert_to_f32(src.data, src.dtype, dst.as<float>(), n);
    } else {
      for (std::size_t i = 0; i < n; ++i) store_from_f32(dst.data, dst.dtype, i, load_as_f32(src.data, src.dtype, i));
    }
  }
  void copy_bytes(void* dst, const void* src, std::size_t bytes, void*) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);  // an empty shard may pass null (memcpy must not see it)
  }
  void synchronize(void*) override {}

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
