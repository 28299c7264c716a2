// CallTimer (measure_timer.hpp).
#include "measure_timer.hpp"

#include <algorithm>
#include <chrono>
#include <vector>

#include <fmt/format.h>

#include "longattn/error.hpp"

#ifdef LONGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace longattn::bench {

#ifdef LONGATTN_HAVE_CUDA
namespace {
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(ErrorCode::internal, fmt::format("{}: {}", what, cudaGetErrorString(e)));
}
}  // namespace

struct CallTimer::Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  Events() {
    cuda_check(cudaEventCreate(&start), "cudaEventCreate");
    cuda_check(cudaEventCreate(&stop), "cudaEventCreate");
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  double time_ms(const std::function<void()>& run) {
    cuda_check(cudaEventRecord(start, nullptr), "cudaEventRecord");
    run();
    cuda_check(cudaEventRecord(stop, nullptr), "cudaEventRecord");
    cuda_check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    return ms;
  }
};
#else
struct CallTimer::Events {
  double time_ms(const std::function<void()>&) { return 0; }
};
#endif

CallTimer::CallTimer(AttentionBackend& backend) : backend_(backend) {
#ifdef LONGATTN_HAVE_CUDA
  if (backend.device().kind == DeviceKind::cuda) events_ = std::make_unique<Events>();
#endif
}

CallTimer::~CallTimer() = default;

const char* CallTimer::method() const noexcept { return events_ ? "CUDA events" : "wall clock"; }

double CallTimer::median_ms(int warmups, int reps, const std::function<void()>& run) {
  auto& ops = backend_.device_ops();
  for (int i = 0; i < warmups; ++i) run();
  ops.synchronize(nullptr);
  std::vector<double> ms;
  for (int i = 0; i < std::max(reps, 1); ++i) {
    if (events_) {
      ms.push_back(events_->time_ms(run));
    } else {
      const auto start = std::chrono::steady_clock::now();
      run();
      ops.synchronize(nullptr);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace longattn::bench
