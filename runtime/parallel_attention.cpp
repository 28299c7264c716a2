// Placeholder: the strategy names. The executor lands next.
#include "longattn/parallel_attention.hpp"

#include "common/check.hpp"

namespace longattn {

const char* to_string(Strategy s) noexcept {
  switch (s) {
    case Strategy::ring: return "ring";
    case Strategy::ulysses: return "ulysses";
    case Strategy::hybrid: return "hybrid";
    case Strategy::automatic: return "auto";
  }
  return "?";
}

Strategy parse_strategy(const std::string& name) {
  for (Strategy s : {Strategy::ring, Strategy::ulysses, Strategy::hybrid, Strategy::automatic})
    if (name == to_string(s)) return s;
  throw Error(ErrorCode::invalid_argument, fmt::format("unknown strategy '{}': use ring, ulysses, hybrid or auto", name));
}

}  // namespace longattn
