// Timing local attention calls on a backend's own device, for the benchmarks that measure what the
// cost model predicts (balance-measure, calibrate): CUDA events queued with the calls on GPUs, so
// the host's launch work overlaps as in a training step; the wall clock around a synchronize on CPUs.
#pragma once

#include <functional>
#include <memory>

#include "longattn/backend.hpp"

namespace longattn::bench {

class CallTimer {
 public:
  explicit CallTimer(AttentionBackend& backend);
  ~CallTimer();
  CallTimer(const CallTimer&) = delete;
  CallTimer& operator=(const CallTimer&) = delete;

  // Median milliseconds of one `run` over `reps` timed repeats, after `warmups` untimed ones (the
  // first call of a shape builds cuDNN graphs and workspaces).
  double median_ms(int warmups, int reps, const std::function<void()>& run);
  // "CUDA events" or "wall clock", for the output.
  const char* method() const noexcept;

 private:
  struct Events;
  AttentionBackend& backend_;
  std::unique_ptr<Events> events_;  // GPU backends only
};

}  // namespace longattn::bench
