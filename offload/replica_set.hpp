// KV replication for the offload client (ClientOptions::replicas): which servers hold the copies
// of a piece of KV, and which of those copies are complete. A piece whose primary server is p is
// also kept on the next replicas - 1 servers, (p + 1) % S, ...; every append goes to every
// complete copy, and reads go to the first complete one. A server whose request failed (it died,
// hung, restarted empty, or refused an append) holds incomplete copies from then on and is
// skipped for reads and writes, so a decode goes on as long as one copy of each piece is whole,
// and an answer is never computed over partial KV. When it answers again it is refilled from the
// complete copies: while refilling it takes no reads, and it counts as complete again only once
// it holds everything the others hold.
#pragma once

#include <cstddef>
#include <mutex>
#include <string>
#include <vector>

namespace longattn::offload {

enum class CopyState { complete, incomplete, refilling };

class ReplicaSet {
 public:
  // Throws Error(invalid_argument) unless 1 <= replicas <= servers.
  ReplicaSet(std::vector<std::string> servers, int replicas);

  int replicas() const { return replicas_; }
  bool replicated() const { return replicas_ > 1; }
  int servers() const { return static_cast<int>(servers_.size()); }
  const std::string& name(int server) const { return servers_[static_cast<std::size_t>(server)]; }

  // The servers that hold the piece whose primary is `primary`, primary first (all of them).
  std::vector<int> holders(int primary) const;
  bool holds(int server, int primary) const;
  // Those of them whose copy is complete, in the same order.
  std::vector<int> complete_holders(int primary) const;
  // Where to read the piece: the first complete holder, or -1 when none is left.
  int reader(int primary) const;
  // After a failed request to `server` (or a failed refill): its copies are incomplete from now on.
  // Returns whether it was complete before (the caller logs it once).
  bool mark_incomplete(int server);
  // An incomplete server starts refilling; false when it is complete or refilling already.
  bool begin_refill(int server);
  // A refilling server is complete again; false when it was not refilling (it failed meanwhile).
  bool finish_refill(int server);
  bool complete(int server) const { return state(server) == CopyState::complete; }
  CopyState state(int server) const;

  // "every server holding it (a, b) has failed" for an error message.
  std::string describe_lost(int primary) const;

 private:
  std::vector<std::string> servers_;
  int replicas_;
  mutable std::mutex mu_;
  std::vector<CopyState> state_;  // guarded by mu_
};

}  // namespace longattn::offload
