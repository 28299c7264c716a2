// The MagiAttention-like baseline: fixed-size chunks of every sequence spread by a capped min-heap
// over all ranks, with no tiers. A chunk's queries need the keys and values of every earlier chunk
// of its sequence (every chunk without a causal mask), so a rank fetches those it does not hold
// from their owners before its calls and sends their dK/dV back after the backward; the model lets
// all of it hide behind the rank's compute where it can, the best case for this baseline.
#include <algorithm>
#include <functional>
#include <limits>
#include <queue>
#include <utility>
#include <vector>

#include "common/check.hpp"
#include "partition/varlen_cost.hpp"
#include "partition/varlen_groups.hpp"
#include "partition/varlen_planner.hpp"
#include "partition/varlen_timer.hpp"

namespace longattn::partition {
namespace {

struct Chunk {
  int seq = 0;
  std::int64_t index = 0, first = 0, tokens = 0;
  double forward_seconds = 0, backward_seconds = 0;
};

// Bytes each rank sends and receives on each tier in one direction of traffic, and its peers there.
struct Traffic {
  double bytes[2][2] = {{0, 0}, {0, 0}};  // [sent 0 / received 1][tier]
  int peers[2][2] = {{0, 0}, {0, 0}};
  double seconds(const MachineModel& m) const {
    double slowest = 0;
    for (const Tier tier : {Tier::intra_node, Tier::inter_node})
      for (int way = 0; way < 2; ++way) {
        const int t = static_cast<int>(tier);
        if (peers[way][t] > 0) slowest = std::max(slowest, m.transfer_seconds(bytes[way][t], tier, peers[way][t]));
      }
    return slowest;
  }
};

std::vector<Chunk> cut_into_chunks(const VarlenProblem& problem, const MachineModel& m, std::int64_t chunk_tokens) {
  std::vector<Chunk> chunks;
  for (std::size_t s = 0; s < problem.lengths.size(); ++s) {
    const std::int64_t length = problem.lengths[s];
    for (std::int64_t first = 0, index = 0; first < length; first += chunk_tokens, ++index) {
      Chunk c{static_cast<int>(s), index, first, std::min(chunk_tokens, length - first)};
      const double q = static_cast<double>(c.tokens);
      const double keys = problem.shape.causal ? static_cast<double>(first) + q : static_cast<double>(length);
      const double pairs = problem.shape.causal ? q * static_cast<double>(first) + q * (q + 1) / 2 : q * keys;
      c.forward_seconds = call_seconds(m, problem.shape, pairs, q, keys, problem.shape.causal, false);
      c.backward_seconds = call_seconds(m, problem.shape, pairs, q, keys, problem.shape.causal, true);
      chunks.push_back(c);
    }
  }
  return chunks;
}

}  // namespace

VarlenPlan plan_flat_minheap(const VarlenProblem& problem, const MachineModel& m, std::int64_t chunk_tokens) {
  const PlannerTimer timer;
  check_problem(problem);
  LONGATTN_INVALID(chunk_tokens > 0, "flat-minheap: the chunk size must be positive, got {}", chunk_tokens);
  const int P = problem.ranks;
  auto chunks = cut_into_chunks(problem, m, chunk_tokens);
  VarlenPlan plan;
  plan.planner = "flat-minheap";
  plan.ranks = P;
  plan.gpus_per_node = problem.gpus_per_node;
  plan.lengths = problem.lengths;
  plan.chunk_tokens = chunk_tokens;
  plan.chunk_owner.resize(problem.lengths.size());
  for (const auto& c : chunks) plan.chunk_owner[static_cast<std::size_t>(c.seq)].push_back(-1);

  // Most expensive chunk first onto the least loaded rank still under both caps.
  std::vector<std::size_t> order(chunks.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return chunks[a].forward_seconds + chunks[a].backward_seconds > chunks[b].forward_seconds + chunks[b].backward_seconds;
  });
  const auto chunk_cap = static_cast<std::int64_t>((chunks.size() + static_cast<std::size_t>(P) - 1) / static_cast<std::size_t>(P));
  const std::int64_t token_cap = problem.cap_tokens > 0 ? problem.cap_tokens : std::numeric_limits<std::int64_t>::max();
  std::vector<std::int64_t> chunk_count(static_cast<std::size_t>(P), 0);
  plan.rank_costs.assign(static_cast<std::size_t>(P), RankCost{});
  std::vector<double> forward(static_cast<std::size_t>(P), 0), backward(static_cast<std::size_t>(P), 0);
  using Entry = std::pair<double, int>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;
  for (int r = 0; r < P; ++r) heap.push({0.0, r});
  std::vector<Entry> no_room;
  for (const std::size_t i : order) {
    const auto& c = chunks[i];
    no_room.clear();
    while (!heap.empty() && plan.rank_costs[static_cast<std::size_t>(heap.top().second)].tokens > token_cap - c.tokens) {
      no_room.push_back(heap.top());
      heap.pop();
    }
    LONGATTN_INVALID(!heap.empty(), "flat-minheap: a chunk of sequence {} fits on no rank under the cap of {} tokens; raise "
                     "the cap or use smaller chunks", c.seq, token_cap);
    const auto [load, rank] = heap.top();
    heap.pop();
    const auto r = static_cast<std::size_t>(rank);
    plan.chunk_owner[static_cast<std::size_t>(c.seq)][static_cast<std::size_t>(c.index)] = rank;
    plan.rank_costs[r].tokens += c.tokens;
    forward[r] += c.forward_seconds;
    backward[r] += c.backward_seconds;
    if (++chunk_count[r] < chunk_cap) heap.push({load + c.forward_seconds + c.backward_seconds, rank});
    for (const auto& entry : no_room) heap.push(entry);
  }

  // Keys needed from other ranks: for each rank holding chunks of a sequence, every chunk of that
  // sequence up to its last one there (all of them without a causal mask) that it does not hold.
  std::vector<Traffic> forward_traffic(static_cast<std::size_t>(P)), backward_traffic(static_cast<std::size_t>(P));
  std::vector<std::pair<int, int>> links;  // (receiver, owner) pairs, for counting peers
  const auto& shape = problem.shape;
  const double kv_per_token = 2.0 * shape.kv_heads * shape.head_dim * shape.element_bytes;
  const double dkv_per_token = 2.0 * shape.kv_heads * shape.head_dim * shape.gradient_bytes;
  std::vector<std::pair<int, std::int64_t>> last_chunk_of_rank;
  for (std::size_t s = 0; s < plan.chunk_owner.size(); ++s) {
    const auto& owners = plan.chunk_owner[s];
    last_chunk_of_rank.clear();
    for (std::size_t j = 0; j < owners.size(); ++j) last_chunk_of_rank.push_back({owners[j], static_cast<std::int64_t>(j)});
    std::sort(last_chunk_of_rank.begin(), last_chunk_of_rank.end());
    for (std::size_t k = 0; k < last_chunk_of_rank.size(); ++k) {
      if (k + 1 < last_chunk_of_rank.size() && last_chunk_of_rank[k + 1].first == last_chunk_of_rank[k].first) continue;
      const auto [rank, last] = last_chunk_of_rank[k];
      const std::int64_t needed = shape.causal ? last + 1 : static_cast<std::int64_t>(owners.size());
      for (std::int64_t j = 0; j < needed; ++j) {
        const int owner = owners[static_cast<std::size_t>(j)];
        if (owner == rank) continue;
        const double tokens = static_cast<double>(std::min(chunk_tokens, problem.lengths[s] - j * chunk_tokens));
        const int t = static_cast<int>(tier_between(rank, owner, problem.gpus_per_node));
        forward_traffic[static_cast<std::size_t>(rank)].bytes[1][t] += tokens * kv_per_token;
        forward_traffic[static_cast<std::size_t>(owner)].bytes[0][t] += tokens * kv_per_token;
        backward_traffic[static_cast<std::size_t>(rank)].bytes[0][t] += tokens * dkv_per_token;
        backward_traffic[static_cast<std::size_t>(owner)].bytes[1][t] += tokens * dkv_per_token;
        (t == 0 ? plan.bytes_intra_node : plan.bytes_inter_node) += tokens * (kv_per_token + dkv_per_token);
        links.push_back({rank, owner});
      }
    }
  }
  std::sort(links.begin(), links.end());
  links.erase(std::unique(links.begin(), links.end()), links.end());
  for (const auto& [rank, owner] : links) {
    const int t = static_cast<int>(tier_between(rank, owner, problem.gpus_per_node));
    // Keys flow from the owner forward, their gradients back to it backward.
    ++forward_traffic[static_cast<std::size_t>(rank)].peers[1][t];
    ++forward_traffic[static_cast<std::size_t>(owner)].peers[0][t];
    ++backward_traffic[static_cast<std::size_t>(rank)].peers[0][t];
    ++backward_traffic[static_cast<std::size_t>(owner)].peers[1][t];
  }
  for (int rank = 0; rank < P; ++rank) {
    const auto r = static_cast<std::size_t>(rank);
    auto& cost = plan.rank_costs[r];
    cost.attention_seconds = forward[r] + backward[r];
    cost.linear_seconds = 3 * m.linear_seconds_per_token * static_cast<double>(cost.tokens);
    const double step = std::max(forward[r], forward_traffic[r].seconds(m)) + std::max(backward[r], backward_traffic[r].seconds(m));
    cost.exposed_comm_seconds = step - cost.attention_seconds;
  }
  VarlenGroup all{0, P, 1, tier_of_group(P, problem.gpus_per_node), Sharding::chunks, {}};
  for (std::size_t s = 0; s < problem.lengths.size(); ++s) all.sequences.push_back(static_cast<int>(s));
  plan.groups.push_back(std::move(all));
  plan.group_of.assign(problem.lengths.size(), 0);
  plan.planner_ms = timer.elapsed_ms();
  return plan;
}

}  // namespace longattn::partition
