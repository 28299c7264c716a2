// KV replication for the offload client (ClientOptions::replicas): which servers hold the copies
// of a piece of KV, and which of those copies are complete. A piece whose primary server is p is
// also kept on the next replicas - 1 servers, (p + 1) % S, ...; every append goes to every
// complete copy, and reads go to the first complete one. A server whose request failed (it died,
// hung, restarted empty, or refused an append) holds an incomplete copy from then on and is
// skipped for reads and writes, so a decode goes on as long as one copy of each piece is whole,
// and an answer is never computed over partial KV.
#pragma once

#include <cstddef>
#include <mutex>
#include <string>
#include <vector>

namespace longattn::offload {

class ReplicaSet {
 public:
  // Throws Error(invalid_argument) unless 1 <= replicas <= servers.
  ReplicaSet(std::vector<std::string> servers, int replicas);

  int replicas() const { return replicas_; }
  bool replicated() const { return replicas_ > 1; }

  // The servers that hold the piece whose primary is `primary`, primary first (all of them).
  std::vector<int> holders(int primary) const;
  // Those of them whose copy is complete, in the same order.
  std::vector<int> complete_holders(int primary) const;
  // Where to read the piece: the first complete holder, or -1 when none is left.
  int reader(int primary) const;
  // After a failed request to `server`: its copies are incomplete from now on. Returns whether
  // this was news (the caller logs it once).
  bool mark_incomplete(int server);
  bool complete(int server) const;

  // "every server holding it (a, b) has failed" for an error message.
  std::string describe_lost(int primary) const;

 private:
  std::vector<std::string> servers_;
  int replicas_;
  mutable std::mutex mu_;
  std::vector<bool> incomplete_;  // guarded by mu_
};

}  // namespace longattn::offload
