// What a pipelined decode run reports, from what it measured: the model's busy fraction, the
// attention side's time per micro-batch and layer, and the bound on tokens/s that the slower of
// the two sides allows. Pure arithmetic on timings, so it can be checked by hand.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace offload_decode {

// One append_attend round trip: when it was sent and when its answer was complete.
struct RoundTrip {
  std::chrono::steady_clock::time_point issued, answered;
};

struct PipelineReport {
  double compute_busy_fraction = 0;    // model compute time / decode wall time
  double time_between_tokens_s = 0;    // decode wall time / steps: each sequence gets one token per step
  double attention_wait_s_per_step = 0;
  double compute_s_per_part = 0;       // model time per micro-batch and layer
  double attention_s_per_part = 0;     // attention-side time per micro-batch and layer
  double bound_tokens_per_s = 0;       // batch / (layers * micro-batches * max(compute, attention))
  double tokens_per_s = 0;
  double ratio() const { return bound_tokens_per_s > 0 ? tokens_per_s / bound_tokens_per_s : 0; }
};

// The attention side's busy time, seeing it as one server that answers in order: a round trip
// occupies it from when it was sent, or when the previous one was answered if later, until it is
// answered. With one micro-batch that is the whole round trip; with several, the time a request
// spent queued behind another micro-batch's is not counted twice.
inline double attention_busy_seconds(const std::vector<RoundTrip>& in_issue_order) {
  double busy = 0;
  std::chrono::steady_clock::time_point free_at{};
  for (const auto& r : in_issue_order) {
    const auto start = std::max(r.issued, free_at);
    if (r.answered > start) busy += std::chrono::duration<double>(r.answered - start).count();
    free_at = std::max(free_at, r.answered);
  }
  return busy;
}

inline PipelineReport pipeline_report(const std::vector<RoundTrip>& trips, double compute_s, double wait_s, double decode_s, int steps,
                                      int layers, int micro_batches, int batch) {
  PipelineReport r;
  const double parts = static_cast<double>(steps) * layers * micro_batches;
  r.compute_busy_fraction = decode_s > 0 ? compute_s / decode_s : 0;
  r.time_between_tokens_s = decode_s / steps;
  r.attention_wait_s_per_step = wait_s / steps;
  r.compute_s_per_part = compute_s / parts;
  r.attention_s_per_part = attention_busy_seconds(trips) / parts;
  const double slower = std::max(r.compute_s_per_part, r.attention_s_per_part);
  r.bound_tokens_per_s = slower > 0 ? batch / (static_cast<double>(layers) * micro_batches * slower) : 0;
  r.tokens_per_s = decode_s > 0 ? static_cast<double>(batch) * steps / decode_s : 0;
  return r;
}

}  // namespace offload_decode
