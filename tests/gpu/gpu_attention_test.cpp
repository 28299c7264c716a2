// The GPU backends ("cuda", and "cudnn" where built) against the double-precision CPU reference:
// forward and backward, odd and varlen sizes (empty and one-token sequences), head dims 64/128,
// GQA/MQA, causal by explicit positions (ring-step views), bf16/fp16; outputs poisoned with NaN
// before every run; accumulate mode; atomic-dQ (default) and deterministic backward, the latter
// bit-identical across runs. "cuda" pins the mma.sync kernels; "cuda-wgmma" is the cuda backend
// with the Hopper warpgroup forward (kernels::CudaKernelChoice, its default overlap schedule),
// "cuda-wgmma-pipeline" the same with its other warpgroup schedule, and "cuda-wgmma-bwd" with the
// warpgroup backward, each on the head-dim-128 shapes without positions (others fall back to
// mma.sync).
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "kernels/cpu_kernels.hpp"
#include "kernels/cuda/cuda_backends.hpp"
#include "longattn/backend.hpp"
#include "longattn/error.hpp"
#include "gpu/gpu_test_util.hpp"

namespace longattn {
namespace {

using test::DeviceInts;
using test::DeviceTensor;
using test::HostTensor;

enum class Pos { none, shifted, offset };  // no positions; striped ring-step view; contiguous offset

struct Case {
  int batch, max_len, hq, hkv, d;
  bool causal;
  DType dtype;
  Pos pos;
  int len_k = 0;  // 0: like the queries
};

std::string name(const Case& c) {
  static const char* pos[] = {"", "_pos", "_off"};
  return fmt::format("b{}_L{}_K{}_h{}x{}_d{}_{}{}_{}", c.batch, c.max_len, c.len_k, c.hq, c.hkv, c.d,
                     c.causal ? "causal" : "full", pos[static_cast<int>(c.pos)], to_string(c.dtype));
}

struct Problem {
  std::vector<std::int32_t> cu_q, cu_k, pos_q, pos_k;
  HostTensor q, k, v, d_o;
  AttentionArgs host;  // views of the host tensors
};

Problem make_problem(std::mt19937_64& rng, const Case& c) {
  Problem p;
  p.cu_q = test::random_cu_seqlens(rng, c.batch, c.max_len);
  p.cu_k = c.len_k ? test::random_cu_seqlens(rng, c.batch, c.len_k) : p.cu_q;
  const auto tq = p.cu_q.back(), tk = p.cu_k.back();
  p.q = test::random_tensor(rng, c.dtype, {tq, c.hq, c.d});
  p.k = test::random_tensor(rng, c.dtype, {tk, c.hkv, c.d});
  p.v = test::random_tensor(rng, c.dtype, {tk, c.hkv, c.d});
  p.d_o = test::random_tensor(rng, c.dtype, {tq, c.hq, c.d});
  std::uniform_int_distribution<int> off(0, c.max_len);
  for (int b = 0; b < c.batch; ++b) {
    const int lq = p.cu_q[b + 1] - p.cu_q[b], lk = p.cu_k[b + 1] - p.cu_k[b];
    if (c.pos == Pos::shifted) {  // queries at an offset, keys strided: some rows see nothing
      const int oq = off(rng), ok = off(rng) / 2;
      for (int i = 0; i < lq; ++i) p.pos_q.push_back(oq + i);
      for (int i = 0; i < lk; ++i) p.pos_k.push_back(ok + 2 * i);
    } else if (c.pos == Pos::offset) {  // keys end where queries end (bottom-right alignment)
      for (int i = 0; i < lq; ++i) p.pos_q.push_back(lk - lq + i + 1000);
      for (int i = 0; i < lk; ++i) p.pos_k.push_back(i + 1000);
    }
  }
  auto& a = p.host;
  a.q = p.q.view;
  a.k = p.k.view;
  a.v = p.v.view;
  a.batch = c.batch;
  a.cu_seqlens_q = p.cu_q.data();
  a.cu_seqlens_k = p.cu_k.data();
  a.q_positions = p.pos_q.empty() ? nullptr : p.pos_q.data();
  a.k_positions = p.pos_k.empty() ? nullptr : p.pos_k.data();
  a.causal = c.causal;
  return p;
}

double max_abs_tol(DType t) { return t == DType::bf16 ? 2.5e-2 : 6e-3; }

class GpuVsReference : public ::testing::TestWithParam<std::tuple<std::string, Case>> {};

// Sets an environment variable for one scope (unset = nullptr), restoring what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = getenv(name)) old_ = old;
    had_ = getenv(name) != nullptr;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

TEST_P(GpuVsReference, ForwardAndBackward) {
  LONGATTN_SKIP_WITHOUT_GPU();
  const auto& [param_name, c] = GetParam();
  const bool det = param_name == "cuda-deterministic";
  const bool wgmma_bwd = param_name == "cuda-wgmma-bwd";
  const bool wgmma_fwd = !wgmma_bwd && param_name.rfind("cuda-wgmma", 0) == 0;
  const std::string backend_name = det || wgmma_fwd || wgmma_bwd ? std::string("cuda") : param_name;
  // The own kernels under test, chosen by parameter: mma.sync unless the case names a wgmma one.
  using Kernel = kernels::CudaKernelChoice::Kernel;
  kernels::CudaKernelChoice choice;
  choice.forward = wgmma_fwd ? Kernel::wgmma : Kernel::mma;
  choice.backward = wgmma_bwd ? Kernel::wgmma : Kernel::mma;
  choice.forward_schedule = param_name == "cuda-wgmma-pipeline" ? kernels::cuda::WgmmaSchedule::pipeline
                                                                : kernels::cuda::WgmmaSchedule::overlap;
  choice.deterministic = det;
  const auto available = available_backends();
  if (backend_name != "auto" && std::find(available.begin(), available.end(), backend_name) == available.end())
    GTEST_SKIP() << "backend " << backend_name << " is not available in this build/machine";
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  auto p = make_problem(rng, c);
  const auto tq = p.cu_q.back(), tk = p.cu_k.back();
  auto backend = backend_name == "cuda" ? kernels::make_cuda_backend(choice) : make_backend(backend_name, DeviceKind::cuda);

  DeviceTensor q(p.q), k(p.k), v(p.v), d_o(p.d_o);
  DeviceInts cu_q(p.cu_q), cu_k(p.cu_k), pos_q(p.pos_q), pos_k(p.pos_k);
  AttentionArgs a = p.host;
  a.q = q.view;
  a.k = k.view;
  a.v = v.view;
  a.cu_seqlens_q = cu_q.ptr;
  a.cu_seqlens_k = cu_k.ptr;
  a.q_positions = pos_q.ptr;
  a.k_positions = pos_k.ptr;
  if (c.batch > 1 && (rng() & 1)) {  // sometimes give the hints, sometimes let the backend derive them
    for (int b = 0; b < c.batch; ++b) {
      a.max_seqlen_q = std::max(a.max_seqlen_q, p.cu_q[b + 1] - p.cu_q[b]);
      a.max_seqlen_k = std::max(a.max_seqlen_k, p.cu_k[b + 1] - p.cu_k[b]);
    }
  }
  const auto why = backend->unsupported_reason(a);
  if (!why.empty()) GTEST_SKIP() << backend_name << " refuses: " << why;

  HostTensor o_ref(c.dtype, {tq, c.hq, c.d}), lse_ref(DType::f32, {c.hq, tq});
  kernels::reference_forward(p.host, {o_ref.view, lse_ref.view});

  for (DType odt : {c.dtype, DType::f32}) {
    auto o = DeviceTensor::poisoned(odt, {tq, c.hq, c.d});
    auto lse = DeviceTensor::poisoned(DType::f32, {c.hq, tq});
    backend->forward(a, {o.view, lse.view});
    GPU_OK(cudaDeviceSynchronize());
    const auto d_o_ = test::compare(o.to_host().to_f32(), o_ref.to_f32());
    const auto d_l = test::compare(lse.to_host().to_f32(), lse_ref.to_f32());
    EXPECT_LE(d_o_.max_abs, max_abs_tol(c.dtype)) << "o (" << to_string(odt) << ") differs from the reference";
    EXPECT_LE(d_l.max_abs, 1e-2) << "lse differs from the reference (or a -inf row is wrong)";
  }

  // Backward from the reference's o and lse, so both sides see identical inputs.
  HostTensor dq_ref(DType::f32, {tq, c.hq, c.d}), dk_ref(DType::f32, {tk, c.hkv, c.d}), dv_ref(DType::f32, {tk, c.hkv, c.d});
  kernels::reference_backward(p.host, {o_ref.view, lse_ref.view, p.d_o.view, {}, dq_ref.view, dk_ref.view, dv_ref.view, false});
  DeviceTensor o_dev(o_ref), lse_dev(lse_ref);
  const double gtol = (c.dtype == DType::bf16 ? 4e-2 : 1e-2);
  auto check_grads = [&](const DeviceTensor& dq, const DeviceTensor& dk, const DeviceTensor& dv, const HostTensor* base,
                         const char* what) {
    const HostTensor* want[] = {&dq_ref, &dk_ref, &dv_ref};
    const DeviceTensor* got[] = {&dq, &dk, &dv};
    const char* names[] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; ++i) {
      auto ref = want[i]->to_f32();
      if (base)
        for (std::size_t j = 0; j < ref.size(); ++j) ref[j] += base[i].at(j);
      const auto d = test::compare(got[i]->to_host().to_f32(), ref);
      EXPECT_LE(d.max_abs, gtol * std::max(1.0, d.max_ref)) << what << ": " << names[i] << " differs (max ref " << d.max_ref << ")";
    }
  };
  {
    auto dq = DeviceTensor::poisoned(DType::f32, {tq, c.hq, c.d});
    auto dk = DeviceTensor::poisoned(DType::f32, {tk, c.hkv, c.d});
    auto dv = DeviceTensor::poisoned(DType::f32, {tk, c.hkv, c.d});
    backend->backward(a, {o_dev.view, lse_dev.view, d_o.view, {}, dq.view, dk.view, dv.view, false});
    GPU_OK(cudaDeviceSynchronize());
    check_grads(dq, dk, dv, nullptr, "fp32 gradients");
    // Deterministic: a second run gives the same bits.
    auto dq2 = DeviceTensor::poisoned(DType::f32, {tq, c.hq, c.d});
    auto dk2 = DeviceTensor::poisoned(DType::f32, {tk, c.hkv, c.d});
    auto dv2 = DeviceTensor::poisoned(DType::f32, {tk, c.hkv, c.d});
    backend->backward(a, {o_dev.view, lse_dev.view, d_o.view, {}, dq2.view, dk2.view, dv2.view, false});
    GPU_OK(cudaDeviceSynchronize());
    if (det) {
      EXPECT_EQ(0, std::memcmp(dq.to_host().view.data, dq2.to_host().view.data, dq.view.bytes())) << "dq not deterministic";
      EXPECT_EQ(0, std::memcmp(dk.to_host().view.data, dk2.to_host().view.data, dk.view.bytes())) << "dk not deterministic";
    }
  }
  {
    // Accumulate into fp32 gradients that already hold values (the ring runtime's use), with delta given.
    HostTensor base[] = {test::random_tensor(rng, DType::f32, {tq, c.hq, c.d}), test::random_tensor(rng, DType::f32, {tk, c.hkv, c.d}),
                         test::random_tensor(rng, DType::f32, {tk, c.hkv, c.d})};
    DeviceTensor dq(base[0]), dk(base[1]), dv(base[2]);
    auto delta = DeviceTensor::poisoned(DType::f32, {c.hq, tq});
    backend->compute_delta(o_dev.view, d_o.view, delta.view, nullptr);
    backend->backward(a, {o_dev.view, lse_dev.view, d_o.view, delta.view, dq.view, dk.view, dv.view, true});
    GPU_OK(cudaDeviceSynchronize());
    check_grads(dq, dk, dv, base, "accumulated gradients");
  }
  {
    // Gradients in the input dtype.
    auto dq = DeviceTensor::poisoned(c.dtype, {tq, c.hq, c.d});
    auto dk = DeviceTensor::poisoned(c.dtype, {tk, c.hkv, c.d});
    auto dv = DeviceTensor::poisoned(c.dtype, {tk, c.hkv, c.d});
    backend->backward(a, {o_dev.view, lse_dev.view, d_o.view, {}, dq.view, dk.view, dv.view, false});
    GPU_OK(cudaDeviceSynchronize());
    check_grads(dq, dk, dv, nullptr, "16-bit gradients");
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (DType t : {DType::bf16, DType::f16})
    for (int d : {64, 128}) {
      out.push_back({1, 301, 4, 4, d, true, t, Pos::none});          // one sequence, odd length, causal
      out.push_back({1, 333, 4, 1, d, false, t, Pos::none, 517});    // MQA, more keys than queries
      out.push_back({5, 200, 8, 2, d, true, t, Pos::shifted});       // varlen (empty, 1-token), ring-step positions
    }
  out.push_back({3, 290, 4, 2, 128, true, DType::bf16, Pos::offset, 450});  // bottom-right causal via positions
  out.push_back({4, 150, 4, 4, 64, false, DType::f16, Pos::shifted});       // positions without causal
  out.push_back({2, 700, 2, 1, 128, true, DType::bf16, Pos::none});          // many tiles
  out.push_back({1, 1700, 2, 2, 128, false, DType::bf16, Pos::none});        // 14 key tiles: pipeline stages wrap twice
  out.push_back({4, 333, 8, 2, 128, true, DType::bf16, Pos::none});          // varlen causal by index (cuDNN ragged)
  out.push_back({3, 257, 4, 4, 64, false, DType::f16, Pos::none, 190});      // varlen, keys and queries differ
  out.push_back({3, 257, 4, 2, 128, true, DType::f16, Pos::none, 390});      // varlen causal, more keys than queries
  return out;
}

INSTANTIATE_TEST_SUITE_P(Gpu, GpuVsReference,
                         ::testing::Combine(::testing::Values("cuda", "cuda-deterministic", "cuda-wgmma", "cuda-wgmma-pipeline",
                                                              "cuda-wgmma-bwd", "cudnn", "auto"), ::testing::ValuesIn(cases())),
                         [](const auto& tp) {
                           std::string b = std::get<0>(tp.param);
                           std::replace(b.begin(), b.end(), '-', '_');
                           return b + "_" + name(std::get<1>(tp.param));
                         });

// Past its first few exact shapes the cudnn backend runs new single-sequence lengths through
// bucketed ragged graphs; every length must still match the reference, forward and backward.
TEST(GpuBackend, CudnnManyLengthsMatchTheReference) {
  LONGATTN_SKIP_WITHOUT_GPU();
  const auto available = available_backends();
  if (std::find(available.begin(), available.end(), "cudnn") == available.end()) GTEST_SKIP() << "no cudnn backend here";
  auto backend = make_backend("cudnn", DeviceKind::cuda);
  const auto seed = test::fresh_seed();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 12; ++i) {
    const int tq = 40 + static_cast<int>(rng() % 400), tk = (i % 3 == 0) ? tq : 40 + static_cast<int>(rng() % 400);
    const bool causal = i % 2 == 0;
    SCOPED_TRACE(fmt::format("call {}: tq {} tk {} causal {}", i, tq, tk, causal));
    auto q = test::random_tensor(rng, DType::bf16, {tq, 4, 64});
    auto k = test::random_tensor(rng, DType::bf16, {tk, 2, 64});
    auto v = test::random_tensor(rng, DType::bf16, {tk, 2, 64});
    auto d_o = test::random_tensor(rng, DType::bf16, {tq, 4, 64});
    AttentionArgs host;
    host.q = q.view;
    host.k = k.view;
    host.v = v.view;
    host.causal = causal;
    HostTensor o_ref(DType::bf16, {tq, 4, 64}), lse_ref(DType::f32, {4, tq});
    kernels::reference_forward(host, {o_ref.view, lse_ref.view});
    HostTensor dq_ref(DType::f32, {tq, 4, 64}), dk_ref(DType::f32, {tk, 2, 64}), dv_ref(DType::f32, {tk, 2, 64});
    kernels::reference_backward(host, {o_ref.view, lse_ref.view, d_o.view, {}, dq_ref.view, dk_ref.view, dv_ref.view, false});

    DeviceTensor qd(q), kd(k), vd(v), dod(d_o), o_in(o_ref), lse_in(lse_ref);
    AttentionArgs a = host;
    a.q = qd.view;
    a.k = kd.view;
    a.v = vd.view;
    auto o = DeviceTensor::poisoned(DType::f32, {tq, 4, 64});
    auto lse = DeviceTensor::poisoned(DType::f32, {4, tq});
    backend->forward(a, {o.view, lse.view});
    auto dq = DeviceTensor::poisoned(DType::f32, {tq, 4, 64});
    auto dk = DeviceTensor::poisoned(DType::f32, {tk, 2, 64});
    auto dv = DeviceTensor::poisoned(DType::f32, {tk, 2, 64});
    backend->backward(a, {o_in.view, lse_in.view, dod.view, {}, dq.view, dk.view, dv.view, false});
    GPU_OK(cudaDeviceSynchronize());
    EXPECT_LE(test::compare(o.to_host().to_f32(), o_ref.to_f32()).max_abs, 2.5e-2);
    EXPECT_LE(test::compare(lse.to_host().to_f32(), lse_ref.to_f32()).max_abs, 1e-2);
    for (auto [got, want] : {std::pair{&dq, &dq_ref}, std::pair{&dk, &dk_ref}, std::pair{&dv, &dv_ref}}) {
      const auto d = test::compare(got->to_host().to_f32(), want->to_f32());
      EXPECT_LE(d.max_abs, 4e-2 * std::max(1.0, d.max_ref));
    }
  }
}

TEST(GpuBackend, RefusesHostTensorsAndOtherHeadDims) {
  LONGATTN_SKIP_WITHOUT_GPU();
  auto backend = make_backend("cuda", DeviceKind::cuda);
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::bf16, {8, 2, 64});
  AttentionArgs a;
  a.q = a.k = a.v = q.view;
  EXPECT_FALSE(backend->unsupported_reason(a).empty()) << "host tensors accepted";
  DeviceTensor d(test::random_tensor(rng, DType::bf16, {8, 2, 40}));
  a.q = a.k = a.v = d.view;
  EXPECT_NE(backend->unsupported_reason(a).find("head_dim"), std::string::npos);
}

TEST(GpuBackend, UnknownKernelNameIsRefusedWithTheChoices) {
  LONGATTN_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test::fresh_seed());
  DeviceTensor x(test::random_tensor(rng, DType::bf16, {64, 2, 128}));
  DeviceTensor d_o(test::random_tensor(rng, DType::bf16, {64, 2, 128}));
  AttentionArgs a;
  a.q = a.k = a.v = x.view;
  struct Knob {
    const char* variable;
    const char* choices;
    const char* bad_value;
  };
  // The dropped "lockstep" schedule is refused like any unknown name.
  for (const auto& [variable, choices, bad_value] :
       {Knob{"LONGATTN_CUDA_FWD_KERNEL", "auto, mma, wgmma", "wgmma2"}, Knob{"LONGATTN_CUDA_BWD_KERNEL", "auto, mma, wgmma", "wgmma2"},
        Knob{"LONGATTN_CUDA_WGMMA_FWD_SCHEDULE", "one of pipeline, overlap", "wgmma2"},
        Knob{"LONGATTN_CUDA_WGMMA_FWD_SCHEDULE", "one of pipeline, overlap", "lockstep"}}) {
    SCOPED_TRACE(fmt::format("{}={}", variable, bad_value));
    ScopedEnv bad(variable, bad_value);
    // The schedule is read when the wgmma forward runs: pin it (a non-Hopper GPU skips that case).
    const bool schedule = std::string(variable) == "LONGATTN_CUDA_WGMMA_FWD_SCHEDULE";
    ScopedEnv fwd("LONGATTN_CUDA_FWD_KERNEL", schedule ? "wgmma" : getenv("LONGATTN_CUDA_FWD_KERNEL"));
    int device = 0, major = 0;
    GPU_OK(cudaGetDevice(&device));
    GPU_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (schedule && major != 9) continue;
    auto backend = make_backend("cuda", DeviceKind::cuda);
    auto o = DeviceTensor::poisoned(DType::bf16, {64, 2, 128});
    auto lse = DeviceTensor::poisoned(DType::f32, {2, 64});
    auto dq = DeviceTensor::poisoned(DType::f32, {64, 2, 128});
    auto dk = DeviceTensor::poisoned(DType::f32, {64, 2, 128});
    auto dv = DeviceTensor::poisoned(DType::f32, {64, 2, 128});
    try {
      // The forward reads only its own variable; with the backward's set wrong it runs, and the
      // backward is the call that must refuse.
      backend->forward(a, {o.view, lse.view});
      backend->backward(a, {o.view, lse.view, d_o.view, {}, dq.view, dk.view, dv.view, false});
      GPU_OK(cudaDeviceSynchronize());
      FAIL() << "an unknown kernel name was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
      EXPECT_NE(std::string(e.what()).find(choices), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(variable), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace longattn
