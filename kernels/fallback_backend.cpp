// See fallback_backend.hpp. A preferred backend may also refuse at run time what it only learns
// then (cuDNN finding no engine for a shape): that Error(unsupported) sends the call on to the next.
#include "kernels/fallback_backend.hpp"

#include <mutex>
#include <set>

#include "common/check.hpp"
#include "longattn/log.hpp"

namespace longattn::kernels {
namespace {

class FallbackBackend final : public AttentionBackend {
 public:
  explicit FallbackBackend(std::vector<std::unique_ptr<AttentionBackend>> c) : candidates_(std::move(c)) {
    LONGATTN_INVALID(!candidates_.empty(), "a fallback backend needs at least one candidate");
  }

  // The backends that have run calls so far, joined by '+' ("cudnn+cuda"), so a RESULT line says
  // what was used; before any call, the preference order ("cudnn>cuda").
  std::string name() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string out;
    for (const auto& c : candidates_)
      if (used_.empty() || used_.count(c->name())) {
        if (!out.empty()) out += used_.empty() ? ">" : "+";
        out += c->name();
      }
    return out;
  }
  Device device() const override { return candidates_.back()->device(); }

  std::string unsupported_reason(const AttentionArgs& a) const override {
    std::string reasons;
    for (const auto& c : candidates_) {
      auto why = c->unsupported_reason(a);
      if (why.empty()) return {};
      reasons += (reasons.empty() ? "" : "; ") + c->name() + ": " + why;
    }
    return reasons;
  }

  void forward(const AttentionArgs& a, const ForwardOutputs& out) override {
    dispatch(a, [&](AttentionBackend& b) { b.forward(a, out); });
  }
  void backward(const AttentionArgs& a, const BackwardArgs& g) override {
    dispatch(a, [&](AttentionBackend& b) { b.backward(a, g); });
  }

  void merge_into(TensorView oa, TensorView la, TensorView op, TensorView lp, void* stream) override {
    helpers().merge_into(oa, la, op, lp, stream);
  }
  void compute_delta(TensorView o, TensorView d_o, TensorView delta, void* stream) override {
    helpers().compute_delta(o, d_o, delta, stream);
  }
  DeviceOps& device_ops() override { return helpers().device_ops(); }

 private:
  AttentionBackend& helpers() { return *candidates_.back(); }

  template <class Call>
  void dispatch(const AttentionArgs& a, Call&& call) {
    std::string reasons;
    for (std::size_t i = 0; i < candidates_.size(); ++i) {
      auto& c = *candidates_[i];
      auto why = c.unsupported_reason(a);
      if (why.empty()) {
        try {
          call(c);
          std::lock_guard<std::mutex> lock(mutex_);
          used_.insert(c.name());
          return;
        } catch (const Error& e) {
          // Only "cannot run this" moves on; real failures (bad input, CUDA errors) surface.
          if (e.code() != ErrorCode::unsupported || i + 1 == candidates_.size()) throw;
          why = e.what();
        }
      }
      logger(Subsystem::kernels).debug("backend {} passes a call on: {}", c.name(), why);
      reasons += (reasons.empty() ? "" : "; ") + c.name() + ": " + why;
    }
    throw Error(ErrorCode::unsupported, "no backend supports this attention call (" + reasons + ")");
  }

  std::vector<std::unique_ptr<AttentionBackend>> candidates_;
  mutable std::mutex mutex_;
  std::set<std::string> used_;
};

}  // namespace

std::unique_ptr<AttentionBackend> make_fallback_backend(std::vector<std::unique_ptr<AttentionBackend>> candidates) {
  return std::make_unique<FallbackBackend>(std::move(candidates));
}

}  // namespace longattn::kernels
