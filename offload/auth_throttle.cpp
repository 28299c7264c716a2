// Per-address rate limit of failed authentications (see auth_throttle.hpp): a token bucket per
// address that only failures drain.
#include "offload/auth_throttle.hpp"

#include <algorithm>

#include <fmt/format.h>

namespace longattn::offload {

std::string peer_address(const std::string& peer) {
  const auto colon = peer.rfind(':');
  return colon == std::string::npos ? peer : peer.substr(0, colon);
}

AuthThrottle::Bucket& AuthThrottle::bucket(const std::string& address, Clock::time_point now) {
  auto it = buckets_.find(address);
  if (it == buckets_.end()) {
    if (buckets_.size() >= opt_.max_addresses) forget_recovered(now);
    if (buckets_.size() >= opt_.max_addresses) buckets_.clear();  // a flood of addresses: start over rather than grow
    it = buckets_.emplace(address, Bucket{opt_.burst, now, 0}).first;
  }
  Bucket& b = it->second;
  const double elapsed = std::chrono::duration<double>(now - b.updated).count();
  if (elapsed > 0) {
    b.credit = std::min(opt_.burst, b.credit + elapsed * opt_.failures_per_s);
    b.updated = now;
  }
  return b;
}

void AuthThrottle::forget_recovered(Clock::time_point now) {
  for (auto it = buckets_.begin(); it != buckets_.end();) {
    const double elapsed = std::chrono::duration<double>(now - it->second.updated).count();
    if (it->second.credit + elapsed * opt_.failures_per_s >= opt_.burst && it->second.events_in_interval == 0) {
      it = buckets_.erase(it);
    } else {
      ++it;
    }
  }
}

bool AuthThrottle::allow(const std::string& address, Clock::time_point now) {
  std::lock_guard lock(mu_);
  Bucket& b = bucket(address, now);
  if (b.credit >= 1) return true;
  b.events_in_interval++;
  refused_total_++;
  refused_in_interval_++;
  return false;
}

void AuthThrottle::failed(const std::string& address, Clock::time_point now) {
  std::lock_guard lock(mu_);
  Bucket& b = bucket(address, now);
  b.credit = std::max(0.0, b.credit - 1);
  b.events_in_interval++;
  failures_total_++;
  failures_in_interval_++;
}

double AuthThrottle::wait_s(const std::string& address, Clock::time_point now) {
  std::lock_guard lock(mu_);
  const Bucket& b = bucket(address, now);
  return b.credit >= 1 ? 0.0 : (1 - b.credit) / opt_.failures_per_s;
}

std::string AuthThrottle::take_summary(Clock::time_point now) {
  std::lock_guard lock(mu_);
  if (failures_in_interval_ + refused_in_interval_ == 0) return "";
  if (std::chrono::duration<double>(now - last_summary_).count() < opt_.log_interval_s) return "";
  std::size_t addresses = 0;
  std::string top;
  std::uint64_t top_events = 0;
  for (auto& [address, b] : buckets_) {
    if (b.events_in_interval == 0) continue;
    addresses++;
    if (b.events_in_interval > top_events) {
      top_events = b.events_in_interval;
      top = address;
    }
    b.events_in_interval = 0;
  }
  std::string line = fmt::format(
      "failed authentications: {} wrong tokens and {} attempts refused unchecked (over the rate limit) from {} address{}; "
      "most from {} ({})",
      failures_in_interval_, refused_in_interval_, addresses, addresses == 1 ? "" : "es", top, top_events);
  failures_in_interval_ = refused_in_interval_ = 0;
  last_summary_ = now;
  return line;
}

std::uint64_t AuthThrottle::failures_total() const {
  std::lock_guard lock(mu_);
  return failures_total_;
}

std::uint64_t AuthThrottle::refused_total() const {
  std::lock_guard lock(mu_);
  return refused_total_;
}

}  // namespace longattn::offload
