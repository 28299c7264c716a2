// The startup link probe: how fast the links of this job really are, inside a node and across
// nodes, measured by a few ping-pongs over the communicator the attention will use. The cost
// model's `auto` choice reads it instead of assumed figures. It uses only the Communicator (and the
// device's memory, so that a GPU communicator moves device buffers as the attention will).
#pragma once

#include <cstddef>

#include "longattn/communicator.hpp"
#include "longattn/device_ops.hpp"
#include "partition/cost_model.hpp"

namespace longattn::runtime {

struct LinkProbeOptions {
  // Large enough that the bandwidth term dominates the latency, small enough that the probe takes
  // milliseconds: the whole probe is a few round trips of this size per tier.
  std::size_t message_bytes = std::size_t{4} << 20;
  // Round trips per size; the fastest counts, since a slow one measures a busy machine, not the link.
  int repetitions = 3;
};

struct LinkProbeResult {
  // Measured only where the job has two ranks on one node (intra) or two nodes (inter).
  bool intra_measured = false, inter_measured = false;
  partition::Link intra_node, inter_node;
};

// Collective: every rank calls it with the same arguments. Ranks are numbered node by node,
// `ranks_per_node` to a node (the caller checked this). Rank 0 ping-pongs with rank 1 (inside its
// node) and with rank ranks_per_node (first rank of the next node); the others wait. Latency is half
// a round trip of a tiny message, bandwidth the large message's bytes over its one-way time less
// that latency. Every rank returns rank 0's figures. A pair alone measures its own path: where the
// whole job shares a link (one NIC for a node's GPUs), each GPU gets less under load than the
// probe saw, and a machine file's `link` lines are the way to say so.
LinkProbeResult probe_links(Communicator& comm, DeviceOps& memory, int ranks_per_node, const LinkProbeOptions& options = {});

}  // namespace longattn::runtime
