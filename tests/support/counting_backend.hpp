// A test double that counts what the ring runtime allocates through its backend's device
// operations (its workspaces): live bytes and the peak, and records the kernel calls it makes (their
// shapes and masks), so tests can hold the number of launches per step. Kernel-internal scratch is
// the backend's own business and not counted.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "support/delegating_backend.hpp"

namespace longattn::test {

class CountingDeviceOps final : public DelegatingDeviceOps {
 public:
  using DelegatingDeviceOps::DelegatingDeviceOps;
  std::size_t live = 0, peak = 0;
  std::unique_ptr<DeviceBuffer> allocate(std::size_t n) override {
    live += n;
    peak = std::max(peak, live);
    return std::make_unique<Counted>(inner_.allocate(n), *this);
  }

 private:
  struct Counted final : DeviceBuffer {
    Counted(std::unique_ptr<DeviceBuffer> b, CountingDeviceOps& o) : inner(std::move(b)), owner(o) {}
    ~Counted() override { owner.live -= inner->bytes(); }
    void* data() override { return inner->data(); }
    std::size_t bytes() const override { return inner->bytes(); }
    std::unique_ptr<DeviceBuffer> inner;
    CountingDeviceOps& owner;
  };
};

// What a kernel call was asked to compute: its rows, sequences and mask.
struct RecordedCall {
  std::int64_t q_rows = 0, k_rows = 0;
  int batch = 1;
  bool causal = false;
  bool positions = false;  // explicit positions passed (the kernels' slow path; cuDNN refuses them)
};

// The CPU backend, its allocations counted and its forward/backward calls recorded.
class CountingBackend final : public DelegatingBackend {
 public:
  CountingBackend() : DelegatingBackend(make_backend("cpu")), counter_(inner_->device_ops()) {}
  DeviceOps& device_ops() override { return counter_; }
  CountingDeviceOps& counter() { return counter_; }
  void forward(const AttentionArgs& a, const ForwardOutputs& o) override {
    forward_calls.push_back(record(a));
    inner_->forward(a, o);
  }
  void backward(const AttentionArgs& a, const BackwardArgs& g) override {
    backward_calls.push_back(record(a));
    inner_->backward(a, g);
  }
  std::vector<RecordedCall> forward_calls, backward_calls;

 private:
  static RecordedCall record(const AttentionArgs& a) {
    return {a.q.dim(0), a.k.dim(0), a.batch, a.causal, a.q_positions != nullptr || a.k_positions != nullptr};
  }
  CountingDeviceOps counter_;
};

}  // namespace longattn::test
