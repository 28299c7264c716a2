// Connections per client id (see client_registry.hpp).
#include "offload/client_registry.hpp"

namespace longattn::offload {

void ClientRegistry::connected(std::uint64_t client) {
  std::lock_guard lock(mu_);
  connections_[client]++;
  without_connection_since_.erase(client);
}

void ClientRegistry::disconnected(std::uint64_t client, Clock::time_point now) {
  std::lock_guard lock(mu_);
  auto it = connections_.find(client);
  if (it == connections_.end() || --it->second > 0) return;
  connections_.erase(it);
  without_connection_since_[client] = now;
}

std::vector<std::uint64_t> ClientRegistry::take_orphaned_for(Clock::duration timeout, Clock::time_point now) {
  std::vector<std::uint64_t> out;
  std::lock_guard lock(mu_);
  for (auto it = without_connection_since_.begin(); it != without_connection_since_.end();) {
    if (now - it->second >= timeout) {
      out.push_back(it->first);
      it = without_connection_since_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

void ClientRegistry::forget_orphans() {
  std::lock_guard lock(mu_);
  without_connection_since_.clear();
}

std::unordered_map<std::uint64_t, int> ClientRegistry::connection_counts() const {
  std::lock_guard lock(mu_);
  return connections_;
}

}  // namespace longattn::offload
