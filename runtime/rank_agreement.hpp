// Input checks that every rank must agree on before collective work starts: a rank that refused
// its arguments alone would leave the others waiting in the next exchange until a timeout.
#pragma once

#include <string>

#include "longattn/communicator.hpp"

namespace longattn::runtime {

// Collective. `local_problem` is empty when this rank's arguments are fine, else what is wrong
// with them. When any rank has a problem, every rank throws Error(invalid_argument) with the first
// such rank's message (prefixed "rank r: " when the communicator has several ranks); otherwise
// returns. Costs one integer reduction when all is well.
void throw_on_every_rank_if_any(Communicator& comm, const std::string& local_problem);

}  // namespace longattn::runtime
