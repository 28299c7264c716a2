// A backend that forwards every call to one it does not own: a varlen batch runs several ring or
// hybrid attentions (one per group of the rank), each of which owns "its" backend, while the user
// gave one backend for all of them (one device, one set of caches).
#pragma once

#include "longattn/backend.hpp"

namespace longattn::runtime {

class BorrowedBackend final : public AttentionBackend {
 public:
  explicit BorrowedBackend(AttentionBackend& owner) : owner_(owner) {}
  std::string name() const override { return owner_.name(); }
  Device device() const override { return owner_.device(); }
  std::string unsupported_reason(const AttentionArgs& args) const override { return owner_.unsupported_reason(args); }
  void forward(const AttentionArgs& args, const ForwardOutputs& out) override { owner_.forward(args, out); }
  void backward(const AttentionArgs& args, const BackwardArgs& grads) override { owner_.backward(args, grads); }
  void merge_into(TensorView o_acc, TensorView lse_acc, TensorView o_part, TensorView lse_part, void* stream) override {
    owner_.merge_into(o_acc, lse_acc, o_part, lse_part, stream);
  }
  void compute_delta(TensorView o, TensorView d_o, TensorView delta, void* stream) override {
    owner_.compute_delta(o, d_o, delta, stream);
  }
  DeviceOps& device_ops() override { return owner_.device_ops(); }

 private:
  AttentionBackend& owner_;
};

}  // namespace longattn::runtime
