// Failed authentications per source address: a few are free, then an address may fail only at a
// slow steady rate, and attempts beyond it are refused without comparing the token. Token guessing
// over the network thus costs the guesser time rather than the server log lines: failures are
// counted and reported as one summary line per interval, not one line per guess.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

namespace longattn::offload {

class AuthThrottle {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    double burst = 10;             // failures an address may have before the rate applies
    double failures_per_s = 1;     // the steady rate after that
    double log_interval_s = 10;    // at most one summary line per interval
    std::size_t max_addresses = 65536;  // addresses remembered; the ones that are fully recovered go first
  };
  AuthThrottle() : AuthThrottle(Options{}) {}
  explicit AuthThrottle(Options opt) : opt_(opt) {}

  // Whether an attempt from `address` may be checked now. A refused attempt is counted.
  bool allow(const std::string& address, Clock::time_point now = Clock::now());
  // A wrong token from `address`.
  void failed(const std::string& address, Clock::time_point now = Clock::now());
  // Seconds until `address` may try again (0 when it may now).
  double wait_s(const std::string& address, Clock::time_point now = Clock::now());

  // One line about the failures and refusals since the last summary, once the log interval has
  // passed since it; empty when there is nothing to say yet.
  std::string take_summary(Clock::time_point now = Clock::now());

  std::uint64_t failures_total() const;
  std::uint64_t refused_total() const;

 private:
  struct Bucket {
    double credit = 0;
    Clock::time_point updated;
    std::uint64_t events_in_interval = 0;  // failures + refusals since the last summary
  };
  Bucket& bucket(const std::string& address, Clock::time_point now);  // under mu_, refilled to `now`
  void forget_recovered(Clock::time_point now);                        // under mu_

  Options opt_;
  mutable std::mutex mu_;
  std::unordered_map<std::string, Bucket> buckets_;
  std::uint64_t failures_total_ = 0, refused_total_ = 0;
  std::uint64_t failures_in_interval_ = 0, refused_in_interval_ = 0;
  Clock::time_point last_summary_{};
};

// "10.0.0.9:51234" -> "10.0.0.9", "ucx:[::1]:7" -> "ucx:[::1]": the part of a peer name that
// identifies the host.
std::string peer_address(const std::string& peer);

}  // namespace longattn::offload
