// LocalEngine (include/longattn/offload_client.hpp): the server's KV store and CPU decode kernel
// in this process, with the client's calls made synchronous (single host, tests, benchmarks).
#include <map>
#include <vector>

#include "common/check.hpp"
#include "longattn/offload_client.hpp"
#include "offload/kv_store.hpp"
#include "offload/protocol.hpp"

namespace longattn::offload {

struct LocalEngine::Impl {
  KvStore store;
  int threads;  // of the decode kernel; 0 = all
  std::map<std::uint64_t, std::vector<std::int64_t>> layer_lengths;  // tokens stored per layer, by sequence
  std::map<std::uint64_t, SequenceSpec> specs;
  Impl(std::size_t limit, int t) : store(KvStoreOptions{limit, 0, 64}), threads(t) {}
};

LocalEngine::LocalEngine(std::size_t memory_limit, int threads) : impl_(std::make_unique<Impl>(memory_limit, threads)) {}
LocalEngine::~LocalEngine() = default;

void LocalEngine::open(const SequenceSpec& spec) {
  Open m;
  m.seq = spec.id;
  m.layers = static_cast<std::uint32_t>(spec.layers);
  m.kv_heads = static_cast<std::uint32_t>(spec.kv_heads);
  m.head_dim = static_cast<std::uint32_t>(spec.head_dim);
  m.dtype = spec.dtype;
  impl_->store.open(0, m);
  impl_->layer_lengths.try_emplace(spec.id, static_cast<std::size_t>(spec.layers), 0);
  impl_->specs[spec.id] = spec;
}

void LocalEngine::append(std::uint64_t seq, int layer, const void* k, const void* v, std::int64_t tokens) {
  auto it = impl_->specs.find(seq);
  LONGATTN_INVALID(it != impl_->specs.end(), "append: sequence {} is not open", seq);
  LONGATTN_INVALID(layer >= 0 && layer < it->second.layers && tokens > 0 && tokens < (std::int64_t{1} << 31), "append: bad layer or tokens");
  const auto& sp = it->second;
  const std::size_t bytes = static_cast<std::size_t>(tokens) * sp.kv_heads * sp.head_dim * dtype_size(sp.dtype);
  Append m;
  m.seq = seq;
  m.layer = static_cast<std::uint32_t>(layer);
  m.tokens = static_cast<std::uint32_t>(tokens);
  m.start = impl_->layer_lengths[seq][static_cast<std::size_t>(layer)];
  m.kv_heads = static_cast<std::uint32_t>(sp.kv_heads);
  m.head_dim = static_cast<std::uint32_t>(sp.head_dim);
  m.dtype = sp.dtype;
  m.k = std::span(static_cast<const std::byte*>(k), bytes);
  m.v = std::span(static_cast<const std::byte*>(v), bytes);
  impl_->layer_lengths[seq][static_cast<std::size_t>(layer)] = impl_->store.append(0, m);
}

LocalEngine::Timing LocalEngine::attend(int layer, int q_heads, int head_dim, std::span<const DecodeQuery> queries, const float* q,
                                        float* o, float* lse) {
  Attend m;
  m.layer = static_cast<std::uint32_t>(layer);
  m.q_heads = static_cast<std::uint32_t>(q_heads);
  m.head_dim = static_cast<std::uint32_t>(head_dim);
  bool pos = false;
  for (const auto& dq : queries) {
    auto it = impl_->layer_lengths.find(dq.seq);
    LONGATTN_INVALID(it != impl_->layer_lengths.end() && layer >= 0 && static_cast<std::size_t>(layer) < it->second.size(),
                     "attend: sequence {} / layer {} is not open", dq.seq, layer);
    const std::int64_t len = it->second[static_cast<std::size_t>(layer)];
    m.seqs.push_back({dq.seq, static_cast<std::uint32_t>(dq.q_count), len});
    for (int j = 0; j < dq.q_count; ++j) m.positions.push_back(len - dq.q_count + j);
    m.total_q += static_cast<std::uint64_t>(dq.q_count);
    pos |= dq.q_count > 1;
  }
  m.flags = pos ? kAttendHasPositions : 0;
  m.q = std::span(reinterpret_cast<const std::byte*>(q), static_cast<std::size_t>(m.total_q) * q_heads * head_dim * 4);
  const auto st = impl_->store.attend(0, m, o, lse, impl_->threads);
  return {st.kernel_seconds, st.kv_bytes_read};
}

void LocalEngine::drop(std::uint64_t seq) {
  impl_->store.drop(0, seq);
  impl_->layer_lengths.erase(seq);
  impl_->specs.erase(seq);
}

std::int64_t LocalEngine::length(std::uint64_t seq, int layer) const {
  auto it = impl_->layer_lengths.find(seq);
  LONGATTN_INVALID(it != impl_->layer_lengths.end() && layer >= 0 && static_cast<std::size_t>(layer) < it->second.size(), "no sequence {} layer {}",
                   seq, layer);
  return it->second[static_cast<std::size_t>(layer)];
}

}  // namespace longattn::offload
