// Names of the plan enums, for logs and error messages (see plan.hpp).
#include "partition/plan.hpp"

namespace longattn::partition {

const char* to_string(MaskKind kind) noexcept {
  switch (kind) {
    case MaskKind::none: return "none";
    case MaskKind::causal_by_index: return "causal_by_index";
    case MaskKind::positions: return "positions";
  }
  return "?";
}

const char* to_string(PlanTensor tensor) noexcept {
  switch (tensor) {
    case PlanTensor::q: return "q";
    case PlanTensor::k: return "k";
    case PlanTensor::v: return "v";
    case PlanTensor::o: return "o";
    case PlanTensor::lse: return "lse";
  }
  return "?";
}

const char* to_string(Strategy strategy) noexcept {
  switch (strategy) {
    case Strategy::ring: return "ring";
    case Strategy::ulysses: return "ulysses";
  }
  return "?";
}

}  // namespace longattn::partition
