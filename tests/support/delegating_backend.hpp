// Test double bases: an AttentionBackend (and DeviceOps) that passes every call to another, so a
// test overrides only what it watches or changes (refusals, recorded arguments, injected errors).
#pragma once

#include <memory>
#include <string>

#include "longattn/backend.hpp"

namespace longattn::test {

class DelegatingBackend : public AttentionBackend {
 public:
  explicit DelegatingBackend(std::unique_ptr<AttentionBackend> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  Device device() const override { return inner_->device(); }
  std::string unsupported_reason(const AttentionArgs& a) const override { return inner_->unsupported_reason(a); }
  void forward(const AttentionArgs& a, const ForwardOutputs& o) override { inner_->forward(a, o); }
  void backward(const AttentionArgs& a, const BackwardArgs& g) override { inner_->backward(a, g); }
  void merge_into(TensorView oa, TensorView la, TensorView op, TensorView lp, void* s) override {
    inner_->merge_into(oa, la, op, lp, s);
  }
  void compute_delta(TensorView o, TensorView d_o, TensorView d, void* s) override { inner_->compute_delta(o, d_o, d, s); }
  DeviceOps& device_ops() override { return inner_->device_ops(); }

 protected:
  std::unique_ptr<AttentionBackend> inner_;
};

// The same for device operations: a test overrides allocate to count, say, and passes the rest on.
class DelegatingDeviceOps : public DeviceOps {
 public:
  explicit DelegatingDeviceOps(DeviceOps& inner) : inner_(inner) {}
  std::unique_ptr<DeviceBuffer> allocate(std::size_t n) override { return inner_.allocate(n); }
  void fill(TensorView d, float v, void* s) override { inner_.fill(d, v, s); }
  void add_into(TensorView d, TensorView src, void* s) override { inner_.add_into(d, src, s); }
  void convert(TensorView d, TensorView src, void* s) override { inner_.convert(d, src, s); }
  void copy_bytes(void* d, const void* src, std::size_t n, void* s) override { inner_.copy_bytes(d, src, n, s); }
  void copy_2d(void* d, std::size_t dp, const void* src, std::size_t sp, std::size_t w, std::size_t rows, void* s) override {
    inner_.copy_2d(d, dp, src, sp, w, rows, s);
  }
  void synchronize(void* s) override { inner_.synchronize(s); }

 protected:
  DeviceOps& inner_;
};

}  // namespace longattn::test
