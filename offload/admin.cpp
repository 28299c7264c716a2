// The metrics and admin answers of the HTTP port (see admin.hpp).
#include "offload/admin.hpp"

#include <cmath>
#include <cstdlib>
#include <optional>

#include <fmt/format.h>

#include "longattn/log.hpp"

namespace longattn::offload {

HttpResponse AdminRequests::answer(const HttpRequest& request) {
  const auto q = request.target.find('?');
  const std::string path = request.target.substr(0, q);
  const std::string query = q == std::string::npos ? "" : request.target.substr(q + 1);
  if (request.method == "GET" && path == "/metrics") return {"200 OK", metrics_text_()};
  if (path.rfind("/admin/", 0) != 0) return {"404 Not Found", "served here: GET /metrics, GET /admin/sequences, POST /admin/drop\n"};
  AuthThrottle& auth = requests_.auth();
  const std::string address = peer_address(request.peer);
  if (!auth.allow(address))
    return {"429 Too Many Requests",
            fmt::format("too many failed authentications from {}; try again in {:.0f} s\n", address, std::ceil(auth.wait_s(address)))};
  if (!secrets_equal(request.bearer, token_)) {
    auth.failed(address);
    return {"401 Unauthorized", "send the server's token as the header 'Authorization: Bearer TOKEN'\n"};
  }
  if (request.method == "GET" && path == "/admin/sequences") return {"200 OK", sequences_text()};
  if (request.method == "POST" && path == "/admin/drop") return drop(query);
  return {"404 Not Found", "admin requests: GET /admin/sequences, POST /admin/drop?client=ID[&seq=ID]\n"};
}

std::string AdminRequests::sequences_text() {
  const auto all = store_.list();
  const auto connected = requests_.clients().connection_counts();
  std::string out = "# client seq layers token_layers bytes client_connections\n";
  for (const auto& i : all) {
    const auto it = connected.find(i.client);
    out += fmt::format("{} {} {} {} {} {}\n", i.client, i.seq, i.layers, i.token_layers, i.bytes, it == connected.end() ? 0 : it->second);
  }
  return out;
}

HttpResponse AdminRequests::drop(const std::string& query) {
  std::optional<std::uint64_t> client, seq;
  std::size_t at = 0;
  while (at <= query.size()) {
    const auto amp = std::min(query.find('&', at), query.size());
    const std::string pair = query.substr(at, amp - at);
    const auto eq = pair.find('=');
    const std::string key = pair.substr(0, eq), value = eq == std::string::npos ? "" : pair.substr(eq + 1);
    char* end = nullptr;
    const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
    const bool number = !value.empty() && end && *end == '\0' && value[0] != '-';
    if (key == "client" || key == "seq") {
      if (!number) return {"400 Bad Request", fmt::format("{}='{}' is not a number\n", key, value)};
      (key == "client" ? client : seq) = static_cast<std::uint64_t>(v);
    } else if (!pair.empty()) {
      return {"400 Bad Request", fmt::format("unknown parameter '{}'; use client=ID and optionally seq=ID\n", key)};
    }
    at = amp + 1;
  }
  if (!client) return {"400 Bad Request", "POST /admin/drop needs client=ID (and seq=ID for one sequence)\n"};
  const std::size_t n = seq ? (store_.drop(*client, *seq) ? 1 : 0) : store_.drop_client(*client);
  logger(Subsystem::offload).info("admin: dropped {} sequence{} of client {}", n, n == 1 ? "" : "s", *client);
  return {"200 OK", fmt::format("dropped {}\n", n)};
}

}  // namespace longattn::offload
