// What the server's HTTP port answers: GET /metrics for anyone who can reach it, and the admin
// requests behind the token (Authorization: Bearer TOKEN, failures rate-limited per address like
// the protocol's): GET /admin/sequences lists every sequence with its client's connections,
// POST /admin/drop?client=ID[&seq=ID] drops one sequence or all of a client's.
#pragma once

#include <functional>
#include <string>

#include "offload/http_endpoint.hpp"
#include "offload/request_handler.hpp"

namespace longattn::offload {

class AdminRequests {
 public:
  AdminRequests(const std::string& token, KvStore& store, RequestHandler& requests, std::function<std::string()> metrics_text)
      : token_(token), store_(store), requests_(requests), metrics_text_(std::move(metrics_text)) {}
  HttpResponse answer(const HttpRequest& request);

 private:
  std::string sequences_text();
  HttpResponse drop(const std::string& query);

  const std::string& token_;
  KvStore& store_;
  RequestHandler& requests_;
  std::function<std::string()> metrics_text_;
};

}  // namespace longattn::offload
