// Paged KV storage with memory limits (see kv_store.hpp).
#include "offload/kv_store.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <set>

#include "common/check.hpp"

namespace longattn::offload {

std::string format_bytes(std::size_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return fmt::format("{:.1f} {}", v, units[u]);
}

std::size_t parse_size(const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  LONGATTN_INVALID(!text.empty() && end != text.c_str() && v >= 0 && std::isfinite(v), "'{}' is not a size (e.g. 64G, 512M)", text);
  std::string unit(end);
  double mult = 1;
  if (unit == "" || unit == "B") {
  } else if (unit == "K" || unit == "KiB" || unit == "k") {
    mult = 1024.0;
  } else if (unit == "M" || unit == "MiB") {
    mult = 1024.0 * 1024;
  } else if (unit == "G" || unit == "GiB") {
    mult = 1024.0 * 1024 * 1024;
  } else if (unit == "T" || unit == "TiB") {
    mult = 1024.0 * 1024 * 1024 * 1024;
  } else {
    LONGATTN_INVALID(false, "'{}': unknown size unit '{}' (use K, M, G or T)", text, unit);
  }
  const double bytes = v * mult;
  LONGATTN_INVALID(bytes < 1.8e19, "'{}' is too large", text);
  return static_cast<std::size_t>(bytes);
}

// ---- PagePool ----
PagePool::PagePool(std::size_t memory_limit, std::size_t per_client_limit)
    : limit_(memory_limit), client_limit_(per_client_limit ? per_client_limit : memory_limit) {}

PagePool::~PagePool() {
  for (auto& [bytes, list] : free_)
    for (auto* p : list) ::operator delete(p, std::align_val_t{64});
}

std::byte* PagePool::allocate(std::uint64_t client, std::size_t bytes) {
  std::lock_guard lock(mu_);
  auto& mine = per_client_[client];
  if (mine + bytes > client_limit_)
    throw Error(ErrorCode::out_of_capacity,
                fmt::format("out of capacity: this client holds {} and its limit on this server is {}; drop finished "
                            "sequences or shard over more servers",
                            format_bytes(mine), format_bytes(client_limit_)));
  auto it = free_.find(bytes);
  if (it != free_.end() && !it->second.empty()) {
    std::byte* p = it->second.back();
    it->second.pop_back();
    cached_ -= bytes;
    in_use_ += bytes;
    mine += bytes;
    return p;
  }
  trim_cache_for(bytes);
  if (held() + bytes > limit_)
    throw Error(ErrorCode::out_of_capacity,
                fmt::format("out of capacity: the server's memory limit of {} is reached ({} in use, {} in receive buffers); "
                            "drop finished sequences, raise --memory-limit or shard over more servers",
                            format_bytes(limit_), format_bytes(in_use_), format_bytes(buffers_)));
  auto* p = static_cast<std::byte*>(::operator new(bytes, std::align_val_t{64}));
  in_use_ += bytes;
  mine += bytes;
  return p;
}

void PagePool::trim_cache_for(std::size_t bytes) {
  for (auto f = free_.begin(); held() + bytes > limit_ && f != free_.end(); ++f) {
    while (!f->second.empty() && held() + bytes > limit_) {
      ::operator delete(f->second.back(), std::align_val_t{64});
      f->second.pop_back();
      cached_ -= f->first;
    }
  }
}

void PagePool::reserve_buffer(std::size_t bytes) {
  std::lock_guard lock(mu_);
  trim_cache_for(bytes);
  if (held() + bytes > limit_)
    throw Error(ErrorCode::out_of_capacity,
                fmt::format("out of capacity: a frame of {} does not fit under the server's memory limit of {} now ({} of KV, "
                            "{} in receive buffers); send smaller appends, drop finished sequences or raise --memory-limit",
                            format_bytes(bytes), format_bytes(limit_), format_bytes(in_use_), format_bytes(buffers_)));
  buffers_ += bytes;
}

void PagePool::release_buffer(std::size_t bytes) noexcept {
  std::lock_guard lock(mu_);
  buffers_ -= std::min(bytes, buffers_);
}

std::size_t PagePool::buffers() const noexcept {
  std::lock_guard lock(mu_);
  return buffers_;
}

void PagePool::charge(std::uint64_t client, std::size_t bytes) {
  std::lock_guard lock(mu_);
  auto& mine = per_client_[client];
  if (mine + bytes > client_limit_)
    throw Error(ErrorCode::out_of_capacity,
                fmt::format("out of capacity: this client holds {} and its limit on this server is {}; drop finished "
                            "sequences or shard over more servers",
                            format_bytes(mine), format_bytes(client_limit_)));
  trim_cache_for(bytes);
  if (held() + bytes > limit_)
    throw Error(ErrorCode::out_of_capacity,
                fmt::format("out of capacity: the server's memory limit of {} is reached ({} in use, {} in receive buffers); "
                            "drop finished sequences, raise --memory-limit or shard over more servers",
                            format_bytes(limit_), format_bytes(in_use_), format_bytes(buffers_)));
  in_use_ += bytes;
  mine += bytes;
}

void PagePool::uncharge(std::uint64_t client, std::size_t bytes) noexcept {
  std::lock_guard lock(mu_);
  in_use_ -= std::min(bytes, in_use_);
  auto it = per_client_.find(client);
  if (it != per_client_.end()) {
    it->second -= std::min(bytes, it->second);
    if (it->second == 0) per_client_.erase(it);
  }
}

void PagePool::release(std::uint64_t client, std::byte* page, std::size_t bytes) noexcept {
  std::lock_guard lock(mu_);
  in_use_ -= bytes;
  auto it = per_client_.find(client);
  if (it != per_client_.end()) {
    it->second -= bytes;
    if (it->second == 0) per_client_.erase(it);
  }
  // Keep up to 1/8 of the limit as cached free pages; return the rest to the system.
  if (cached_ + bytes <= limit_ / 8) {
    try {
      free_[bytes].push_back(page);
      cached_ += bytes;
      return;
    } catch (...) {
    }
  }
  ::operator delete(page, std::align_val_t{64});
}

std::size_t PagePool::in_use() const noexcept {
  std::lock_guard lock(mu_);
  return in_use_;
}
std::size_t PagePool::reserved() const noexcept {
  std::lock_guard lock(mu_);
  return in_use_ + cached_;
}

// ---- KvStore ----
KvStore::KvStore(const KvStoreOptions& opt) : opt_(opt), pool_(opt.memory_limit, opt.per_client_limit) {
  LONGATTN_INVALID(opt.page_tokens > 0 && opt.page_tokens % kernels::kDecodeBlockTokens == 0,
                   "page_tokens {} must be a positive multiple of {}", opt.page_tokens, kernels::kDecodeBlockTokens);
  LONGATTN_INVALID(opt.device == "cpu" || opt.device == "cuda", "device must be cpu or cuda, got '{}'", opt.device);
  if (opt.device == "cuda") gpu_ = std::make_unique<GpuAttention>();
}

KvStore::~KvStore() {
  std::lock_guard lock(mu_);
  seqs_.clear();
}

KvStore::Sequence::~Sequence() {
  for (auto& l : layers) {
    for (auto* p : l.pages) pool->release(client, p, page_bytes);
    pool->uncharge(client, l.gpu.bytes());
  }
}

std::shared_ptr<KvStore::Sequence> KvStore::find(std::uint64_t client, std::uint64_t seq) const {
  std::lock_guard lock(mu_);
  auto it = seqs_.find({client, seq});
  return it == seqs_.end() ? nullptr : it->second;
}

void KvStore::open(std::uint64_t client, const Open& m) {
  std::lock_guard lock(mu_);
  auto& slot = seqs_[{client, m.seq}];
  if (slot) {
    const auto& g = slot->geom;
    LONGATTN_INVALID(g.layers == m.layers && g.kv_heads == m.kv_heads && g.head_dim == m.head_dim && g.dtype == m.dtype &&
                         g.kv_start == m.kv_start,
                     "sequence {} is already open with another geometry ({} layers, {} kv heads, head dim {}, {}); drop it first",
                     m.seq, g.layers, g.kv_heads, g.head_dim, to_string(g.dtype));
    return;
  }
  if (gpu_) {
    const std::string why = gpu_->unsupported_reason(m);
    LONGATTN_REQUIRE(why.empty(), ErrorCode::unsupported, "sequence {}: {}", m.seq, why);
  }
  auto s = std::make_shared<Sequence>();
  s->geom = m;
  s->client = client;
  s->pool = &pool_;
  s->page_bytes = 2 * static_cast<std::size_t>(m.kv_heads) * opt_.page_tokens * m.head_dim * dtype_size(m.dtype);
  s->layers.resize(m.layers);
  slot = std::move(s);
}

std::int64_t KvStore::append(std::uint64_t client, const Append& m) {
  auto s = find(client, m.seq);
  LONGATTN_INVALID(s != nullptr, "append: sequence {} is not open on this server", m.seq);
  const auto& g = s->geom;
  LONGATTN_INVALID(m.layer < g.layers, "append: layer {} but sequence {} has {} layers", m.layer, m.seq, g.layers);
  LONGATTN_INVALID(m.kv_heads == g.kv_heads && m.head_dim == g.head_dim && m.dtype == g.dtype,
                   "append: k/v of {} kv heads x {} {} do not match sequence {} ({} x {} {})", m.kv_heads, m.head_dim,
                   to_string(m.dtype), m.seq, g.kv_heads, g.head_dim, to_string(g.dtype));
  std::unique_lock lock(s->mu);
  LONGATTN_INVALID(!s->dropped, "append: sequence {} was dropped", m.seq);
  Layer& L = s->layers[m.layer];
  if (m.start + static_cast<std::int64_t>(m.tokens) <= L.length) return L.length;  // a repeat
  LONGATTN_INVALID(m.start == L.length, "append: tokens start at {} but layer {} of sequence {} holds {} tokens", m.start,
                   m.layer, m.seq, L.length);
  const int P = opt_.page_tokens;
  const std::size_t es = dtype_size(g.dtype), row = static_cast<std::size_t>(g.head_dim) * es;
  const std::int64_t new_len = L.length + m.tokens;
  if (gpu_) {
    // Charged before anything moves, so a capacity error leaves the layer as it was.
    const std::size_t token_row = row * g.kv_heads, before = L.gpu.bytes(), after = L.gpu.bytes_after(m.tokens, token_row);
    if (after > before) pool_.charge(client, after - before);
    try {
      L.gpu.append(gpu_->ops(), m.k.data(), m.v.data(), m.tokens, token_row);
    } catch (...) {
      if (after > before) pool_.uncharge(client, after - before);
      throw;
    }
    L.length = new_len;
    tokens_ += m.tokens;
    return L.length;
  }
  // Reserve every page first, so a capacity error leaves the layer as it was.
  const std::size_t have = L.pages.size(), need = static_cast<std::size_t>((new_len + P - 1) / P);
  try {
    while (L.pages.size() < need) L.pages.push_back(pool_.allocate(client, s->page_bytes));
  } catch (...) {
    while (L.pages.size() > have) {
      pool_.release(client, L.pages.back(), s->page_bytes);
      L.pages.pop_back();
    }
    throw;
  }
  for (std::uint32_t t = 0; t < m.tokens; ++t) {
    const std::int64_t pos = L.length + t;
    std::byte* page = L.pages[static_cast<std::size_t>(pos / P)];
    const std::size_t r = static_cast<std::size_t>(pos % P);
    for (std::uint32_t h = 0; h < g.kv_heads; ++h) {
      const std::size_t src = (static_cast<std::size_t>(t) * g.kv_heads + h) * row;
      std::memcpy(page + ((static_cast<std::size_t>(h) * P + r) * row), m.k.data() + src, row);
      std::memcpy(page + (((static_cast<std::size_t>(g.kv_heads) + h) * P + r) * row), m.v.data() + src, row);
    }
  }
  L.length = new_len;
  tokens_ += m.tokens;
  return L.length;
}

ExportReply KvStore::read(std::uint64_t client, const Export& m, std::size_t max_kv_bytes, std::vector<std::byte>& k,
                          std::vector<std::byte>& v) const {
  auto s = find(client, m.seq);
  LONGATTN_INVALID(s != nullptr, "export: sequence {} is not open on this server", m.seq);
  const auto& g = s->geom;
  LONGATTN_INVALID(m.layer < g.layers, "export: layer {} but sequence {} has {} layers", m.layer, m.seq, g.layers);
  std::shared_lock lock(s->mu);
  LONGATTN_INVALID(!s->dropped, "export: sequence {} was dropped", m.seq);
  const Layer& L = s->layers[m.layer];
  LONGATTN_INVALID(m.start < L.length, "export: layer {} of sequence {} holds {} tokens, none from {}", m.layer, m.seq, L.length, m.start);
  const std::size_t es = dtype_size(g.dtype), row = static_cast<std::size_t>(g.head_dim) * es, token_row = row * g.kv_heads;
  const std::int64_t fit = static_cast<std::int64_t>(max_kv_bytes / (2 * token_row));
  LONGATTN_INVALID(fit >= 1, "export: one token of sequence {} ({} bytes of k and v) exceeds the reply limit of {} bytes; raise --max-frame",
                   m.seq, 2 * token_row, max_kv_bytes);
  const std::int64_t n = std::min({static_cast<std::int64_t>(m.tokens), L.length - m.start, fit});
  k.resize(static_cast<std::size_t>(n) * token_row);
  v.resize(k.size());
  if (gpu_) {
    const std::size_t at = static_cast<std::size_t>(m.start) * token_row;
    gpu_->ops().copy_bytes(k.data(), static_cast<const std::byte*>(L.gpu.k()) + at, k.size(), nullptr);
    gpu_->ops().copy_bytes(v.data(), static_cast<const std::byte*>(L.gpu.v()) + at, v.size(), nullptr);
    gpu_->ops().synchronize(nullptr);
  } else {
    // A page holds k as [kv_heads][page_tokens] rows, then v the same way (see append).
    const int P = opt_.page_tokens;
    for (std::int64_t t = 0; t < n; ++t) {
      const std::int64_t pos = m.start + t;
      const std::byte* page = L.pages[static_cast<std::size_t>(pos / P)];
      const std::size_t r = static_cast<std::size_t>(pos % P);
      for (std::uint32_t h = 0; h < g.kv_heads; ++h) {
        const std::size_t dst = (static_cast<std::size_t>(t) * g.kv_heads + h) * row;
        std::memcpy(k.data() + dst, page + ((static_cast<std::size_t>(h) * P + r) * row), row);
        std::memcpy(v.data() + dst, page + (((static_cast<std::size_t>(g.kv_heads) + h) * P + r) * row), row);
      }
    }
  }
  ExportReply reply;
  reply.length = L.length;
  reply.kv.seq = m.seq;
  reply.kv.layer = m.layer;
  reply.kv.tokens = static_cast<std::uint32_t>(n);
  reply.kv.start = m.start;
  reply.kv.kv_heads = g.kv_heads;
  reply.kv.head_dim = g.head_dim;
  reply.kv.dtype = g.dtype;
  reply.kv.k = k;
  reply.kv.v = v;
  return reply;
}

bool KvStore::drop(std::uint64_t client, std::uint64_t seq) {
  std::shared_ptr<Sequence> s;
  {
    std::lock_guard lock(mu_);
    auto it = seqs_.find({client, seq});
    if (it == seqs_.end()) return false;
    s = std::move(it->second);
    seqs_.erase(it);
  }
  std::unique_lock lock(s->mu);  // wait for attends and appends still using it
  s->dropped = true;
  std::size_t t = 0;
  for (auto& l : s->layers) t += static_cast<std::size_t>(l.length);
  tokens_ -= t;
  return true;
}

std::size_t KvStore::drop_client(std::uint64_t client) {
  std::vector<std::uint64_t> ids;
  {
    std::lock_guard lock(mu_);
    for (auto it = seqs_.lower_bound({client, 0}); it != seqs_.end() && it->first.first == client; ++it) ids.push_back(it->first.second);
  }
  std::size_t dropped = 0;
  for (auto id : ids) dropped += drop(client, id) ? 1 : 0;
  return dropped;
}

std::vector<SequenceInfo> KvStore::list() const {
  std::vector<std::pair<Key, std::shared_ptr<Sequence>>> all;
  {
    std::lock_guard lock(mu_);
    all.assign(seqs_.begin(), seqs_.end());
  }
  std::vector<SequenceInfo> out;
  out.reserve(all.size());
  for (auto& [key, s] : all) {
    std::shared_lock lock(s->mu);
    SequenceInfo info;
    info.client = key.first;
    info.seq = key.second;
    info.layers = s->geom.layers;
    for (const auto& l : s->layers) {
      info.token_layers += static_cast<std::size_t>(l.length);
      info.bytes += l.pages.size() * s->page_bytes;
    }
    out.push_back(info);
  }
  return out;
}

AttendStats KvStore::attend(std::uint64_t client, const Attend& m, float* o, float* lse, int threads) {
  std::vector<std::shared_ptr<Sequence>> seqs;
  seqs.reserve(m.seqs.size());
  for (const auto& a : m.seqs) {
    auto s = find(client, a.seq);
    LONGATTN_INVALID(s != nullptr, "attend: sequence {} is not open on this server", a.seq);
    seqs.push_back(std::move(s));
  }
  const auto& g = seqs.front()->geom;
  LONGATTN_INVALID(m.head_dim == g.head_dim && m.q_heads % g.kv_heads == 0,
                   "attend: queries of {} heads x {} do not fit sequence {} ({} kv heads x {})", m.q_heads, m.head_dim,
                   m.seqs.front().seq, g.kv_heads, g.head_dim);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const auto& gi = seqs[i]->geom;
    LONGATTN_INVALID(gi.kv_heads == g.kv_heads && gi.head_dim == g.head_dim && gi.dtype == g.dtype,
                     "attend: sequences {} and {} differ in kv heads, head dim or dtype; send them in separate requests",
                     m.seqs.front().seq, m.seqs[i].seq);
    LONGATTN_INVALID(m.layer < gi.layers, "attend: layer {} but sequence {} has {} layers", m.layer, m.seqs[i].seq, gi.layers);
  }
  // Shared locks in a fixed (address) order, each sequence once.
  std::set<Sequence*> unique;
  for (auto& s : seqs) unique.insert(s.get());
  std::vector<std::shared_lock<std::shared_mutex>> locks;
  for (auto* s : unique) locks.emplace_back(s->mu);

  std::vector<kernels::DecodeSequence> ds(seqs.size());
  std::int64_t q_begin = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const Layer& L = seqs[i]->layers[m.layer];
    LONGATTN_INVALID(L.length == m.seqs[i].length,
                     "attend: layer {} of sequence {} holds {} tokens, the request expects {} (a lost append?); drop and "
                     "reopen the sequence",
                     m.layer, m.seqs[i].seq, L.length, m.seqs[i].length);
    if (gpu_) continue;
    ds[i].pages = const_cast<const std::byte* const*>(L.pages.data());
    ds[i].length = L.length;
    ds[i].kv_start = seqs[i]->geom.kv_start;
    ds[i].q_begin = q_begin;
    ds[i].q_count = static_cast<int>(m.seqs[i].q_count);
    q_begin += m.seqs[i].q_count;
  }
  kernels::DecodeArgs a;
  a.layout = {static_cast<int>(m.q_heads), static_cast<int>(g.kv_heads), static_cast<int>(g.head_dim), g.dtype, opt_.page_tokens};
  a.seqs = ds.data();
  a.num_seqs = static_cast<int>(ds.size());
  a.total_q = static_cast<std::int64_t>(m.total_q);
  // q arrives as little-endian f32 bytes; copy to aligned floats (this side is x86/ARM, little-endian).
  std::vector<float> q(m.q.size() / 4);
  std::memcpy(q.data(), m.q.data(), m.q.size());
  if (gpu_) return attend_on_gpu(m, seqs, q.data(), o, lse);
  a.q = q.data();
  a.q_positions = (m.flags & kAttendHasPositions) ? m.positions.data() : nullptr;
  a.threads = threads;
  a.o = o;
  a.lse = lse;
  const auto t0 = std::chrono::steady_clock::now();
  kernels::cpu_decode(a);
  AttendStats st;
  st.kernel_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  st.kv_bytes_read = kernels::decode_kv_bytes(a);
  return st;
}

// All sequences of the request (one geometry, checked by attend()) in one GpuAttention::attend: one
// copy in, the kernels queued, one copy out; the shared locks taken by attend() are held throughout.
AttendStats KvStore::attend_on_gpu(const Attend& m, const std::vector<std::shared_ptr<Sequence>>& seqs, const float* q, float* o,
                                   float* lse) {
  const auto t0 = std::chrono::steady_clock::now();
  AttendStats st;
  GpuAttendBatch batch;
  batch.q_heads = static_cast<int>(m.q_heads);
  batch.head_dim = static_cast<int>(m.head_dim);
  batch.total_q = static_cast<std::int64_t>(m.total_q);
  batch.q = q;
  batch.o = o;
  batch.lse = lse;
  std::int64_t q_begin = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const auto& g = seqs[i]->geom;
    const Layer& L = seqs[i]->layers[m.layer];
    GpuAttendPart part;
    part.kv = &L.gpu;
    part.kv_heads = static_cast<int>(g.kv_heads);
    part.dtype = g.dtype;
    part.kv_start = g.kv_start;
    part.q_count = static_cast<int>(m.seqs[i].q_count);
    part.positions = (m.flags & kAttendHasPositions) ? m.positions.data() + q_begin : nullptr;
    batch.parts.push_back(part);
    st.kv_bytes_read += L.gpu.length() > 0 ? 2 * static_cast<std::size_t>(L.gpu.length()) * g.kv_heads * g.head_dim * dtype_size(g.dtype) : 0;
    q_begin += m.seqs[i].q_count;
  }
  gpu_->attend(batch);
  st.kernel_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

KvStore::Stats KvStore::stats() const {
  Stats s;
  {
    std::lock_guard lock(mu_);
    s.sequences = seqs_.size();
  }
  s.tokens = tokens_.load();
  s.bytes_in_use = pool_.in_use();
  s.bytes_reserved = pool_.reserved();
  s.memory_limit = pool_.memory_limit();
  s.receive_buffers = pool_.buffers();
  return s;
}

}  // namespace longattn::offload
