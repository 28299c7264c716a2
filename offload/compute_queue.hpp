// The server's compute thread: attends run one after another, each with all of the decode
// kernel's threads. A memory-bound kernel gains nothing from running two at once, and serializing
// keeps each one at full DRAM bandwidth.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace longattn::offload {

class ComputeQueue {
 public:
  ComputeQueue() = default;
  ~ComputeQueue() { stop(); }
  ComputeQueue(const ComputeQueue&) = delete;
  ComputeQueue& operator=(const ComputeQueue&) = delete;

  void start();
  void submit(std::function<void()> job);
  // Jobs queued or running.
  int in_flight() const;
  // Runs what is queued, then ends the thread.
  void stop();

 private:
  void run();

  std::thread thread_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  int in_flight_ = 0;
  bool stopping_ = false;
};

}  // namespace longattn::offload
