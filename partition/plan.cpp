// Names of the plan enums, for logs and error messages (see plan.hpp).
#include "partition/plan.hpp"

#include <array>
#include <cstddef>

namespace longattn::partition {
namespace {

// Each table lists the names in the order of its enum's values.
constexpr std::array<const char*, 3> kMaskKindNames = {"none", "causal_by_index", "positions"};
constexpr std::array<const char*, 5> kPlanTensorNames = {"q", "k", "v", "o", "lse"};
constexpr std::array<const char*, 3> kStrategyNames = {"ring", "ulysses", "hybrid"};
static_assert(static_cast<std::size_t>(MaskKind::positions) + 1 == kMaskKindNames.size());
static_assert(static_cast<std::size_t>(PlanTensor::lse) + 1 == kPlanTensorNames.size());
static_assert(static_cast<std::size_t>(Strategy::hybrid) + 1 == kStrategyNames.size());

template <class Enum, std::size_t N>
const char* name_in(const std::array<const char*, N>& names, Enum value) noexcept {
  const auto i = static_cast<std::size_t>(value);
  return i < N ? names[i] : "?";
}

}  // namespace

const char* to_string(MaskKind kind) noexcept { return name_in(kMaskKindNames, kind); }
const char* to_string(PlanTensor tensor) noexcept { return name_in(kPlanTensorNames, tensor); }
const char* to_string(Strategy strategy) noexcept { return name_in(kStrategyNames, strategy); }

}  // namespace longattn::partition
