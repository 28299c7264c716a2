// Where KV copies live and which are complete (see replica_set.hpp).
#include "offload/replica_set.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/check.hpp"

namespace longattn::offload {

ReplicaSet::ReplicaSet(std::vector<std::string> servers, int replicas)
    : servers_(std::move(servers)), replicas_(replicas), state_(servers_.size(), CopyState::complete) {
  LONGATTN_INVALID(replicas >= 1 && static_cast<std::size_t>(replicas) <= servers_.size(),
                   "offload client: replicas {} must be between 1 and the number of servers ({}): each copy needs a server of its own",
                   replicas, servers_.size());
}

std::vector<int> ReplicaSet::holders(int primary) const {
  std::vector<int> out;
  const int n = static_cast<int>(servers_.size());
  for (int i = 0; i < replicas_; ++i) out.push_back((primary + i) % n);
  return out;
}

bool ReplicaSet::holds(int server, int primary) const {
  const int n = static_cast<int>(servers_.size());
  return (server - primary + n) % n < replicas_;
}

std::vector<int> ReplicaSet::complete_holders(int primary) const {
  std::vector<int> out;
  std::lock_guard lock(mu_);
  for (int s : holders(primary))
    if (state_[static_cast<std::size_t>(s)] == CopyState::complete) out.push_back(s);
  return out;
}

int ReplicaSet::reader(int primary) const {
  const auto h = complete_holders(primary);
  return h.empty() ? -1 : h.front();
}

bool ReplicaSet::mark_incomplete(int server) {
  std::lock_guard lock(mu_);
  auto& s = state_[static_cast<std::size_t>(server)];
  const bool was_complete = s == CopyState::complete;
  s = CopyState::incomplete;
  return was_complete;
}

bool ReplicaSet::begin_refill(int server) {
  std::lock_guard lock(mu_);
  auto& s = state_[static_cast<std::size_t>(server)];
  if (s != CopyState::incomplete) return false;
  s = CopyState::refilling;
  return true;
}

bool ReplicaSet::finish_refill(int server) {
  std::lock_guard lock(mu_);
  auto& s = state_[static_cast<std::size_t>(server)];
  if (s != CopyState::refilling) return false;
  s = CopyState::complete;
  return true;
}

CopyState ReplicaSet::state(int server) const {
  std::lock_guard lock(mu_);
  return state_[static_cast<std::size_t>(server)];
}

std::string ReplicaSet::describe_lost(int primary) const {
  std::vector<std::string> names;
  for (int s : holders(primary)) names.push_back(servers_[static_cast<std::size_t>(s)]);
  return fmt::format("every server holding its KV ({}) has failed", fmt::join(names, ", "));
}

}  // namespace longattn::offload
