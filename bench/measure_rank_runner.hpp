// One rank's local attention launches of a varlen plan, run and timed on one device: what
// `longattn-bench balance-measure` does for every rank in turn. The launches run back to back with
// random inputs, in buffers sized for the largest of them (views at each launch's rows, as the
// executor's workspaces), and the cost model prices the same launches beside the measurement.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "longattn/backend.hpp"
#include "partition/cost_model.hpp"
#include "partition/varlen_planner.hpp"
#include "runtime/varlen_rank_calls.hpp"

namespace longattn::bench {

struct RankRunnerSettings {
  partition::MachineModel machine;  // prices the launches
  partition::VarlenShape shape;     // heads and head dim of the layer
  DType dtype = DType::bf16;        // q, k, v, o, dO
  bool backward = false;            // time the backward too
  int warmups = 1, reps = 3;
};

struct RankMeasurement {
  double forward_ms = 0, backward_ms = 0;              // measured: median over the repeats
  double model_forward_ms = 0, model_backward_ms = 0;  // the cost model on the same launches
  int launches = 0;
};

// The cost model's seconds for one launch, each sequence of a grouped launch at the rate of its own
// block (how the planner prices a group's sequences).
double model_seconds(const partition::MachineModel& machine, partition::VarlenShape shape, const runtime::VarlenRankCall& c,
                     bool backward);

class RankRunner {
 public:
  RankRunner(AttentionBackend& backend, RankRunnerSettings settings);
  ~RankRunner();
  RankRunner(const RankRunner&) = delete;
  RankRunner& operator=(const RankRunner&) = delete;

  // "CUDA events" or "wall clock".
  const char* timing() const;
  // Runs and times one rank's launches (their tensors filled from `seed`), and prices them.
  RankMeasurement measure(const std::vector<runtime::VarlenRankCall>& calls, std::uint64_t seed);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longattn::bench
