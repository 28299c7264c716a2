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

void GpuAttention::attend(const GpuAttendPart& p) {
  const std::int64_t tq = p.q_count, tk = p.kv->length();
  const std::size_t rows = static_cast<std::size_t>(tq) * static_cast<std::size_t>(p.q_heads);
  const std::size_t o_count = rows * static_cast<std::size_t>(p.head_dim);
  if (tq == 0) return;
  if (tk == 0) {  // nothing to see: o = 0, lse = -inf
    std::fill(p.o, p.o + o_count, 0.0f);
    for (int h = 0; h < p.q_heads; ++h)
      std::fill(p.lse + h * p.lse_pitch, p.lse + h * p.lse_pitch + tq, -std::numeric_limits<float>::infinity());
    return;
  }
  DeviceOps& ops = backend_->device_ops();
  const Device dev = backend_->device();
  const std::int64_t dims[3] = {tq, p.q_heads, p.head_dim};
  auto q32 = ops.allocate(o_count * sizeof(float)), q = ops.allocate(o_count * dtype_size(p.dtype));
  auto o = ops.allocate(o_count * sizeof(float)), lse = ops.allocate(rows * sizeof(float));
  ops.copy_bytes(q32->data(), p.q, o_count * sizeof(float), nullptr);
  ops.convert(TensorView(q->data(), p.dtype, {dims[0], dims[1], dims[2]}, dev), TensorView(q32->data(), DType::f32, {dims[0], dims[1], dims[2]}, dev),
              nullptr);
  AttentionArgs a;
  a.q = TensorView(q->data(), p.dtype, {dims[0], dims[1], dims[2]}, dev);
  a.k = TensorView(const_cast<void*>(p.kv->k()), p.dtype, {tk, p.kv_heads, p.head_dim}, dev);
  a.v = TensorView(const_cast<void*>(p.kv->v()), p.dtype, {tk, p.kv_heads, p.head_dim}, dev);
  std::unique_ptr<DeviceBuffer> pos_q, pos_k;
  if (p.positions) {
    // Causal by absolute position: a stored token at kv_start + i is seen by a query at p iff kv_start + i <= p.
    std::vector<std::int32_t> hq(static_cast<std::size_t>(tq)), hk(static_cast<std::size_t>(tk));
    for (std::int64_t i = 0; i < tq; ++i) hq[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(p.positions[i]);
    for (std::int64_t i = 0; i < tk; ++i) hk[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(p.kv_start + i);
    pos_q = ops.allocate(hq.size() * sizeof(std::int32_t));
    pos_k = ops.allocate(hk.size() * sizeof(std::int32_t));
    ops.copy_bytes(pos_q->data(), hq.data(), hq.size() * sizeof(std::int32_t), nullptr);
    ops.copy_bytes(pos_k->data(), hk.data(), hk.size() * sizeof(std::int32_t), nullptr);
    ops.synchronize(nullptr);  // hq and hk go out of scope
    a.q_positions = static_cast<const std::int32_t*>(pos_q->data());
    a.k_positions = static_cast<const std::int32_t*>(pos_k->data());
    a.causal = true;
  }
  const std::string why = backend_->unsupported_reason(a);
  LONGATTN_REQUIRE(why.empty(), ErrorCode::unsupported, "the cuda backend cannot run this attend: {}", why);
  backend_->forward(a, {TensorView(o->data(), DType::f32, {dims[0], dims[1], dims[2]}, dev),
                        TensorView(lse->data(), DType::f32, {static_cast<std::int64_t>(p.q_heads), tq}, dev)});
  std::vector<float> lse_host(rows);
  ops.copy_bytes(p.o, o->data(), o_count * sizeof(float), nullptr);
  ops.copy_bytes(lse_host.data(), lse->data(), rows * sizeof(float), nullptr);
  ops.synchronize(nullptr);
  for (int h = 0; h < p.q_heads; ++h)
    std::memcpy(p.lse + h * p.lse_pitch, lse_host.data() + static_cast<std::size_t>(h) * tq, static_cast<std::size_t>(tq) * sizeof(float));
}

}  // namespace longattn::offload
