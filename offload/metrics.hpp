// What the server counts (requests by type, errors by kind, bytes, connections, kernel time) and
// how it is shown: the Prometheus text of /metrics and the stats request, and the RESULT line.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "offload/kv_store.hpp"
#include "offload/protocol.hpp"

namespace longattn::offload {

// Request counters are indexed by MsgType's value (0 is no type); error counters by wire code
// (0 is none): both arrays are sized from the enums they count.
inline constexpr std::size_t kRequestTypeSlots = static_cast<std::size_t>(MsgType::export_kv) + 1;
inline constexpr std::size_t kErrorKindSlots = kMaxWireCode + 1;
static_assert(wire_code(ErrorCode::internal) < kErrorKindSlots, "every error code needs a counter");
static_assert(static_cast<std::size_t>(MsgType::hello) == 1, "request types count from 1");

struct ServerCounters {
  std::array<std::atomic<std::uint64_t>, kRequestTypeSlots> requests{};
  std::array<std::atomic<std::uint64_t>, kErrorKindSlots> errors{};
  std::atomic<std::uint64_t> bytes_in{0}, bytes_out{0}, connections_total{0}, connections_open{0};
  std::atomic<std::uint64_t> kernel_ns{0}, kv_bytes_read{0}, attend_queries{0};
  std::atomic<std::uint64_t> accept_errors{0}, orphans_released{0}, tls_handshake_failures{0};

  void count_request(MsgType t) noexcept {
    const auto i = static_cast<std::size_t>(t);
    if (i < requests.size()) requests[i]++;
  }
  void count_error(ErrorCode code) noexcept { errors[wire_code(code)]++; }
  std::uint64_t requests_total() const noexcept;
  std::uint64_t errors_total() const noexcept;
  double kernel_seconds() const noexcept { return static_cast<double>(kernel_ns.load()) * 1e-9; }
  double kernel_gbps() const noexcept;
};

// What is read when the text is made rather than counted as it happens.
struct ServerGauges {
  KvStore::Stats store;
  std::size_t orphaned_sequences = 0;
  std::uint64_t auth_failures = 0, auth_rate_limited = 0;
};

std::string prometheus_text(const ServerCounters& c, const ServerGauges& g);
std::string result_json(const ServerCounters& c, double uptime_s);

}  // namespace longattn::offload
