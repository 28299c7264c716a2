// One refusal on every rank: a C call whose arguments are wrong on one rank must fail on all of
// them, or the others would wait in the next collective until the communicator's timeout.
#pragma once

#include <string>

#include "longattn/communicator.hpp"

namespace longattn::capi {

// Collective. `local_problem` is empty when this rank's arguments are fine. When any rank has a
// problem, every rank throws Error(invalid_argument) with the lowest such rank's message.
void refuse_on_every_rank_if_any(Communicator& comm, const std::string& local_problem);

}  // namespace longattn::capi
