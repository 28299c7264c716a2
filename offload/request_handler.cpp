// The server's request logic (see request_handler.hpp).
#include "offload/request_handler.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <new>

#include <fmt/format.h>

#include "longattn/dtype_convert.hpp"
#include "longattn/log.hpp"

namespace longattn::offload {
namespace {

const Logger& log() { return logger(Subsystem::offload); }

// Non-finite values are refused, not computed: a NaN or infinite key would poison every later
// answer of its sequence, and the sender learns which element of which request was wrong. The
// connection stays usable.
void require_finite(std::span<const std::byte> data, DType dtype, std::uint32_t heads, std::uint32_t head_dim, const char* what) {
  const std::size_t n = data.size() / dtype_size(dtype);
  const std::size_t i = first_non_finite(data.data(), dtype, n);
  if (i == n) return;
  const std::size_t row = static_cast<std::size_t>(heads) * head_dim;
  throw Error(ErrorCode::invalid_argument,
              fmt::format("{} holds a non-finite value (NaN or infinity) at [token {}, head {}, dim {}]; send finite values only",
                          what, i / row, i % row / head_dim, i % head_dim));
}

}  // namespace

RequestHandler::RequestHandler(const ServerOptions& opt, KvStore& store, ServerCounters& counters, ComputeQueue& compute,
                               std::function<std::string()> stats_text)
    : opt_(opt), store_(store), counters_(counters), compute_(compute), stats_text_(std::move(stats_text)) {}

void RequestHandler::on_connection_opened() {
  counters_.connections_total++;
  counters_.connections_open++;
}

void RequestHandler::on_connection_closed(const Session& s) {
  counters_.connections_open--;
  if (!s.authed) return;
  authenticated_open_--;
  clients_.disconnected(s.client);
}

void RequestHandler::check_header(const Session& s, const FrameHeader& h) {
  if (s.authed) return;
  const std::uint32_t most = max_hello_payload(opt_.limits);
  if (h.payload_bytes > most)
    throw Error(ErrorCode::unauthorized, fmt::format("unauthorized: a frame of {} bytes before authentication (at most {} until hello "
                                                     "succeeds); send hello with the server's token first",
                                                     h.payload_bytes, most));
}

std::vector<std::byte> RequestHandler::error_frame(std::uint64_t request_id, const Error& e) {
  counters_.count_error(e.code());
  return frame(MsgType::error, kFlagResponse, request_id, encode(ErrorReply{e.code(), e.what()}));
}

std::vector<std::byte> RequestHandler::on_bad_header(Session& s, const Error& e) {
  if (e.code() == ErrorCode::unauthorized) {
    auth_.failed(peer_address(s.peer));  // reported in the aggregate line, not one line per peer
  } else {
    log().warn("connection {}: {}; closing it", s.peer, e.what());
  }
  return error_frame(0, e);
}

std::vector<std::byte> RequestHandler::on_discarded_frame(Session& s, const FrameHeader& h, const Error& e) {
  log().info("connection {}: {} request {} refused: {}", s.peer, to_string(h.type), h.request_id, e.what());
  return error_frame(h.request_id, e);
}

bool RequestHandler::take_authenticated_slot() {
  int open = authenticated_open_.load();
  while (open < opt_.max_connections)
    if (authenticated_open_.compare_exchange_weak(open, open + 1)) return true;
  return false;
}

void RequestHandler::authenticate(Session& s, std::span<const std::byte> payload) {
  const std::string address = peer_address(s.peer);
  if (!auth_.allow(address))
    throw Error(ErrorCode::unauthorized, fmt::format("unauthorized: too many failed authentications from {}; try again in {:.0f} s",
                                                     address, std::ceil(auth_.wait_s(address))));
  const Hello m = decode_hello(payload, opt_.limits);
  if (!secrets_equal(m.token, opt_.token)) {
    auth_.failed(address);
    throw Error(ErrorCode::unauthorized, "unauthorized: wrong token");
  }
  if (!take_authenticated_slot()) {
    log().warn("refusing connection {}: {} authenticated connections open is the limit (--max-connections)", s.peer, opt_.max_connections);
    throw Error(ErrorCode::out_of_capacity,
                fmt::format("out of capacity: the server has {} connections open, its limit (--max-connections); close idle "
                            "clients, use another server, or raise the limit",
                            opt_.max_connections));
  }
  s.authed = true;
  s.client = m.client_id;
  clients_.connected(m.client_id);
}

void RequestHandler::on_frame(Session& s, const FrameHeader& h, std::vector<std::byte>& payload, Respond respond) {
  counters_.count_request(h.type);
  const Limits& lim = opt_.limits;
  auto reply = [&](std::span<const std::byte> p) { respond(frame(h.type, kFlagResponse, h.request_id, p), false); };
  try {
    if (h.flags & kFlagResponse) throw Error(ErrorCode::protocol, "malformed frame: a reply sent to the server");
    if (h.type == MsgType::error) throw Error(ErrorCode::protocol, "malformed frame: an error frame sent to the server");
    if (!s.authed && h.type != MsgType::hello) throw Error(ErrorCode::unauthorized, "unauthorized: send hello with the server's token first");
    if (draining_) throw Error(ErrorCode::communication, "the server is shutting down; use another server");
    switch (h.type) {
      case MsgType::hello: {
        if (!s.authed) authenticate(s, payload);
        reply(encode(HelloReply{kVersion, static_cast<std::uint32_t>(opt_.page_tokens), lim.max_payload}));
        return;
      }
      case MsgType::open: {
        store_.open(s.client, decode_open(payload, lim));
        reply({});
        return;
      }
      case MsgType::append: {
        const Append m = decode_append(payload, lim);
        require_finite(m.k, m.dtype, m.kv_heads, m.head_dim, "the appended k");
        require_finite(m.v, m.dtype, m.kv_heads, m.head_dim, "the appended v");
        const AppendReply r{store_.append(s.client, m)};
        reply(encode(r));
        return;
      }
      case MsgType::drop: {
        const bool existed = store_.drop(s.client, decode_drop(payload, lim).seq);
        const std::array<std::byte, 1> b{static_cast<std::byte>(existed ? 1 : 0)};
        reply(b);
        return;
      }
      case MsgType::stats: {
        if (!payload.empty()) throw Error(ErrorCode::protocol, "malformed frame: stats request carries a payload");
        const std::string text = stats_text_();
        reply(std::as_bytes(std::span(text.data(), text.size())));
        return;
      }
      case MsgType::attend: {
        auto m = std::make_shared<Attend>(decode_attend(payload, lim));
        require_finite(m->q, DType::f32, m->q_heads, m->head_dim, "the attend's q");
        auto keep = std::make_shared<std::vector<std::byte>>(std::move(payload));  // m's spans point into it
        compute_.submit([this, m, keep, client = s.client, peer = s.peer, id = h.request_id, respond] {
          respond(run_attend(client, peer, id, *m, MsgType::attend), false);
        });
        return;
      }
      case MsgType::append_attend: {
        auto m = std::make_shared<AppendAttend>(decode_append_attend(payload, lim));
        // Everything is checked before anything is stored: a refused request changes nothing.
        require_finite(m->attend.q, DType::f32, m->attend.q_heads, m->attend.head_dim, "the append_attend's q");
        require_finite(m->k, m->dtype, m->kv_heads, m->attend.head_dim, "the append_attend's k");
        require_finite(m->v, m->dtype, m->kv_heads, m->attend.head_dim, "the append_attend's v");
        append_new_tokens(s.client, *m);
        auto keep = std::make_shared<std::vector<std::byte>>(std::move(payload));  // m's spans point into it
        compute_.submit([this, m, keep, client = s.client, peer = s.peer, id = h.request_id, respond] {
          respond(run_attend(client, peer, id, m->attend, MsgType::append_attend), false);
        });
        return;
      }
      case MsgType::export_kv: {
        // One reply at most per connection is in flight (the next frame is read once it is sent),
        // so the reply cap bounds what an export holds.
        const std::size_t room = std::min<std::size_t>(lim.max_payload, kMaxExportReplyBytes);
        const std::size_t kv_room = room > kExportReplyHeadBytes ? room - kExportReplyHeadBytes : 0;
        std::vector<std::byte> k, v;
        const ExportReply r = store_.read(s.client, decode_export(payload, lim), kv_room, k, v);
        reply(encode(r));
        return;
      }
      case MsgType::error: break;
    }
    throw Error(ErrorCode::protocol, "malformed frame: unexpected message type");
  } catch (const Error& e) {
    // Before authentication every error ends the connection.
    const bool fatal = !s.authed || e.code() == ErrorCode::protocol || e.code() == ErrorCode::unauthorized ||
                       (e.code() == ErrorCode::communication && draining_);
    if (e.code() == ErrorCode::unauthorized) {
      // Wrong tokens are counted per address and reported in one line per interval.
      if (h.type != MsgType::hello) auth_.failed(peer_address(s.peer));
    } else if (fatal) {
      log().warn("connection {}: {}; closing it", s.peer, e.what());
    } else {
      log().info("connection {}: {} request {} refused: {}", s.peer, to_string(h.type), h.request_id, e.what());
    }
    respond(error_frame(h.request_id, e), fatal);
  } catch (const std::bad_alloc&) {
    respond(error_frame(h.request_id, Error(ErrorCode::out_of_capacity, "out of capacity: the server could not allocate memory")), false);
  } catch (const std::exception& e) {
    respond(error_frame(h.request_id, Error(ErrorCode::internal, std::string("internal error: ") + e.what())), false);
  }
}

void RequestHandler::append_new_tokens(std::uint64_t client, const AppendAttend& m) {
  const std::size_t row = static_cast<std::size_t>(m.kv_heads) * m.attend.head_dim * dtype_size(m.dtype);
  std::size_t offset = 0;
  for (std::size_t i = 0; i < m.attend.seqs.size(); ++i) {
    const std::uint32_t added = m.new_tokens[i];
    if (added == 0) continue;
    Append a;
    a.seq = m.attend.seqs[i].seq;
    a.layer = m.attend.layer;
    a.tokens = added;
    a.start = m.attend.seqs[i].length - added;
    a.kv_heads = m.kv_heads;
    a.head_dim = m.attend.head_dim;
    a.dtype = m.dtype;
    a.k = m.k.subspan(offset, added * row);
    a.v = m.v.subspan(offset, added * row);
    offset += added * row;
    store_.append(client, a);
  }
}

std::vector<std::byte> RequestHandler::run_attend(std::uint64_t client, const std::string& peer, std::uint64_t request_id,
                                                  const Attend& m, MsgType reply_type) {
  try {
    const std::size_t rows = static_cast<std::size_t>(m.total_q) * m.q_heads;
    std::vector<float> o(rows * m.head_dim), lse(rows);
    const auto st = store_.attend(client, m, o.data(), lse.data(), opt_.compute_threads);
    counters_.kernel_ns += static_cast<std::uint64_t>(st.kernel_seconds * 1e9);
    counters_.kv_bytes_read += st.kv_bytes_read;
    counters_.attend_queries += m.total_q;
    return frame(reply_type, kFlagResponse, request_id, encode_attend_reply(m.total_q, m.q_heads, m.head_dim, o.data(), lse.data()));
  } catch (const Error& e) {
    log().info("connection {}: {} request {} refused: {}", peer, to_string(reply_type), request_id, e.what());
    return error_frame(request_id, e);
  } catch (const std::bad_alloc&) {
    return error_frame(request_id, Error(ErrorCode::out_of_capacity, "out of capacity: the server could not allocate the attend buffers"));
  } catch (const std::exception& e) {
    return error_frame(request_id, Error(ErrorCode::internal, std::string("internal error: ") + e.what()));
  }
}

std::size_t RequestHandler::orphaned_sequences() const {
  const auto all = store_.list();
  const auto connected = clients_.connection_counts();
  std::size_t n = 0;
  for (const auto& info : all) n += connected.count(info.client) ? 0 : 1;
  return n;
}

void RequestHandler::release_orphans(ClientRegistry::Clock::time_point now) {
  if (opt_.orphan_timeout_s <= 0) {
    clients_.forget_orphans();  // kept until dropped: nothing to time
    return;
  }
  const auto timeout = std::chrono::duration_cast<ClientRegistry::Clock::duration>(std::chrono::duration<double>(opt_.orphan_timeout_s));
  for (auto client : clients_.take_orphaned_for(timeout, now)) {
    const std::size_t n = store_.drop_client(client);
    if (n == 0) continue;
    counters_.orphans_released += n;
    log().info("released {} sequence{} of client {}: no connection for {} s (--orphan-timeout)", n, n == 1 ? "" : "s", client,
               opt_.orphan_timeout_s);
  }
}

void RequestHandler::housekeeping(ClientRegistry::Clock::time_point now) {
  release_orphans(now);
  const std::string summary = auth_.take_summary(now);
  if (!summary.empty()) log().warn("{}", summary);
}

}  // namespace longattn::offload
