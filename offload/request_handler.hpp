// The request logic of the offload server, the same for every transport: authenticates
// connections (token, rate limit per address, --max-connections), serves hello, open, append,
// drop, stats and export from the KV store, hands attends (and the attend half of append_attend, after
// its appends) to the compute queue, bounds what a frame may announce, and releases the KV of
// client ids that vanished (--orphan-timeout).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "offload/auth_throttle.hpp"
#include "offload/client_registry.hpp"
#include "offload/compute_queue.hpp"
#include "offload/kv_store.hpp"
#include "offload/metrics.hpp"
#include "offload/server.hpp"
#include "offload/transport.hpp"

namespace longattn::offload {

class RequestHandler final : public FrameService {
 public:
  // `stats_text` answers the stats request (the server's Prometheus text).
  RequestHandler(const ServerOptions& opt, KvStore& store, ServerCounters& counters, ComputeQueue& compute,
                 std::function<std::string()> stats_text);

  void start_draining() { draining_ = true; }
  // Periodic work: releases the KV of client ids without a connection past --orphan-timeout, and
  // logs the summary of failed authentications.
  void housekeeping(ClientRegistry::Clock::time_point now);
  // Sequences whose client id has no connection now.
  std::size_t orphaned_sequences() const;
  ClientRegistry& clients() noexcept { return clients_; }
  AuthThrottle& auth() noexcept { return auth_; }

  // ---- FrameService ----
  const Limits& limits() const override { return opt_.limits; }
  void check_header(const Session& s, const FrameHeader& h) override;
  void reserve_receive_buffer(std::size_t bytes) override { store_.pool().reserve_buffer(bytes); }
  void release_receive_buffer(std::size_t bytes) noexcept override { store_.pool().release_buffer(bytes); }
  void on_frame(Session& s, const FrameHeader& h, std::vector<std::byte>& payload, Respond respond) override;
  std::vector<std::byte> on_bad_header(Session& s, const Error& e) override;
  std::vector<std::byte> on_discarded_frame(Session& s, const FrameHeader& h, const Error& e) override;
  void on_bytes(std::size_t in, std::size_t out) override {
    counters_.bytes_in += in;
    counters_.bytes_out += out;
  }
  void on_connection_opened() override;
  void on_connection_closed(const Session& s) override;
  void on_timeout() override { counters_.count_error(ErrorCode::timeout); }
  void on_accept_failed() override { counters_.accept_errors++; }
  bool draining() const override { return draining_; }
  double hello_timeout_s() const override { return opt_.hello_timeout_s; }
  double frame_timeout_s() const override { return opt_.frame_timeout_s; }
  int max_unauthenticated() const override { return opt_.max_unauthenticated; }

 private:
  std::vector<std::byte> error_frame(std::uint64_t request_id, const Error& e);
  // Checks the hello's token and takes one of the --max-connections slots; throws when it cannot.
  void authenticate(Session& s, std::span<const std::byte> payload);
  bool take_authenticated_slot();
  // On the compute thread: the reply frame (of `reply_type`, or an error frame) of one attend.
  std::vector<std::byte> run_attend(std::uint64_t client, const std::string& peer, std::uint64_t request_id, const Attend& m,
                                    MsgType reply_type);
  // The append half of an append_attend, in the order of its sequences.
  void append_new_tokens(std::uint64_t client, const AppendAttend& m);
  void release_orphans(ClientRegistry::Clock::time_point now);

  const ServerOptions& opt_;
  KvStore& store_;
  ServerCounters& counters_;
  ComputeQueue& compute_;
  std::function<std::string()> stats_text_;
  AuthThrottle auth_;
  ClientRegistry clients_;
  std::atomic<int> authenticated_open_{0};
  std::atomic<bool> draining_{false};
};

}  // namespace longattn::offload
