// The planners' clock: CPU time of the calling thread, so a planner's reported time is its own work
// even on a machine whose cores other jobs share (wall time would count their turns too).
#pragma once

#include <ctime>

namespace longattn::partition {

class PlannerTimer {
 public:
  PlannerTimer() : start_(now()) {}
  double elapsed_ms() const { return (now() - start_) * 1e3; }

 private:
  static double now() {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
  }
  double start_;
};

}  // namespace longattn::partition
