// RankRunner (measure_rank_runner.hpp).
#include "measure_rank_runner.hpp"

#include <algorithm>
#include <utility>

#include "measure_buffers.hpp"
#include "measure_timer.hpp"
#include "partition/varlen_cost.hpp"

namespace longattn::bench {

namespace {

// The tensors one rank's launches read and write, sized for the largest of them; every launch takes
// views at its rows (and a hybrid member's fewer heads), as the executor's workspaces do.
// Scores of random unit-range inputs are small: a log-sum-exp of this size keeps every probability
// the backward recomputes below one.
constexpr float kSavedLse = 8.0f;

struct RankTensors {
  std::unique_ptr<DeviceBuffer> q, k, v, o, lse, d_o, delta, dq, dk, dv, offsets;
};

}  // namespace

double model_seconds(const partition::MachineModel& machine, partition::VarlenShape shape, const runtime::VarlenRankCall& c,
                     bool backward) {
  shape.query_heads = c.query_heads;
  auto one = [&](std::int64_t q, std::int64_t k) {
    return partition::call_seconds(machine, shape, partition::visible_pairs(q, k, c.causal), static_cast<double>(q),
                                   static_cast<double>(k), c.causal, backward);
  };
  if (c.cu_q.empty()) return one(c.q_count, c.k_count);
  double seconds = 0;
  for (std::size_t b = 0; b + 1 < c.cu_q.size(); ++b) seconds += one(c.cu_q[b + 1] - c.cu_q[b], c.cu_k[b + 1] - c.cu_k[b]);
  return seconds;
}

struct RankRunner::Impl {
  Impl(AttentionBackend& backend, RankRunnerSettings settings)
      : backend_(backend), options_(std::move(settings)), timer_(backend) {}

  const char* timing() const { return timer_.method(); }

  RankMeasurement measure(const std::vector<runtime::VarlenRankCall>& calls, std::uint64_t seed) {
    RankMeasurement m;
    m.launches = static_cast<int>(calls.size());
    for (const auto& c : calls) {
      m.model_forward_ms += 1e3 * model_seconds(options_.machine, options_.shape, c, false);
      m.model_backward_ms += 1e3 * model_seconds(options_.machine, options_.shape, c, true);
    }
    if (calls.empty()) return m;
    allocate(calls, seed);
    m.forward_ms = timer_.median_ms(options_.warmups, options_.reps, [&] {
      for (std::size_t i = 0; i < calls.size(); ++i) backend_.forward(args(calls[i], i), forward_outputs(calls[i]));
    });
    if (options_.backward) {
      // Saved results for the backward: o random, lse one finite value for every row (a forward's
      // would hold -inf on rows a launch leaves without keys, and the timing needs no true values),
      // and rowsum(dO * O) once.
      const auto hq = options_.shape.query_heads;
      backend_.device_ops().fill(TensorView(t_.lse->data(), DType::f32, {hq, std::max(max_q_rows_, max_q_count_)}, device()),
                                 kSavedLse, nullptr);
      backend_.compute_delta(view(*t_.o, options_.dtype, max_q_rows_, hq), view(*t_.d_o, options_.dtype, max_q_rows_, hq),
                             TensorView(t_.delta->data(), DType::f32, {hq, max_q_rows_}, device()), nullptr);
      m.backward_ms = timer_.median_ms(options_.warmups, options_.reps, [&] {
        for (std::size_t i = 0; i < calls.size(); ++i) backend_.backward(args(calls[i], i), backward_args(calls[i]));
      });
    }
    t_ = {};
    return m;
  }

  Device device() const { return backend_.device(); }

  TensorView view(DeviceBuffer& buffer, DType dtype, std::int64_t rows, int heads, std::int64_t first_row = 0) const {
    const auto d = options_.shape.head_dim;
    char* base = static_cast<char*>(buffer.data()) + static_cast<std::size_t>(first_row * heads * d) * dtype_size(dtype);
    return TensorView(base, dtype, {rows, heads, d}, device());
  }

  void allocate(const std::vector<runtime::VarlenRankCall>& calls, std::uint64_t seed) {
    max_q_rows_ = max_k_rows_ = max_q_count_ = 1;
    std::vector<std::int32_t> offsets;
    offsets_at_.clear();
    for (const auto& c : calls) {
      max_q_rows_ = std::max(max_q_rows_, c.query_rows);
      max_k_rows_ = std::max(max_k_rows_, c.key_rows);
      max_q_count_ = std::max(max_q_count_, c.q_count);
      offsets_at_.push_back(offsets.size());
      offsets.insert(offsets.end(), c.cu_q.begin(), c.cu_q.end());
      offsets.insert(offsets.end(), c.cu_k.begin(), c.cu_k.end());
    }
    auto& ops = backend_.device_ops();
    const auto hq = static_cast<std::size_t>(options_.shape.query_heads), hkv = static_cast<std::size_t>(options_.shape.kv_heads);
    const auto d = static_cast<std::size_t>(options_.shape.head_dim);
    const auto q_elements = static_cast<std::size_t>(max_q_rows_) * hq * d, k_elements = static_cast<std::size_t>(max_k_rows_) * hkv * d;
    const auto rows_f32 = static_cast<std::size_t>(std::max(max_q_rows_, max_q_count_)) * hq;
    t_.q = random_buffer(ops, q_elements, options_.dtype, seed);
    t_.k = random_buffer(ops, k_elements, options_.dtype, seed + 1);
    t_.v = random_buffer(ops, k_elements, options_.dtype, seed + 2);
    t_.o = random_buffer(ops, q_elements, options_.dtype, seed + 3);
    t_.lse = ops.allocate(rows_f32 * sizeof(float));
    if (options_.backward) {
      t_.d_o = random_buffer(ops, q_elements, options_.dtype, seed + 4);
      t_.delta = ops.allocate(rows_f32 * sizeof(float));
      // f32 covers both: ring steps accumulate in f32, one-rank groups write the input dtype.
      t_.dq = ops.allocate(q_elements * sizeof(float));
      t_.dk = ops.allocate(k_elements * sizeof(float));
      t_.dv = ops.allocate(k_elements * sizeof(float));
    }
    t_.offsets = ops.allocate(std::max<std::size_t>(offsets.size(), 1) * sizeof(std::int32_t));
    if (!offsets.empty()) ops.copy_bytes(t_.offsets->data(), offsets.data(), offsets.size() * sizeof(std::int32_t), nullptr);
    ops.synchronize(nullptr);
  }

  AttentionArgs args(const runtime::VarlenRankCall& c, std::size_t index) const {
    AttentionArgs a;
    a.q = view(*t_.q, options_.dtype, c.q_count, c.query_heads, c.q_begin);
    a.k = view(*t_.k, options_.dtype, c.k_count, c.kv_heads, c.k_begin);
    a.v = view(*t_.v, options_.dtype, c.k_count, c.kv_heads, c.k_begin);
    if (!c.cu_q.empty()) {
      const auto* offsets = static_cast<const std::int32_t*>(t_.offsets->data()) + offsets_at_[index];
      a.cu_seqlens_q = offsets;
      a.cu_seqlens_k = offsets + c.cu_q.size();
      a.batch = c.batch();
    }
    a.max_seqlen_q = c.max_seqlen_q;
    a.max_seqlen_k = c.max_seqlen_k;
    a.causal = c.causal;
    return a;
  }

  ForwardOutputs forward_outputs(const runtime::VarlenRankCall& c) const {
    return {view(*t_.o, options_.dtype, c.q_count, c.query_heads),
            TensorView(t_.lse->data(), DType::f32, {c.query_heads, c.q_count}, device())};
  }

  BackwardArgs backward_args(const runtime::VarlenRankCall& c) const {
    const DType grad = c.in_ring ? DType::f32 : options_.dtype;
    BackwardArgs g;
    g.o = view(*t_.o, options_.dtype, c.q_count, c.query_heads, c.q_begin);
    g.d_o = view(*t_.d_o, options_.dtype, c.q_count, c.query_heads, c.q_begin);
    g.lse = TensorView(t_.lse->data(), DType::f32, {c.query_heads, c.q_count}, device());
    // The ring hands its launches rowsum(dO * O) computed once; a one-rank group's call derives it.
    if (c.in_ring) g.delta = TensorView(t_.delta->data(), DType::f32, {c.query_heads, c.q_count}, device());
    g.dq = view(*t_.dq, grad, c.q_count, c.query_heads, c.q_begin);
    g.dk = view(*t_.dk, grad, c.k_count, c.kv_heads, c.k_begin);
    g.dv = view(*t_.dv, grad, c.k_count, c.kv_heads, c.k_begin);
    g.accumulate = c.in_ring;
    return g;
  }

  AttentionBackend& backend_;
  const RankRunnerSettings options_;
  CallTimer timer_;
  RankTensors t_;
  std::vector<std::size_t> offsets_at_;
  std::int64_t max_q_rows_ = 1, max_k_rows_ = 1, max_q_count_ = 1;
};

RankRunner::RankRunner(AttentionBackend& backend, RankRunnerSettings settings)
    : impl_(std::make_unique<Impl>(backend, std::move(settings))) {}
RankRunner::~RankRunner() = default;
const char* RankRunner::timing() const { return impl_->timing(); }
RankMeasurement RankRunner::measure(const std::vector<runtime::VarlenRankCall>& calls, std::uint64_t seed) {
  return impl_->measure(calls, seed);
}

}  // namespace longattn::bench
