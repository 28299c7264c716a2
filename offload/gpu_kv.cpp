// KV in GPU memory and attention by the cuda backend (see gpu_kv.hpp).
#include "offload/gpu_kv.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <fmt/format.h>

#include "common/check.hpp"

namespace longattn::offload {

std::size_t GpuLayerKv::bytes_after(std::int64_t tokens, std::size_t row_bytes) const {
  std::int64_t cap = std::max<std::int64_t>(capacity_, 1);
  while (cap < length_ + tokens) cap *= 2;
  return cap == capacity_ ? bytes() : 2 * static_cast<std::size_t>(cap) * row_bytes;
}

void GpuLayerKv::append(DeviceOps& ops, const std::byte* k, const std::byte* v, std::int64_t tokens, std::size_t row_bytes) {
  if (length_ + tokens > capacity_) {
    // Doubling keeps a decode step's append at one token's rows; the copy of what is there
    // happens log2(length) times over a sequence's life.
    std::int64_t cap = std::max<std::int64_t>(capacity_, 1);
    while (cap < length_ + tokens) cap *= 2;
    auto nk = ops.allocate(static_cast<std::size_t>(cap) * row_bytes), nv = ops.allocate(static_cast<std::size_t>(cap) * row_bytes);
    if (length_ > 0) {
      ops.copy_bytes(nk->data(), k_->data(), static_cast<std::size_t>(length_) * row_bytes, nullptr);
      ops.copy_bytes(nv->data(), v_->data(), static_cast<std::size_t>(length_) * row_bytes, nullptr);
    }
    k_ = std::move(nk);
    v_ = std::move(nv);
    capacity_ = cap;
  }
  const std::size_t at = static_cast<std::size_t>(length_) * row_bytes, n = static_cast<std::size_t>(tokens) * row_bytes;
  ops.copy_bytes(static_cast<std::byte*>(k_->data()) + at, k, n, nullptr);
  ops.copy_bytes(static_cast<std::byte*>(v_->data()) + at, v, n, nullptr);
  ops.synchronize(nullptr);  // the frame holding k and v is reused once this returns
  length_ += tokens;
}

GpuAttention::GpuAttention() {
  try {
    backend_ = make_backend("cuda", DeviceKind::cuda);
  } catch (const Error& e) {
    throw Error(ErrorCode::unsupported,
                fmt::format("--device cuda needs a longattn built with CUDA (-DLONGATTN_CUDA=ON) and a visible GPU: {}; run with "
                            "--device cpu here",
                            e.what()));
  }
}

GpuAttention::~GpuAttention() = default;

std::string GpuAttention::unsupported_reason(const Open& g) const {
  if (g.dtype != DType::bf16 && g.dtype != DType::f16)
    return fmt::format("a --device cuda server keeps bf16 or fp16 KV, not {}", to_string(g.dtype));
  AttentionArgs probe;
  const Device dev = backend_->device();
  probe.q = TensorView(nullptr, g.dtype, {1, static_cast<std::int64_t>(g.kv_heads), static_cast<std::int64_t>(g.head_dim)}, dev);
  probe.k = probe.v = probe.q;
  return backend_->unsupported_reason(probe);
}

namespace {

// A device buffer of at least `bytes`, reallocated only when a request needs more than it has.
void* grown(DeviceOps& ops, std::unique_ptr<DeviceBuffer>& buffer, std::size_t bytes) {
  if (!buffer || buffer->bytes() < bytes) {
    buffer.reset();
    buffer = ops.allocate(std::max<std::size_t>(bytes, 256));
  }
  return buffer->data();
}

// A query at absolute position p sees stored token i (at kv_start + i) iff i <= p - kv_start: the
// kernel's "key position = index" convention with the query's position made relative, clamped to
// int32 (below -1 sees nothing, past the stored tokens sees all), so no key positions are needed.
std::int32_t relative_position(std::int64_t position, std::int64_t kv_start, std::int64_t stored) {
  return static_cast<std::int32_t>(std::clamp<std::int64_t>(position - kv_start, -1, std::max<std::int64_t>(stored, 0)));
}

}  // namespace

void GpuAttention::attend(const GpuAttendBatch& b) {
  std::lock_guard lock(mu_);
  const std::size_t row = static_cast<std::size_t>(b.q_heads) * static_cast<std::size_t>(b.head_dim);
  const std::size_t values = static_cast<std::size_t>(b.total_q) * row, rows = static_cast<std::size_t>(b.total_q) * b.q_heads;
  if (values == 0) return;
  DeviceOps& ops = backend_->device_ops();
  const Device dev = backend_->device();
  auto* q32 = static_cast<float*>(grown(ops, q32_, values * sizeof(float)));
  auto* q = static_cast<std::byte*>(grown(ops, q_, values * sizeof(float)));  // room for any KV dtype
  auto* o = static_cast<float*>(grown(ops, o_, values * sizeof(float)));
  auto* lse = static_cast<float*>(grown(ops, lse_, rows * sizeof(float)));
  const bool causal = std::any_of(b.parts.begin(), b.parts.end(), [](const GpuAttendPart& p) { return p.positions != nullptr; });
  std::int32_t* positions = nullptr;
  if (causal) {
    positions_host_.assign(static_cast<std::size_t>(b.total_q), 0);
    std::size_t at = 0;
    for (const auto& p : b.parts) {
      for (int i = 0; p.positions && i < p.q_count; ++i)
        positions_host_[at + static_cast<std::size_t>(i)] = relative_position(p.positions[i], p.kv_start, p.kv->length());
      at += static_cast<std::size_t>(p.q_count);
    }
    positions = static_cast<std::int32_t*>(grown(ops, positions_, positions_host_.size() * sizeof(std::int32_t)));
    ops.copy_bytes(positions, positions_host_.data(), positions_host_.size() * sizeof(std::int32_t), nullptr);
  }
  ops.copy_bytes(q32, b.q, values * sizeof(float), nullptr);

  // Queue every sequence's conversion and kernels; nothing waits until the results are copied back.
  std::int64_t q_begin = 0;
  for (const auto& p : b.parts) {
    const std::int64_t tq = p.q_count, tk = p.kv->length();
    const std::size_t first = static_cast<std::size_t>(q_begin);
    q_begin += tq;
    if (tq == 0 || tk == 0) continue;
    const std::initializer_list<std::int64_t> dims = {tq, b.q_heads, b.head_dim};
    AttentionArgs a;
    a.q = TensorView(q + first * row * dtype_size(p.dtype), p.dtype, dims, dev);
    ops.convert(a.q, TensorView(q32 + first * row, DType::f32, dims, dev), nullptr);
    a.k = TensorView(const_cast<void*>(p.kv->k()), p.dtype, {tk, p.kv_heads, b.head_dim}, dev);
    a.v = TensorView(const_cast<void*>(p.kv->v()), p.dtype, {tk, p.kv_heads, b.head_dim}, dev);
    if (p.positions) {
      a.q_positions = positions + first;
      a.causal = true;
    }
    const std::string why = backend_->unsupported_reason(a);
    LONGATTN_REQUIRE(why.empty(), ErrorCode::unsupported, "the cuda backend cannot run this attend: {}", why);
    backend_->forward(a, {TensorView(o + first * row, DType::f32, dims, dev),
                          TensorView(lse + first * b.q_heads, DType::f32, {static_cast<std::int64_t>(b.q_heads), tq}, dev)});
  }
  lse_host_.resize(rows);
  ops.copy_bytes(b.o, o, values * sizeof(float), nullptr);
  ops.copy_bytes(lse_host_.data(), lse, rows * sizeof(float), nullptr);
  ops.synchronize(nullptr);

  // Part i's lse came back as its own [q_heads, q_count] block; the request wants [q_heads, total_q].
  // A sequence with nothing stored sees no key: o = 0, lse = -inf (its rows were not computed).
  q_begin = 0;
  for (const auto& p : b.parts) {
    const std::size_t first = static_cast<std::size_t>(q_begin), tq = static_cast<std::size_t>(p.q_count);
    q_begin += p.q_count;
    const bool empty = p.kv->length() == 0;
    if (empty) std::fill(b.o + first * row, b.o + (first + tq) * row, 0.0f);
    for (int h = 0; h < b.q_heads; ++h) {
      float* out = b.lse + static_cast<std::size_t>(h) * static_cast<std::size_t>(b.total_q) + first;
      if (empty) std::fill(out, out + tq, -std::numeric_limits<float>::infinity());
      else std::memcpy(out, lse_host_.data() + first * b.q_heads + static_cast<std::size_t>(h) * tq, tq * sizeof(float));
    }
  }
}

}  // namespace longattn::offload
