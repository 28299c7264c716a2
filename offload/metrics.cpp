// The server's metrics as text (see metrics.hpp): one table of rows, one loop that prints them.
#include "offload/metrics.hpp"

#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace longattn::offload {
namespace {

constexpr std::array<const char*, kRequestTypeSlots> kRequestTypeNames = {"", "hello", "open", "append", "attend", "drop", "stats", "append_attend", "export"};
constexpr std::array<const char*, kErrorKindSlots> kErrorKindNames = {"none",    "invalid_argument", "unsupported", "io",
                                                                      "communication", "timeout",   "out_of_capacity",
                                                                      "protocol", "unauthorized",   "internal"};
static_assert(std::string_view(kRequestTypeNames[static_cast<std::size_t>(MsgType::stats)]) == "stats" &&
                  std::string_view(kRequestTypeNames[static_cast<std::size_t>(MsgType::append_attend)]) == "append_attend",
              "kRequestTypeNames follows MsgType");
static_assert(std::string_view(kErrorKindNames[wire_code(ErrorCode::out_of_capacity)]) == "out_of_capacity" &&
                  std::string_view(kErrorKindNames[wire_code(ErrorCode::internal)]) == "internal",
              "kErrorKindNames follows the wire codes");

// One metric family: its name, kind, help text and samples (label set, value).
struct Row {
  std::string_view name, type, help;
  std::vector<std::pair<std::string, std::string>> samples;
};

Row plain(std::string_view name, std::string_view type, std::string_view help, std::string value) {
  return Row{name, type, help, {{"", std::move(value)}}};
}

std::string count(std::uint64_t v) { return std::to_string(v); }

}  // namespace

std::uint64_t ServerCounters::requests_total() const noexcept {
  std::uint64_t n = 0;
  for (std::size_t t = 1; t < requests.size(); ++t) n += requests[t].load();
  return n;
}

std::uint64_t ServerCounters::errors_total() const noexcept {
  std::uint64_t n = 0;
  for (std::size_t e = 1; e < errors.size(); ++e) n += errors[e].load();
  return n;
}

double ServerCounters::kernel_gbps() const noexcept {
  const double s = kernel_seconds();
  return s > 0 ? static_cast<double>(kv_bytes_read.load()) / s * 1e-9 : 0.0;
}

std::string prometheus_text(const ServerCounters& c, const ServerGauges& g) {
  Row requests{"longattn_offload_requests_total", "counter", "Requests received, by type.", {}};
  for (std::size_t t = 1; t < c.requests.size(); ++t)
    requests.samples.emplace_back(fmt::format("{{type=\"{}\"}}", kRequestTypeNames[t]), count(c.requests[t].load()));
  Row errors{"longattn_offload_errors_total", "counter", "Error replies and dropped connections, by kind.", {}};
  for (std::size_t e = 1; e < c.errors.size(); ++e)
    errors.samples.emplace_back(fmt::format("{{kind=\"{}\"}}", kErrorKindNames[e]), count(c.errors[e].load()));

  const std::vector<Row> rows = {
      std::move(requests),
      std::move(errors),
      plain("longattn_offload_bytes_received_total", "counter", "", count(c.bytes_in.load())),
      plain("longattn_offload_bytes_sent_total", "counter", "", count(c.bytes_out.load())),
      plain("longattn_offload_connections_open", "gauge", "", count(c.connections_open.load())),
      plain("longattn_offload_connections_total", "counter", "", count(c.connections_total.load())),
      plain("longattn_offload_kv_sequences", "gauge", "Sequences held.", count(g.store.sequences)),
      plain("longattn_offload_kv_token_layers", "gauge", "KV tokens held, summed over layers.", count(g.store.tokens)),
      plain("longattn_offload_kv_bytes", "gauge", "KV page bytes held by sequences.", count(g.store.bytes_in_use)),
      plain("longattn_offload_kv_bytes_reserved", "gauge", "", count(g.store.bytes_reserved)),
      plain("longattn_offload_memory_limit_bytes", "gauge", "", count(g.store.memory_limit)),
      plain("longattn_offload_kernel_seconds_total", "counter", "", fmt::format("{:.6f}", c.kernel_seconds())),
      plain("longattn_offload_kernel_kv_bytes_read_total", "counter", "", count(c.kv_bytes_read.load())),
      plain("longattn_offload_kernel_gbps", "gauge", "KV bytes read per second of decode kernel time, since start.",
            fmt::format("{:.3f}", c.kernel_gbps())),
      plain("longattn_offload_attend_queries_total", "counter", "", count(c.attend_queries.load())),
      plain("longattn_offload_kv_sequences_orphaned", "gauge", "Sequences whose client id has no connection now.",
            count(g.orphaned_sequences)),
      plain("longattn_offload_orphaned_sequences_released_total", "counter",
            "Sequences dropped after --orphan-timeout without a connection.", count(c.orphans_released.load())),
      plain("longattn_offload_receive_buffer_bytes", "gauge", "Bytes of frames being received (counted against the memory limit).",
            count(g.store.receive_buffers)),
      plain("longattn_offload_auth_failures_total", "counter", "Wrong tokens (and requests before hello).", count(g.auth_failures)),
      plain("longattn_offload_auth_rate_limited_total", "counter",
            "Authentications refused unchecked: too many failures from that address.", count(g.auth_rate_limited)),
      plain("longattn_offload_accept_errors_total", "counter", "Failed accepts (e.g. out of file descriptors).",
            count(c.accept_errors.load())),
      plain("longattn_offload_tls_handshake_failures_total", "counter",
            "Refused TLS handshakes (untrusted, expired or missing client certificates, clients without TLS).",
            count(c.tls_handshake_failures.load())),
  };
  std::string out;
  for (const auto& r : rows) {
    if (!r.help.empty()) out += fmt::format("# HELP {} {}\n", r.name, r.help);
    out += fmt::format("# TYPE {} {}\n", r.name, r.type);
    for (const auto& [labels, value] : r.samples) out += fmt::format("{}{} {}\n", r.name, labels, value);
  }
  return out;
}

std::string result_json(const ServerCounters& c, double uptime_s) {
  return fmt::format(
      "{{\"program\":\"longattn-offload-server\",\"uptime_s\":{:.3f},\"requests\":{},\"attend_requests\":{},\"errors\":{},"
      "\"bytes_in\":{},\"bytes_out\":{},\"connections\":{},\"kernel_s\":{:.6f},\"kernel_gbps\":{:.3f}}}",
      uptime_s, c.requests_total(), c.requests[static_cast<std::size_t>(MsgType::attend)].load(), c.errors_total(), c.bytes_in.load(),
      c.bytes_out.load(), c.connections_total.load(), c.kernel_seconds(), c.kernel_gbps());
}

}  // namespace longattn::offload
