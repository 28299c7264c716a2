// What the server's TCP listeners share (the protocol port and the HTTP port): binding to
// HOST:PORT, and pacing an accept loop that fails (out of file descriptors) so that it neither
// spins nor floods the log.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include <utility>  // before Boost.Asio: 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>

namespace longattn::offload {

// Opens, binds and listens; throws Error(invalid_argument / io) naming `where`.
void bind_listener(boost::asio::ip::tcp::acceptor& acceptor, boost::asio::io_context& io, const std::string& where);

// Whether an accept failed for want of descriptors or memory: the pending connection stays
// pending, so retrying at once fails again at once.
bool out_of_descriptors(const boost::system::error_code& ec);

// After a failed accept: waits (doubling from 50 ms up to 1 s while failures go on) before the
// next try, and logs at most one line per 10 s with the failures since the last line.
class AcceptPacer {
 public:
  AcceptPacer(boost::asio::io_context& io, std::function<void()> count_failure)
      : timer_(io), count_failure_(std::move(count_failure)) {}
  void failed(const boost::system::error_code& ec, std::function<void()> retry);
  void succeeded() { delay_ = kMinDelay; }
  void cancel() { timer_.cancel(); }

 private:
  static constexpr std::chrono::milliseconds kMinDelay{50}, kMaxDelay{1000};
  static constexpr std::chrono::seconds kLogInterval{10};
  boost::asio::steady_timer timer_;
  std::function<void()> count_failure_;
  std::chrono::steady_clock::duration delay_ = kMinDelay;
  std::chrono::steady_clock::time_point logged_{};
  std::uint64_t unlogged_ = 0;
};

}  // namespace longattn::offload
