// The `automatic` strategy: picks the Ulysses degree U (and so the ring size R = ranks / U) for a
// problem on the machine this job runs on, from the cost model (partition/cost_model.hpp) fed
// with the topology, kernel rates and link speeds, and says why.
#pragma once

#include <string>

#include "longattn/parallel_attention.hpp"

namespace longattn::runtime {

struct StrategyChoice {
  Strategy strategy = Strategy::ring;  // ring, ulysses or hybrid
  int ulysses_size = 1;
  // One line per candidate with its modelled forward and backward times, the chosen one marked:
  // what ParallelAttention::choice_reason() returns and what gets logged.
  std::string reason;
};

// Collective (may probe the links): every rank calls it with the same arguments and gets the same
// answer. `device` is where the attention runs (picks the built-in machine model).
StrategyChoice choose_strategy(Communicator& comm, const AttentionProblem& problem, const ParallelOptions& options,
                               DeviceKind device);

}  // namespace longattn::runtime
