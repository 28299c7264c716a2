// The compute thread (see compute_queue.hpp).
#include "offload/compute_queue.hpp"

namespace longattn::offload {

void ComputeQueue::start() { thread_ = std::thread([this] { run(); }); }

void ComputeQueue::submit(std::function<void()> job) {
  {
    std::lock_guard lock(mu_);
    jobs_.push_back(std::move(job));
    in_flight_++;
  }
  wake_.notify_one();
}

int ComputeQueue::in_flight() const {
  std::lock_guard lock(mu_);
  return in_flight_;
}

void ComputeQueue::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ComputeQueue::run() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mu_);
      wake_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
    std::lock_guard lock(mu_);
    in_flight_--;
  }
}

}  // namespace longattn::offload
