// The model's side of offload_decode's micro-batch pipeline on the GPU (the MicroBatchModel that
// run_gpu hands to the shared loop in pipeline_loop.hpp).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <utility>
#include <vector>

#include "decode_common.hpp"
#include "gpu_kernels.hpp"
#include "gpu_resources.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/offload_client.hpp"
#include "pipeline_loop.hpp"
#include "pipeline_output.hpp"

namespace offload_decode {

// The model's side of the pipeline on the GPU: micro-batch m owns rows [first, first + count) of
// the batch's buffers, its own stream and a begin/end event pair around each piece of work it
// enqueues (o in, x += o Wo, norm, the next layer's projections, q and the new k, v out), so the
// loop can ask whether it is done without blocking, and the GPU's busy time is the union of those
// intervals (work of several streams that overlaps is counted once).
class GpuModel final : public MicroBatchModel {
 public:
  using Weights = std::vector<std::unique_ptr<DeviceMem>>;
  struct Buffers {
    const Weights &wq, &wk, &wv, &wo;
    float *x, *y, *q, *k, *v, *o;  // device, [B, ...] rows
    std::byte* kv_lp;              // device, per micro-batch: its k rows then its v rows (KV dtype)
    float* h_q;                    // pinned, the same layouts as the device buffers
    std::byte* h_kv;
    float *h_o, *h_lse;            // lse per micro-batch: [H][count] from its first * H
  };
  using CheckFn = std::function<void(const MicroBatchRange&, int layer, const float* q, const std::byte* kv, const float* o, const float* lse)>;

  GpuModel(const Config& c, longattn::offload::Client& client, const Buffers& b, CheckFn check)
      : c_(c), client_(client), b_(b), check_(std::move(check)), es_(longattn::dtype_size(c.dtype)), et_(elem_of(c.dtype)) {
    for (const auto& r : split_batch(c.batch, c.micro_batches)) {
      auto p = std::make_unique<Part>();
      p->seqs = r;
      for (int s = r.first; s < r.first + r.count; ++s) p->queries.push_back({static_cast<std::uint64_t>(s), 1});
      parts_.push_back(std::move(p));
    }
    cuda_ok(cudaEventRecord(origin_.e, parts_[0]->stream.s), "cudaEventRecord");
    cuda_ok(cudaEventSynchronize(origin_.e), "cudaEventSynchronize");
  }

  void start(int m, int finish_layer, int next_layer, int) override {
    Part& p = *parts_[static_cast<std::size_t>(m)];
    const int n = p.seqs.count, H = c_.heads, D = c_.head_dim, hidden = c_.hidden(), row = static_cast<int>(c_.kv_row());
    const std::size_t qo = static_cast<std::size_t>(p.seqs.first) * H * D;  // q, o rows
    const std::size_t xo = static_cast<std::size_t>(p.seqs.first) * hidden;
    const std::size_t kvo = static_cast<std::size_t>(p.seqs.first) * row;  // k, v rows (f32)
    std::byte* const kv_lp = b_.kv_lp + 2 * kvo * es_;
    std::byte* const h_kv = b_.h_kv + 2 * kvo * es_;
    const std::size_t kv_bytes = 2 * static_cast<std::size_t>(n) * row * es_;
    if (finish_layer >= 0 && check_) check_(p.seqs, finish_layer, b_.h_q + qo, h_kv, b_.h_o + qo, b_.h_lse + static_cast<std::size_t>(p.seqs.first) * H);
    const cudaStream_t s = p.stream.s;
    cuda_ok(cudaEventRecord(p.begin.e, s), "cudaEventRecord");
    if (finish_layer >= 0) {
      cuda_ok(cudaMemcpyAsync(b_.o + qo, b_.h_o + qo, static_cast<std::size_t>(n) * H * D * 4, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
      gpu::matmul(b_.o + qo, b_.wo[static_cast<std::size_t>(finish_layer)]->p, b_.y + xo, n, H * D, hidden, s);
      gpu::residual_rmsnorm(b_.x + xo, b_.y + xo, n, hidden, s);
    }
    if (next_layer >= 0) {
      const auto l = static_cast<std::size_t>(next_layer);
      gpu::matmul(b_.x + xo, b_.wq[l]->p, b_.q + qo, n, hidden, H * D, s);
      gpu::matmul(b_.x + xo, b_.wk[l]->p, b_.k + kvo, n, hidden, row, s);
      gpu::matmul(b_.x + xo, b_.wv[l]->p, b_.v + kvo, n, hidden, row, s);
      gpu::store_rows(kv_lp, et_, row, b_.k + kvo, n, row, s);
      gpu::store_rows(kv_lp + static_cast<std::size_t>(n) * row * es_, et_, row, b_.v + kvo, n, row, s);
      cuda_ok(cudaMemcpyAsync(b_.h_q + qo, b_.q + qo, static_cast<std::size_t>(n) * H * D * 4, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
      cuda_ok(cudaMemcpyAsync(h_kv, kv_lp, kv_bytes, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
    }
    cuda_ok(cudaEventRecord(p.end.e, s), "cudaEventRecord");
    p.in_flight = true;
  }

  bool done(int m) override {
    Part& p = *parts_[static_cast<std::size_t>(m)];
    if (!p.in_flight) return true;
    const cudaError_t e = cudaEventQuery(p.end.e);
    if (e == cudaErrorNotReady) return false;
    cuda_ok(e, "cudaEventQuery");
    float from = 0, to = 0;
    cuda_ok(cudaEventElapsedTime(&from, origin_.e, p.begin.e), "cudaEventElapsedTime");
    cuda_ok(cudaEventElapsedTime(&to, origin_.e, p.end.e), "cudaEventElapsedTime");
    busy_.push_back({from, to});
    p.in_flight = false;
    return true;
  }

  std::future<void> send(int m, int layer, std::chrono::steady_clock::time_point* answered) override {
    Part& p = *parts_[static_cast<std::size_t>(m)];
    const int n = p.seqs.count, H = c_.heads, D = c_.head_dim;
    const std::size_t qo = static_cast<std::size_t>(p.seqs.first) * H * D, kvo = static_cast<std::size_t>(p.seqs.first) * c_.kv_row();
    const std::byte* h_kv = b_.h_kv + 2 * kvo * es_;
    // q in the KV dtype, as the all-on-GPU mode has it: a GPU server rounds q to it anyway, so the
    // --check reference and every kind of server then see the same numbers.
    float* q = b_.h_q + qo;
    std::byte rounded[4];
    for (std::size_t i = 0; i < static_cast<std::size_t>(n) * H * D; ++i) {
      longattn::store_from_f32(rounded, c_.dtype, 0, q[i]);
      q[i] = longattn::load_as_f32(rounded, c_.dtype, 0);
    }
    return client_.append_attend(layer, H, D, p.queries, q, h_kv, h_kv + static_cast<std::size_t>(n) * c_.kv_row() * es_, b_.h_o + qo,
                                 b_.h_lse + static_cast<std::size_t>(p.seqs.first) * H, answered);
  }

  // Seconds the GPU had model work of some micro-batch in flight.
  double gpu_busy_seconds() const {
    auto spans = busy_;
    std::sort(spans.begin(), spans.end());
    double ms = 0, until = -1e30;
    for (const auto& [from, to] : spans) {
      const double a = std::max<double>(from, until);
      if (to > a) ms += to - a;
      until = std::max<double>(until, to);
    }
    return ms * 1e-3;
  }

 private:
  struct Part {
    MicroBatchRange seqs;
    std::vector<longattn::offload::DecodeQuery> queries;
    Stream stream;
    Event begin, end;
    bool in_flight = false;
  };
  const Config& c_;
  longattn::offload::Client& client_;
  Buffers b_;
  CheckFn check_;
  std::size_t es_;
  gpu::Elem et_;
  Event origin_;
  std::vector<std::unique_ptr<Part>> parts_;
  std::vector<std::pair<float, float>> busy_;
};

}  // namespace offload_decode
