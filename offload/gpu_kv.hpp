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
#include <mutex>
#include <string>
#include <vector>

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

// One sequence's part of an attend: q_count query rows against a layer's KV.
struct GpuAttendPart {
  const GpuLayerKv* kv = nullptr;
  int kv_heads = 0;
  DType dtype = DType::bf16;
  std::int64_t kv_start = 0;                // absolute position of stored token 0
  int q_count = 0;
  const std::int64_t* positions = nullptr;  // [q_count] absolute positions (causal); null = see every stored token
};

// Every sequence of one attend request, their query rows back to back in request order (part i's
// q_count rows follow part i-1's), in host memory as the protocol carries them.
struct GpuAttendBatch {
  int q_heads = 0, head_dim = 0;
  std::int64_t total_q = 0;
  const float* q = nullptr;  // [total_q, q_heads, head_dim] f32
  float* o = nullptr;        // [total_q, q_heads, head_dim] f32
  float* lse = nullptr;      // [q_heads, total_q] f32
  std::vector<GpuAttendPart> parts;
};

class GpuAttention {
 public:
  // Throws Error(unsupported) saying why when this build or machine cannot run the cuda backend.
  GpuAttention();
  ~GpuAttention();
  DeviceOps& ops() { return backend_->device_ops(); }
  // Empty when sequences of this geometry can be served; else why not (checked at open).
  std::string unsupported_reason(const Open& geometry) const;
  // One request: a single copy of all queries in, the sequences' kernels queued back to back on
  // the GPU, a single copy of all results out and one wait (a wait and allocations per sequence
  // left the GPU idle between sequences). Serialized: the device scratch below is shared.
  void attend(const GpuAttendBatch& batch);

 private:
  std::unique_ptr<AttentionBackend> backend_;
  std::mutex mu_;
  // Grow-only device scratch of the requests: q in f32 and in the KV dtype, o, lse, q positions.
  std::unique_ptr<DeviceBuffer> q32_, q_, o_, lse_, positions_;
  std::vector<float> lse_host_;
  std::vector<std::int32_t> positions_host_;
};

}  // namespace longattn::offload
