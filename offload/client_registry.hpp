// Which client ids have authenticated connections now, and since when each one that had some has
// had none: the server drops the sequences of a client id that stayed without a connection for
// --orphan-timeout (a client killed without dropping its sequences must not hold memory forever).
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace longattn::offload {

class ClientRegistry {
 public:
  using Clock = std::chrono::steady_clock;

  void connected(std::uint64_t client);
  void disconnected(std::uint64_t client, Clock::time_point now = Clock::now());
  // Client ids without a connection for at least `timeout`; they are forgotten (a later
  // connection starts afresh).
  std::vector<std::uint64_t> take_orphaned_for(Clock::duration timeout, Clock::time_point now = Clock::now());
  // Forgets when client ids lost their connections (nothing is to be released).
  void forget_orphans();
  // Connections per client id that has any.
  std::unordered_map<std::uint64_t, int> connection_counts() const;

 private:
  mutable std::mutex mu_;
  std::unordered_map<std::uint64_t, int> connections_;
  std::unordered_map<std::uint64_t, Clock::time_point> without_connection_since_;
};

}  // namespace longattn::offload
