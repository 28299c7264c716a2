// Topology discovery for an MPI communicator.
#pragma once

#include <mpi.h>

#include "longattn/communicator.hpp"

namespace longattn::comm {
// Nodes from shared-memory domains, or from LONGATTN_NODE_SIZE when set (> 0).
Topology discover_topology(MPI_Comm comm);
}  // namespace longattn::comm
