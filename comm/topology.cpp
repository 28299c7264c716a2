// Which ranks share a node. Real nodes are MPI shared-memory domains; LONGATTN_NODE_SIZE=N groups
// every N consecutive ranks instead, so multi-node code paths run on one machine.
#include "comm/topology.hpp"

#include <algorithm>
#include <vector>

#include "common/check.hpp"
#include "longattn/config.hpp"

namespace longattn::comm {

Topology discover_topology(MPI_Comm comm) {
  int rank = 0, size = 1;
  LONGATTN_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  LONGATTN_MPI_CHECK(MPI_Comm_size(comm, &size));
  Topology t;
  const long node_size = env_int("LONGATTN_NODE_SIZE");
  if (node_size > 0) {
    t.node = static_cast<int>(rank / node_size);
    t.nodes = static_cast<int>((size + node_size - 1) / node_size);
    t.local_rank = static_cast<int>(rank % node_size);
    t.local_size = static_cast<int>(std::min<long>(node_size, size - t.node * node_size));
    return t;
  }
  MPI_Comm shared;
  LONGATTN_MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shared));
  LONGATTN_MPI_CHECK(MPI_Comm_rank(shared, &t.local_rank));
  LONGATTN_MPI_CHECK(MPI_Comm_size(shared, &t.local_size));
  int leader = rank;  // smallest world rank of my node names the node
  LONGATTN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &leader, 1, MPI_INT, MPI_MIN, shared));
  MPI_Comm_free(&shared);
  std::vector<int> leaders(static_cast<std::size_t>(size));
  LONGATTN_MPI_CHECK(MPI_Allgather(&leader, 1, MPI_INT, leaders.data(), 1, MPI_INT, comm));
  std::vector<int> distinct = leaders;
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  t.nodes = static_cast<int>(distinct.size());
  t.node = static_cast<int>(std::lower_bound(distinct.begin(), distinct.end(), leader) - distinct.begin());
  return t;
}

}  // namespace longattn::comm
