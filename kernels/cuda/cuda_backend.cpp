// The "cuda" backend: the own fused kernels (flash_fwd.cu, flash_bwd.cu), the split-KV decode
// kernel for few-query calls, and the GPU element-wise helpers, all on the caller's stream.
#include <cmath>
#include <vector>

#include "common/check.hpp"
#include "kernels/cuda/cuda_backends.hpp"
#include "kernels/cuda/cuda_common.hpp"
#include "kernels/cuda/decode.hpp"
#include "kernels/cuda/flash_params.hpp"
#include "kernels/validate.hpp"
#include "longattn/config.hpp"

namespace longattn::kernels {
namespace cuda {

// LONGATTN_CUDA_FWD_KERNEL / LONGATTN_CUDA_BWD_KERNEL: which kernel runs the shapes the wgmma
// kernels take (head dim 128, no explicit positions; the backward also needs atomic dQ). auto: the
// wgmma kernel on Hopper, mma.sync elsewhere. Both default to auto, because on Hopper the wgmma
// kernels are the faster ones in both directions (bench/results/gpu_kernels_h100_2026-11-23.md).
// Read per call (a getenv), so that a job can change them between calls like every other knob;
// code that compares kernels passes a CudaKernelChoice instead.
bool hopper_device() {
  int dev = 0, major = 0;
  return cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         major == 9;
}
bool wgmma_requested(const char* variable) {
  const std::string want = env_string(variable);
  if (want == "auto" || want.empty()) {
    static const bool hopper = hopper_device();
    return hopper;
  }
  if (want == "mma") return false;
  if (want == "wgmma") return true;
  throw Error(ErrorCode::invalid_argument, fmt::format("{}={} is not one of auto, mma, wgmma", variable, want));
}

// LONGATTN_CUDA_WGMMA_FWD_SCHEDULE: how the wgmma forward's two warpgroups share the K/V stages
// (flash_fwd_wgmma.cu says what each does). Default overlap, the faster of the two on every shape
// measured (bench/results/gpu_wgmma_h100_2026-11-23.md).
WgmmaSchedule wgmma_forward_schedule() {
  const std::string want = env_string("LONGATTN_CUDA_WGMMA_FWD_SCHEDULE");
  if (want == "pipeline") return WgmmaSchedule::pipeline;
  if (want == "overlap" || want.empty()) return WgmmaSchedule::overlap;
  throw Error(ErrorCode::invalid_argument,
              fmt::format("LONGATTN_CUDA_WGMMA_FWD_SCHEDULE={} is not one of pipeline, overlap", want));
}

std::string device_tensor_reason(const AttentionArgs& a) {
  for (const auto* t : {&a.q, &a.k, &a.v})
    if (t->device.kind != DeviceKind::cuda) return "tensors must be on a cuda device, got " + t->describe();
  if (a.q.dtype != DType::bf16 && a.q.dtype != DType::f16)
    return std::string("only bf16 and fp16 inputs are supported on the GPU, got ") + to_string(a.q.dtype);
  return {};
}

void sequence_maxima(const AttentionArgs& a, const ProblemShape& s, int& max_q, int& max_k) {
  max_q = a.max_seqlen_q;
  max_k = a.max_seqlen_k;
  if (!a.cu_seqlens_q) {
    max_q = static_cast<int>(s.tq);
    max_k = static_cast<int>(s.tk);
    return;
  }
  if (max_q > 0 && max_k > 0) return;
  // No hints: read the boundaries back. This synchronizes the stream; pass max_seqlen_q/k to avoid it.
  std::vector<std::int32_t> cq(a.batch + 1), ck(a.batch + 1);
  auto st = static_cast<cudaStream_t>(a.stream);
  LONGATTN_CUDA_CHECK(cudaMemcpyAsync(cq.data(), a.cu_seqlens_q, cq.size() * 4, cudaMemcpyDefault, st));
  LONGATTN_CUDA_CHECK(cudaMemcpyAsync(ck.data(), a.cu_seqlens_k, ck.size() * 4, cudaMemcpyDefault, st));
  LONGATTN_CUDA_CHECK(cudaStreamSynchronize(st));
  int mq = 0, mk = 0;
  for (int b = 0; b < a.batch; ++b) {
    mq = std::max(mq, cq[b + 1] - cq[b]);
    mk = std::max(mk, ck[b + 1] - ck[b]);
  }
  if (max_q <= 0) max_q = mq;
  if (max_k <= 0) max_k = mk;
}

FlashParams make_params(const AttentionArgs& a, const ProblemShape& s) {
  FlashParams p{.q = a.q.data, .k = a.k.data, .v = a.v.data, .cu_q = a.cu_seqlens_q, .cu_k = a.cu_seqlens_k,
                .pos_q = a.q_positions, .pos_k = a.k_positions, .tq = s.tq, .tk = s.tk, .batch = a.batch, .hq = s.hq,
                .hkv = s.hkv, .d = s.d, .causal = a.causal, .scale = a.effective_scale(), .dtype = a.q.dtype};
  sequence_maxima(a, s, p.max_len_q, p.max_len_k);
  return p;
}

}  // namespace cuda

namespace {

using namespace cuda;

class CudaBackend final : public AttentionBackend {
 public:
  explicit CudaBackend(const CudaKernelChoice& choice) : choice_(choice) { LONGATTN_CUDA_CHECK(cudaGetDevice(&device_)); }
  std::string name() const override { return "cuda"; }
  Device device() const override { return {DeviceKind::cuda, device_}; }

  std::string unsupported_reason(const AttentionArgs& a) const override {
    auto why = device_tensor_reason(a);
    if (!why.empty()) return why;
    if (a.q.ndim == 3 && a.q.dim(2) != 64 && a.q.dim(2) != 128)
      return "the cuda backend is built for head_dim 64 and 128, got " + std::to_string(a.q.dim(2));
    return {};
  }

  void forward(const AttentionArgs& a, const ForwardOutputs& out) override {
    const auto s = validate_call(a, out);
    require(a);
    // Few query rows against a long KV: the split-KV decode kernel reads the KV at memory speed,
    // where the fused kernel would leave most SMs idle.
    if (decode_unsupported_reason(a).empty() && s.tk >= 4096) {
      cuda_decode_attention(a, out);
      return;
    }
    FlashParams p = make_params(a, s);
    p.o = out.o.data;
    p.o_dtype = out.o.dtype;
    p.lse = out.lse.as<float>();
    if (wgmma_chosen(choice_.forward, "LONGATTN_CUDA_FWD_KERNEL") && flash_forward_wgmma_supports(p)) {
      p.wgmma_schedule = choice_.forward_schedule ? *choice_.forward_schedule : wgmma_forward_schedule();
      flash_forward_wgmma(p, static_cast<cudaStream_t>(a.stream));
    } else {
      flash_forward(p, static_cast<cudaStream_t>(a.stream));
    }
  }

  void backward(const AttentionArgs& a, const BackwardArgs& g) override {
    const auto s = validate_call(a, g);
    require(a);
    auto st = static_cast<cudaStream_t>(a.stream);
    FlashParams p = make_params(a, s);
    p.d_o = g.d_o.data;
    p.lse_in = g.lse.as<const float>();
    p.dq = g.dq.data;
    p.dk = g.dk.data;
    p.dv = g.dv.data;
    p.grad_dtype_q = g.dq.dtype;
    p.grad_dtype_k = g.dk.dtype;
    p.grad_dtype_v = g.dv.dtype;
    p.accumulate = g.accumulate;
    p.deterministic = choice_.deterministic;
    void* tmp = nullptr;
    void* dq_tmp = nullptr;
    const std::size_t dq_bytes = static_cast<std::size_t>(g.dq.numel()) * sizeof(float);
    if (!choice_.deterministic) {
      // Atomic dQ sums into fp32: the caller's fp32 dq directly (zeroed unless accumulating), or a
      // zeroed fp32 buffer converted to the caller's dtype afterwards.
      if (g.dq.dtype == DType::f32) {
        p.dq_accum = g.dq.as<float>();
        if (!g.accumulate && dq_bytes) LONGATTN_CUDA_CHECK(cudaMemsetAsync(p.dq_accum, 0, dq_bytes, st));
      } else {
        LONGATTN_CUDA_CHECK(cudaMallocAsync(&dq_tmp, std::max<std::size_t>(dq_bytes, 16), st));
        if (dq_bytes) LONGATTN_CUDA_CHECK(cudaMemsetAsync(dq_tmp, 0, dq_bytes, st));
        p.dq_accum = static_cast<float*>(dq_tmp);
      }
    }
    if (g.delta.empty()) {
      LONGATTN_CUDA_CHECK(cudaMallocAsync(&tmp, std::max<std::size_t>(1, s.tq * s.hq * sizeof(float)), st));
      launch_compute_delta(g.o.data, g.o.dtype, g.d_o.data, g.d_o.dtype, static_cast<float*>(tmp), s.tq, s.hq, s.d, st);
      p.delta = static_cast<const float*>(tmp);
    } else {
      p.delta = g.delta.as<const float>();
    }
    if (wgmma_chosen(choice_.backward, "LONGATTN_CUDA_BWD_KERNEL") && flash_backward_wgmma_supports(p)) {
      flash_backward_wgmma(p, st);
    } else {
      flash_backward(p, st);
    }
    if (dq_tmp) {
      launch_convert(g.dq.data, g.dq.dtype, dq_tmp, DType::f32, g.dq.numel(), st);
      LONGATTN_CUDA_CHECK(cudaFreeAsync(dq_tmp, st));
    }
    if (tmp) LONGATTN_CUDA_CHECK(cudaFreeAsync(tmp, st));
  }

  void merge_into(TensorView oa, TensorView la, TensorView op, TensorView lp, void* stream) override {
    check_merge(oa, la, op, lp);
    launch_merge_into(oa.as<float>(), la.as<float>(), op.data, op.dtype, lp.as<const float>(), oa.dim(0),
                      static_cast<int>(oa.dim(1)), static_cast<int>(oa.dim(2)), static_cast<cudaStream_t>(stream));
  }
  void compute_delta(TensorView o, TensorView d_o, TensorView delta, void* stream) override {
    LONGATTN_INVALID(o.ndim == 3 && d_o.numel() == o.numel() && delta.dtype == DType::f32 &&
                         delta.numel() == o.dim(0) * o.dim(1),
                     "compute_delta: o {} and d_o {} must be [T, H, D], delta {} fp32 [H, T]", o.describe(),
                     d_o.describe(), delta.describe());
    launch_compute_delta(o.data, o.dtype, d_o.data, d_o.dtype, delta.as<float>(), o.dim(0), static_cast<int>(o.dim(1)),
                         static_cast<int>(o.dim(2)), static_cast<cudaStream_t>(stream));
  }

 private:
  void require(const AttentionArgs& a) const {
    const auto why = unsupported_reason(a);
    LONGATTN_REQUIRE(why.empty(), ErrorCode::unsupported, "cuda backend: {}", why);
  }
  static void check_merge(const TensorView& oa, const TensorView& la, const TensorView& op, const TensorView& lp) {
    LONGATTN_INVALID(oa.ndim == 3 && oa.dtype == DType::f32 && op.numel() == oa.numel(),
                     "merge_into: o_acc {} must be fp32 [T, H, D] and o_part {} the same size", oa.describe(), op.describe());
    LONGATTN_INVALID(la.dtype == DType::f32 && lp.dtype == DType::f32 && la.numel() == oa.dim(0) * oa.dim(1) &&
                         lp.numel() == la.numel(),
                     "merge_into: lse_acc {} and lse_part {} must be fp32 [H, T]", la.describe(), lp.describe());
  }
  static bool wgmma_chosen(CudaKernelChoice::Kernel kernel, const char* variable) {
    if (kernel == CudaKernelChoice::Kernel::from_environment) return wgmma_requested(variable);
    return kernel == CudaKernelChoice::Kernel::wgmma;
  }
  CudaKernelChoice choice_;
  int device_ = 0;
};

}  // namespace

bool cuda_device_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::unique_ptr<AttentionBackend> make_cuda_backend() { return make_cuda_backend(CudaKernelChoice{}); }
std::unique_ptr<AttentionBackend> make_cuda_backend_deterministic() {
  CudaKernelChoice choice;
  choice.deterministic = true;
  return make_cuda_backend(choice);
}
std::unique_ptr<AttentionBackend> make_cuda_backend(const CudaKernelChoice& choice) { return std::make_unique<CudaBackend>(choice); }

}  // namespace longattn::kernels
