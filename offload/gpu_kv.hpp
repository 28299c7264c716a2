// The GPU side of `longattn-offload-server --device cuda`: KV kept in GPU memory (per sequence and
// layer, K and V as [capacity, kv_heads, head_dim] in the sequence's dtype, grown by doubling so
// that a decode step copies one token's rows and nothing else), and attention by the library's
// "cuda" backend, whose split-KV decode kernel reads long KV at memory speed. Written against the
// public backend and device interfaces only, so it builds everywhere and refuses at start, with
// the reason, where the build or the machine has no GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "longattn/backend.hpp"
#include "longattn/device_ops.hpp"
#include "offload/protocol.hpp"

namespace longattn::offload {

class GpuLayerKv {
 public:
  std::int64_t length() const { return length_; }
  std::size_t bytes() const { return k_ ? 2 * k_->bytes() : 0; }
  // The bytes the layer holds once `tokens` more fit (what the memory limit is charged first).
  std::size_t bytes_after(std::int64_t tokens, std::size_t row_bytes) const;
  // Appends `tokens` rows of k and v (host memory, [tokens, kv_heads, head_dim]); row_bytes = kv_heads x head_dim x dtype size.
  void append(DeviceOps& ops, const std::byte* k, const std::byte* v, std::int64_t tokens, std::size_t row_bytes);
  const void* k() const { return k_ ? k_->data() : nullptr; }
  const void* v() const { return v_ ? v_->data() : nullptr; }

 private:
  std::unique_ptr<DeviceBuffer> k_, v_;
  std::int64_t capacity_ = 0, length_ = 0;
};

// One sequence's part of an attend: q_count query rows (f32, host) against a layer's KV.
struct GpuAttendPart {
  const GpuLayerKv* kv = nullptr;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  DType dtype = DType::bf16;
  std::int64_t kv_start = 0;            // absolute position of stored token 0
  int q_count = 0;
  const float* q = nullptr;             // [q_count, q_heads, head_dim]
  const std::int64_t* positions = nullptr;  // [q_count] absolute positions (causal); null = see every stored token
  float* o = nullptr;                   // host [q_count, q_heads, head_dim] f32
  float* lse = nullptr;                 // host, row h of q_count values at lse + h * lse_pitch
  std::size_t lse_pitch = 0;
};

class GpuAttention {
 public:
  // Throws Error(unsupported) saying why when this build or machine cannot run the cuda backend.
  GpuAttention();
  ~GpuAttention();
  DeviceOps& ops() { return backend_->device_ops(); }
  // Empty when sequences of this geometry can be served; else why not (checked at open).
  std::string unsupported_reason(const Open& geometry) const;
  void attend(const GpuAttendPart& part);

 private:
  std::unique_ptr<AttentionBackend> backend_;
};

}  // namespace longattn::offload
