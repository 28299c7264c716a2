// topology_report: an mpirun job that prints how longattn groups the job's ranks into nodes
// (Communicator::topology(), the grouping the hybrid strategy and the automatic choice build on),
// so a multi-host test can check that separate hosts are seen as separate nodes.
//
// Rank 0 prints one line per rank and ends with
//   RESULT {"program":"topology_report","ranks":P,"nodes":N,"node_of_rank":[...],"local_size_of_rank":[...],
//           "hostnames":[...]}
#include <unistd.h>

#include <array>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "examples/common/flags.hpp"
#include "longattn/communicator.hpp"

namespace {

using namespace longattn;

std::string json_int_list(const std::vector<int>& values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(values[i]);
  }
  return out + "]";
}

constexpr const char* kUsage =
    "usage: mpirun -np P topology_report\n"
    "  prints, on rank 0, each rank's host and node as longattn groups them (shared-memory domains,\n"
    "  or LONGATTN_NODE_SIZE when set), then RESULT {json}. Takes no flags.\n";

int run(int argc, char** argv) {
  const examples::Flags flags(argc, argv, kUsage, {}, {});  // --help, and refuses stray arguments
  MpiSession mpi(&argc, &argv);
  auto world = make_mpi_world_communicator();
  const int rank = world->rank(), ranks = world->size();
  const Topology topo = world->topology();

  // Hostnames travel as fixed-size, zero-padded records: allgather needs equal sizes per rank.
  constexpr std::size_t kNameBytes = 64;
  std::array<char, kNameBytes> name{};
  gethostname(name.data(), kNameBytes - 1);
  std::vector<char> names(kNameBytes * static_cast<std::size_t>(ranks));
  world->allgather(name.data(), names.data(), kNameBytes);
  const std::array<int, 3> mine{topo.node, topo.nodes, topo.local_size};
  std::vector<int> all(3 * static_cast<std::size_t>(ranks));
  world->allgather(mine.data(), all.data(), sizeof(mine));
  if (rank != 0) return 0;

  std::vector<int> node_of_rank, local_size_of_rank;
  std::string hostnames = "[";
  bool agree = true;
  for (int r = 0; r < ranks; ++r) {
    const int node = all[3 * r], nodes = all[3 * r + 1], local_size = all[3 * r + 2];
    const std::string host(&names[kNameBytes * r]);
    std::printf("rank %d: host %s, node %d of %d, %d ranks on its node\n", r, host.c_str(), node, nodes, local_size);
    node_of_rank.push_back(node);
    local_size_of_rank.push_back(local_size);
    if (r) hostnames += ',';
    hostnames += '"';
    hostnames += host;
    hostnames += '"';
    agree = agree && nodes == topo.nodes;
  }
  hostnames += "]";
  std::printf("RESULT {\"program\":\"topology_report\",\"ranks\":%d,\"nodes\":%d,\"ranks_agree\":%s,\"node_of_rank\":%s,"
              "\"local_size_of_rank\":%s,\"hostnames\":%s}\n",
              ranks, topo.nodes, agree ? "true" : "false", json_int_list(node_of_rank).c_str(),
              json_int_list(local_size_of_rank).c_str(), hostnames.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "topology_report: error: %s\n", e.what());
    return 1;
  }
}
