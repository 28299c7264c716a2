// Refill of the offload client's replicas (replicas > 1): a server that failed and answers again
// gets its copies back. The rest of Client::Impl (client_impl.hpp) is in client.cpp.
// The client keeps no KV of its own: every piece the server should hold is read from a complete
// copy with export requests and appended to it, one chunk at a time (so at most one chunk is in
// the client). The lengths to copy are those the client had sent when the refill began; writes
// from then on are kept, in order, as the frames already built (the backlog: in decode, a few
// tokens per step) and sent after the copied ones, in the same step that makes the server
// complete again, so it never misses a write and never sees one out of order. Reads stay on the
// complete copies until then.
#include "offload/client_impl.hpp"

#include <algorithm>
#include <chrono>
#include <optional>

#include <fmt/format.h>

#include "longattn/log.hpp"

namespace longattn::offload {

namespace {

// How often a failed server is asked whether it is back (doubled after each refill that failed,
// up to the longest interval, so that a server which keeps refusing the copy, say for lack of
// memory, is not copied to again and again); how much KV one export reads (the most the client
// holds of it at once); and how many bytes of writes may wait for a server being refilled before
// its refill starts over.
constexpr std::chrono::milliseconds kRefillProbeInterval{250};
constexpr std::chrono::milliseconds kRefillProbeLongestInterval{30000};
constexpr std::size_t kRefillChunkBytes = std::size_t{16} << 20;
constexpr std::size_t kRefillBacklogLimit = std::size_t{64} << 20;

}  // namespace

// A write for a copy being refilled; caller holds seqs_mutex. Past kRefillBacklogLimit (a bulk
// prefill during the refill) the refill starts over rather than hold more.
void Client::Impl::backlog_write(int server, MsgType t, std::vector<std::byte> frame, bool idempotent) {
  const auto i = static_cast<std::size_t>(server);
  if (backlog_bytes[i] + frame.size() > kRefillBacklogLimit) {
    replicas->mark_incomplete(server);
    drop_backlog(server);
    const Error why(ErrorCode::out_of_capacity, fmt::format("more than {} MiB of writes arrived while it was refilled; starting over",
                                                            kRefillBacklogLimit >> 20));
    asio::post(io, [this, server, why] { refill_failed(server, why); });
    return;
  }
  backlog_bytes[i] += frame.size();
  backlog[i].push_back({t, std::move(frame), idempotent});
}

void Client::Impl::drop_backlog(int server) {
  backlog[static_cast<std::size_t>(server)].clear();
  backlog_bytes[static_cast<std::size_t>(server)] = 0;
}

// Sends a frame built earlier under request id 0 (the id sits at bytes 12..19 of the header).
void Client::Impl::send_built(int server, BackloggedWrite w, Done done) {
  send_frame(server, w.type, [&w](std::uint64_t id) {
    for (int i = 0; i < 8; ++i) w.frame[12 + static_cast<std::size_t>(i)] = static_cast<std::byte>((id >> (8 * i)) & 0xff);
    return std::move(w.frame);
  }, w.idempotent, std::move(done));
}

// I/O thread: asks a failed server for its stats every kRefillProbeInterval; the first answer
// starts its refill.
void Client::Impl::schedule_probe(int server) {
  if (stopping) return;
  auto& timer = *probes[static_cast<std::size_t>(server)];
  const int doublings = std::min(refill_failures[static_cast<std::size_t>(server)], 7);
  timer.expires_after(std::min<std::chrono::milliseconds>(kRefillProbeInterval * (1 << doublings), kRefillProbeLongestInterval));
  timer.async_wait([this, server](boost::system::error_code ec) {
    if (ec || stopping || replicas->state(server) != CopyState::incomplete) return;
    send(server, MsgType::stats, {}, true, [this, server](const Error* e, std::vector<std::byte>&) {
      if (stopping || replicas->state(server) != CopyState::incomplete) return;
      if (e) {
        schedule_probe(server);
      } else {
        start_refill(server, nullptr);
      }
    });
  });
}

// I/O thread. `waiter` (may be null) is told when the server is complete again, or why not.
void Client::Impl::start_refill(int server, std::shared_ptr<std::promise<void>> waiter) {
  if (stopping) {
    if (waiter) waiter->set_exception(std::make_exception_ptr(Error(ErrorCode::communication, "the offload client was destroyed")));
    return;
  }
  auto& running = refills[static_cast<std::size_t>(server)];
  if (running) {
    if (waiter) running->waiters.push_back(std::move(waiter));
    return;
  }
  auto run = std::make_shared<RefillRun>();
  run->server = server;
  if (waiter) run->waiters.push_back(std::move(waiter));
  {
    std::lock_guard lock(seqs_mutex);
    if (!replicas->begin_refill(server)) {  // complete already
      for (auto& w : run->waiters) w->set_value();
      return;
    }
    drop_backlog(server);
    for (const auto& [id, st] : seqs) {
      if (st.broken) continue;
      for (const std::uint64_t k : st.opened_shards) {
        const int primary = server_of(st, k);
        if (!replicas->holds(server, primary)) continue;
        RefillPiece p;
        p.seq = id;
        p.shard = k;
        p.primary = primary;
        p.open = open_message(st, k);
        for (const auto length : st.layer_lengths) p.target.push_back(layout.tokens_in(length, k));
        run->pieces.push_back(std::move(p));
      }
    }
  }
  running = run;
  logger(Subsystem::offload).info("refilling server {}: {} piece(s) of KV copied from the replicas, which serve its reads until it is "
                                  "done", replicas->name(server), run->pieces.size());
  refill_step(run);
}

// I/O thread: the next request of a refill, or its end.
void Client::Impl::refill_step(const std::shared_ptr<RefillRun>& run) {
  const int server = run->server;
  while (!run->ended) {
    if (stopping) return;
    if (replicas->state(server) != CopyState::refilling) {
      refill_failed(server, Error(ErrorCode::communication, "it failed again while being refilled"));
      return;
    }
    if (run->next == run->pieces.size()) {
      refill_done(run);
      return;
    }
    RefillPiece& p = run->pieces[run->next];
    if (!p.opened) {
      // Whatever it still holds of the piece (a server that hung rather than restarted) goes first.
      p.opened = true;
      const auto drop_payload = encode(Drop{p.open.seq});
      send(server, MsgType::drop, drop_payload, true, [](const Error*, std::vector<std::byte>&) {});  // an error shows in the open
      send(server, MsgType::open, encode(p.open), true, [this, run](const Error* e, std::vector<std::byte>&) {
        if (run->ended) return;
        if (e) {
          refill_failed(run->server, *e);
          return;
        }
        refill_step(run);
      });
      return;
    }
    while (p.layer < p.target.size() && p.done >= p.target[p.layer]) {
      ++p.layer;
      p.done = 0;
    }
    if (p.layer == p.target.size()) {
      ++run->next;
      continue;
    }
    const int source = replicas->reader(p.primary);
    if (source < 0) {
      // No complete copy is left to read: the sequence is lost (its calls say so), not refilled.
      logger(Subsystem::offload).warn("refill of server {}: sequence {} has no complete copy left; it is not refilled",
                                      replicas->name(server), p.seq);
      mark_broken(p.seq);
      ++run->next;
      continue;
    }
    const std::uint32_t peer = conns[static_cast<std::size_t>(source)]->peer_version;
    if (peer != 0 && peer < version_of(MsgType::export_kv)) {
      refill_failed(server, Error(ErrorCode::unsupported,
                                  fmt::format("server {} speaks protocol version {}; a refill reads KV with export, which needs version {}: "
                                              "upgrade it",
                                              replicas->name(source), peer, version_of(MsgType::export_kv))));
      return;
    }
    const std::size_t row = static_cast<std::size_t>(p.open.kv_heads) * p.open.head_dim * dtype_size(p.open.dtype);
    Export req;
    req.seq = p.open.seq;
    req.layer = static_cast<std::uint32_t>(p.layer);
    req.start = p.done;
    req.tokens = static_cast<std::uint32_t>(
        std::min<std::int64_t>(p.target[p.layer] - p.done, std::max<std::size_t>(1, kRefillChunkBytes / (2 * row))));
    send(source, MsgType::export_kv, encode(req), true, [this, run, source, req](const Error* e, std::vector<std::byte>& payload) {
      if (run->ended || stopping) return;
      refill_copy(run, source, req, e, payload);
    });
    return;
  }
}

// I/O thread: one export reply from `source`, appended to the refilled server.
void Client::Impl::refill_copy(const std::shared_ptr<RefillRun>& run, int source, const Export& req, const Error* e, std::vector<std::byte>& payload) {
  RefillPiece& p = run->pieces[run->next];
  std::optional<ExportReply> reply;
  std::optional<Error> failure;
  if (e) {
    failure = *e;
  } else {
    try {
      reply = decode_export_reply(payload, client_limits());
      if (reply->kv.seq != req.seq || reply->kv.layer != req.layer || reply->kv.start != req.start || reply->kv.tokens > req.tokens)
        throw Error(ErrorCode::protocol, "its export reply does not match the request");
    } catch (const Error& bad) {
      failure = Error(bad.code(), fmt::format("server {}: {}", replicas->name(source), bad.what()));
    }
  }
  if (failure) {
    bool gone = false;
    {
      std::lock_guard lock(seqs_mutex);
      gone = seqs.find(p.seq) == seqs.end();
    }
    if (gone) {
      ++run->next;  // dropped meanwhile: the backlog holds the drop
    } else {
      copy_failed(source, *failure);  // the next complete copy is read instead
    }
    refill_step(run);
    return;
  }
  p.done += reply->kv.tokens;
  run->tokens_copied += reply->kv.tokens;
  send_frame(run->server, MsgType::append, [&reply](std::uint64_t id) { return append_frame(id, reply->kv); }, false,
             [this, run](const Error* err, std::vector<std::byte>&) {
               if (run->ended) return;
               if (err) {
                 refill_failed(run->server, *err);
                 return;
               }
               refill_step(run);
             });
}

// I/O thread: every piece copied; the backlog goes out and the server is complete, both under
// seqs_mutex so that no write falls between them.
void Client::Impl::refill_done(const std::shared_ptr<RefillRun>& run) {
  const int server = run->server;
  std::size_t held = 0;
  {
    std::lock_guard lock(seqs_mutex);
    if (replicas->state(server) != CopyState::refilling) {
      drop_backlog(server);
    } else {
      auto writes = std::move(backlog[static_cast<std::size_t>(server)]);
      held = writes.size();
      drop_backlog(server);
      for (auto& w : writes)
        send_built(server, std::move(w), [this, server](const Error* e, std::vector<std::byte>&) {
          if (e) copy_failed(server, *e);
        });
      replicas->finish_refill(server);
    }
  }
  if (!replicas->complete(server)) {
    refill_failed(server, Error(ErrorCode::communication, "it failed again while being refilled"));
    return;
  }
  run->ended = true;
  refills[static_cast<std::size_t>(server)] = nullptr;
  refill_failures[static_cast<std::size_t>(server)] = 0;
  n_refills++;
  logger(Subsystem::offload).info("server {} refilled ({} piece(s), {} token-layers copied, then {} write(s) that came meanwhile); it "
                                  "serves reads again", replicas->name(server), run->pieces.size(), run->tokens_copied, held);
  for (auto& w : run->waiters) w->set_value();
}

// I/O thread: the refill of `server` stopped; it stays out of service and is probed again.
void Client::Impl::refill_failed(int server, const Error& why) {
  auto run = std::move(refills[static_cast<std::size_t>(server)]);
  if (!run || run->ended) return;
  run->ended = true;
  ++refill_failures[static_cast<std::size_t>(server)];
  {
    std::lock_guard lock(seqs_mutex);
    replicas->mark_incomplete(server);
    drop_backlog(server);
  }
  const Error told(why.code(), fmt::format("refill of server {} failed: {}", replicas->name(server), why.what()));
  if (!stopping) {
    logger(Subsystem::offload).warn("{}; it stays out of service and is tried again", told.what());
    schedule_probe(server);
  }
  for (auto& w : run->waiters) w->set_exception(std::make_exception_ptr(told));
}

// I/O thread, at shutdown.
void Client::Impl::stop_refills() {
  stopping = true;
  for (auto& t : probes) t->cancel();
  for (std::size_t s = 0; s < refills.size(); ++s) {
    auto run = std::move(refills[s]);
    if (!run || run->ended) continue;
    run->ended = true;
    for (auto& w : run->waiters)
      w->set_exception(std::make_exception_ptr(Error(ErrorCode::communication, "the offload client was destroyed during a refill")));
  }
}

}  // namespace longattn::offload
