// The micro-batch scheduling of offload_decode, one loop for the model on the CPU and on the GPU.
// Each micro-batch walks through (step, layer) on its own: its model work (finish the previous
// layer with the attention result, then the next layer's projections) and then its attention on
// the servers, whose answer comes back through the client's asynchronous append_attend. The loop
// serves whichever micro-batch can move: an attention answer that arrived starts that micro-batch's
// model work; model work that finished (on the GPU: its stream's event passed) sends its request.
// So the host thread never waits for one micro-batch's GPU work while another's answer is ready.
#pragma once

#include <chrono>
#include <deque>
#include <future>
#include <thread>
#include <vector>

#include "pipeline_stats.hpp"

namespace offload_decode {

// What a model (CPU or GPU) does for the loop, per micro-batch m.
class MicroBatchModel {
 public:
  virtual ~MicroBatchModel() = default;
  // Starts m's model work: when finish_layer >= 0 its attention result of that layer is in place
  // (x += o Wo, norm); when next_layer >= 0, the projections of that layer follow (q, k, v ready
  // to send). The CPU model does it before returning, the GPU model enqueues it on m's stream.
  virtual void start(int m, int finish_layer, int next_layer, int step) = 0;
  // Whether m's model work has finished (never blocks).
  virtual bool done(int m) = 0;
  // Sends m's append_attend of `layer`; the client stores the answer's arrival time in *answered.
  virtual std::future<void> send(int m, int layer, std::chrono::steady_clock::time_point* answered) = 0;
};

struct PipelineTimes {
  std::vector<RoundTrip> trips;  // every append_attend, in the order sent
  double wait_s = 0;             // no model work in flight anywhere, the host waiting for an answer
  double decode_s = 0;
};

inline PipelineTimes run_pipeline(MicroBatchModel& model, int micro_batches, int steps, int layers) {
  using Clock = std::chrono::steady_clock;
  struct State {
    int unit = 0;  // index of the (step, layer) this micro-batch is at: step * layers + layer
    bool started = false, computing = false;
    std::future<void> answer;
    std::size_t trip = 0;
  };
  const int units = steps * layers;
  std::vector<State> st(static_cast<std::size_t>(micro_batches));
  std::deque<RoundTrip> trips;  // stable addresses: the client writes answer times into them
  PipelineTimes t;
  const auto t0 = Clock::now();
  int finished = 0;
  while (finished < micro_batches) {
    bool moved = false, any_computing = false;
    for (int m = 0; m < micro_batches; ++m) {
      State& s = st[static_cast<std::size_t>(m)];
      if (!s.started) {  // one at a time, so the first micro-batch's request leaves before the next computes
        model.start(m, -1, 0, 0);
        s.started = s.computing = moved = true;
      }
      // A deferred answer (the client's replicated append_attend) completes inside get().
      if (s.answer.valid() && s.answer.wait_for(std::chrono::seconds(0)) != std::future_status::timeout) {
        s.answer.get();
        const int layer = s.unit % layers;
        ++s.unit;
        model.start(m, layer, s.unit < units ? s.unit % layers : -1, s.unit / layers);
        s.computing = true;
        moved = true;
      }
      if (s.computing && model.done(m)) {
        s.computing = false;
        moved = true;
        if (s.unit == units) {
          ++finished;
          continue;
        }
        s.trip = trips.size();
        trips.push_back({Clock::now(), {}});
        s.answer = model.send(m, s.unit % layers, &trips.back().answered);
      }
      any_computing = any_computing || s.computing;
    }
    if (moved) continue;
    if (any_computing) {
      std::this_thread::yield();  // model work in flight on the GPU: poll its events and the answers
      continue;
    }
    // Nothing to compute anywhere: the model side waits for the attention side. Block on the
    // request sent first, which the servers answer first.
    State* oldest = nullptr;
    for (auto& s : st)
      if (s.answer.valid() && (!oldest || s.trip < oldest->trip)) oldest = &s;
    if (!oldest) break;  // unreachable: a micro-batch that is not finished is computing or attending
    const auto w = Clock::now();
    oldest->answer.wait();
    t.wait_s += std::chrono::duration<double>(Clock::now() - w).count();
  }
  t.decode_s = std::chrono::duration<double>(Clock::now() - t0).count();
  t.trips.assign(trips.begin(), trips.end());
  return t;
}

}  // namespace offload_decode
