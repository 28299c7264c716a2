// Placeholder until the cost-model choice lands: a flat ring.
#include "runtime/strategy_choice.hpp"

namespace longattn::runtime {

StrategyChoice choose_strategy(Communicator&, const AttentionProblem&, const ParallelOptions&, DeviceKind) {
  return {Strategy::ring, 1, "automatic: ring (the cost-model choice is not built yet)"};
}

}  // namespace longattn::runtime
