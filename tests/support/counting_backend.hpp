// A test double that counts what the ring runtime allocates through its backend's device
// operations (its workspaces): live bytes and the peak. Kernel-internal scratch is the backend's
// own business and not counted.
#pragma once

#include <algorithm>
#include <memory>

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

// The CPU backend, its allocations counted.
class CountingBackend final : public DelegatingBackend {
 public:
  CountingBackend() : DelegatingBackend(make_backend("cpu")), counter_(inner_->device_ops()) {}
  DeviceOps& device_ops() override { return counter_; }
  CountingDeviceOps& counter() { return counter_; }

 private:
  CountingDeviceOps counter_;
};

}  // namespace longattn::test
