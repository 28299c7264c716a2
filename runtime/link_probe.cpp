// The link probe's ping-pongs and the arithmetic that turns round trips into bandwidth and latency.
#include "runtime/link_probe.hpp"

#include <algorithm>
#include <chrono>
#include <limits>

#include "common/check.hpp"

namespace longattn::runtime {

namespace {

constexpr int kProbeTag = 0x71ab;
constexpr std::size_t kLatencyBytes = 8;

// The fastest of `repetitions` round trips of `bytes` between rank 0 and `peer`, in seconds; only
// the two of them call it. The peer echoes what it receives. synchronize() makes a stream-ordered
// communicator's transfer finish before the clock reads it.
double fastest_round_trip(Communicator& comm, void* buffer, std::size_t bytes, int peer, int repetitions) {
  using Clock = std::chrono::steady_clock;
  const bool initiator = comm.rank() == 0;
  const int other = initiator ? peer : 0;
  double best = std::numeric_limits<double>::infinity();
  // One round trip more than counted: the first connects the pair and warms the buffers.
  for (int i = 0; i <= repetitions; ++i) {
    const auto start = Clock::now();
    if (initiator) {
      comm.isend(buffer, bytes, other, kProbeTag)->wait();
      comm.irecv(buffer, bytes, other, kProbeTag)->wait();
    } else {
      comm.irecv(buffer, bytes, other, kProbeTag)->wait();
      comm.isend(buffer, bytes, other, kProbeTag)->wait();
    }
    comm.synchronize(nullptr);
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (i > 0) best = std::min(best, seconds);
  }
  return best;
}

// One tier: latency from the small message, bandwidth from the large one's time beyond it. A large
// message that came back no slower than the small one (a clock too coarse, a link too fast for this
// size) still gives a finite rate: the large message's own time is a lower bound of the link's.
partition::Link measure_tier(Communicator& comm, void* buffer, std::size_t bytes, int peer, int repetitions) {
  const double latency = fastest_round_trip(comm, buffer, kLatencyBytes, peer, repetitions) / 2;
  const double one_way = fastest_round_trip(comm, buffer, bytes, peer, repetitions) / 2;
  const double transfer = one_way > 2 * latency ? one_way - latency : one_way;
  return {static_cast<double>(bytes) / transfer, latency};
}

}  // namespace

LinkProbeResult probe_links(Communicator& comm, DeviceOps& memory, int ranks_per_node, const LinkProbeOptions& options) {
  LONGATTN_INVALID(ranks_per_node >= 1 && comm.size() % ranks_per_node == 0,
                   "link probe: {} ranks do not form nodes of {} ranks", comm.size(), ranks_per_node);
  LONGATTN_INVALID(options.message_bytes >= kLatencyBytes && options.repetitions >= 1,
                   "link probe: message size {} must be at least {} bytes and repetitions {} at least 1",
                   options.message_bytes, kLatencyBytes, options.repetitions);
  const int rank = comm.rank();
  const int intra_peer = ranks_per_node >= 2 ? 1 : -1;
  const int inter_peer = comm.size() > ranks_per_node ? ranks_per_node : -1;
  LinkProbeResult result;
  const bool involved = rank == 0 || rank == intra_peer || rank == inter_peer;
  if (involved) {
    auto buffer = memory.allocate(options.message_bytes);
    if (intra_peer > 0 && (rank == 0 || rank == intra_peer)) {
      result.intra_node = measure_tier(comm, buffer->data(), options.message_bytes, intra_peer, options.repetitions);
      result.intra_measured = true;
    }
    if (inter_peer > 0 && (rank == 0 || rank == inter_peer)) {
      result.inter_node = measure_tier(comm, buffer->data(), options.message_bytes, inter_peer, options.repetitions);
      result.inter_measured = true;
    }
  }
  // Rank 0 measured both tiers: everyone gets its figures, so every rank models the same machine.
  double figures[6] = {result.intra_measured ? 1.0 : 0.0, result.intra_node.bytes_per_second, result.intra_node.latency_seconds,
                       result.inter_measured ? 1.0 : 0.0, result.inter_node.bytes_per_second, result.inter_node.latency_seconds};
  comm.broadcast(figures, sizeof figures, 0);
  return {figures[0] != 0, figures[3] != 0, {figures[1], figures[2]}, {figures[4], figures[5]}};
}

}  // namespace longattn::runtime
