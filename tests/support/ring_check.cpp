// The shared distributed-attention check (see ring_check.hpp).
#include "support/ring_check.hpp"

#include <gtest/gtest.h>

#include <functional>

#include <fmt/format.h>

#include "longattn/backend.hpp"
#include "longattn/ring.hpp"
#include "support/test_util.hpp"

namespace longattn::test {

std::string describe(const RingCase& c) {
  return fmt::format("{} {} tokens={} batch={} h={}x{} d={} {} grads {}", to_string(c.layout), c.causal ? "causal" : "full",
                     c.cu.back(), c.cu.size() - 1, c.hq, c.hkv, c.d, to_string(c.dtype), to_string(c.grad_dtype));
}

std::string describe(const ParallelCase& c) {
  return fmt::format("{} U={} {}", to_string(c.strategy), c.ulysses_size, describe(c.shape));
}

namespace {

HostTensor take_rows(const HostTensor& full, const RankShard& s) {
  HostTensor out(full.view.dtype, {s.tokens(), full.view.dim(1), full.view.dim(2)});
  shard_rows(full.view.data, out.view.data, static_cast<std::size_t>(full.view.dim(1) * full.view.dim(2)) * dtype_size(full.view.dtype), s);
  return out;
}

// A copy of a host tensor on the backend's device (or a plain copy on CPU backends).
struct OnDevice {
  std::unique_ptr<DeviceBuffer> buf;
  TensorView view;
  OnDevice(AttentionBackend& be, const HostTensor& h) : buf(be.device_ops().allocate(std::max<std::size_t>(h.view.bytes(), 64))), view(h.view) {
    view.data = buf->data();
    view.device = be.device();
    be.device_ops().copy_bytes(view.data, h.view.data, h.view.bytes(), nullptr);
    be.device_ops().synchronize(nullptr);
  }
  HostTensor to_host(AttentionBackend& be) const {
    HostTensor h(view.dtype, {view.dim(0), view.dim(1), view.ndim == 3 ? view.dim(2) : 1});
    if (view.ndim == 2) h.view = TensorView(h.view.data, view.dtype, {view.dim(0), view.dim(1)});
    be.device_ops().copy_bytes(h.view.data, view.data, view.bytes(), nullptr);
    be.device_ops().synchronize(nullptr);
    return h;
  }
};

// What the check runs: a distributed attention whose rank holds `plan`'s shard of the batch.
struct UnderTest {
  const ShardPlan& plan;
  AttentionBackend& backend;
  std::function<void(TensorView, TensorView, TensorView, TensorView, TensorView)> forward;
  std::function<void(TensorView, TensorView, TensorView, TensorView, TensorView, TensorView, TensorView, TensorView, TensorView)>
      backward;
};

void check_against_reference(Communicator& comm, const RingCase& c, std::uint64_t seed, const UnderTest& run) {
  std::mt19937_64 rng(seed);
  const std::int64_t T = c.cu.back();
  auto q = random_tensor(rng, c.dtype, {T, c.hq, c.d});
  auto k = random_tensor(rng, c.dtype, {T, c.hkv, c.d});
  auto v = random_tensor(rng, c.dtype, {T, c.hkv, c.d});
  auto d_o = random_tensor(rng, c.dtype, {T, c.hq, c.d});

  // The oracle on the whole batch.
  auto ref = make_backend("reference");
  AttentionArgs a;
  a.q = q.view;
  a.k = k.view;
  a.v = v.view;
  a.batch = static_cast<int>(c.cu.size()) - 1;
  a.cu_seqlens_q = c.cu.data();
  a.cu_seqlens_k = c.cu.data();
  a.causal = c.causal;
  HostTensor ro(DType::f32, {T, c.hq, c.d}), rl(DType::f32, {c.hq, T});
  ref->forward(a, {ro.view, rl.view});
  HostTensor rdq(DType::f32, {T, c.hq, c.d}), rdk(DType::f32, {T, c.hkv, c.d}), rdv(DType::f32, {T, c.hkv, c.d});
  ref->backward(a, {ro.view, rl.view, d_o.view, {}, rdq.view, rdk.view, rdv.view, false});

  const auto shard = run.plan.shard(comm.rank());
  const auto n = shard.tokens();
  auto& be = run.backend;
  OnDevice lq(be, take_rows(q, shard)), lk(be, take_rows(k, shard)), lv(be, take_rows(v, shard)), ldo(be, take_rows(d_o, shard));
  OnDevice o(be, poisoned_tensor(c.dtype, {n, c.hq, c.d}));
  HostTensor lse_poison = poisoned_tensor(DType::f32, {c.hq, n});
  OnDevice lse(be, lse_poison);
  lse.view = TensorView(lse.view.data, DType::f32, {c.hq, n}, be.device());
  run.forward(lq.view, lk.view, lv.view, o.view, lse.view);

  const bool low = c.dtype != DType::f32;
  const double tol = low ? 2e-2 : 3e-5;
  EXPECT_LE(compare(o.to_host(be).to_f32(), take_rows(ro, shard).to_f32()).max_abs, tol) << "o";
  // lse is [H, n]: compare per head. (No ASSERT_* before the collective backward below: a rank
  // that returned early would leave its peers waiting.)
  const auto lse_local = lse.to_host(be).to_f32();
  const auto lse_ref = rl.to_f32();
  std::vector<float> lse_want(lse_local.size());
  for (int h = 0; h < c.hq; ++h)
    for (std::int64_t i = 0; i < n; ++i)
      lse_want[static_cast<std::size_t>(h * n + i)] = lse_ref[static_cast<std::size_t>(h * T + shard.global_index[static_cast<std::size_t>(i)])];
  EXPECT_LE(compare(lse_local, lse_want).max_abs, tol * 10) << "lse";

  // Backward from our own forward results, as a trainer would.
  const DType g = c.grad_dtype;
  OnDevice dq(be, poisoned_tensor(g, {n, c.hq, c.d})), dk(be, poisoned_tensor(g, {n, c.hkv, c.d})),
      dv(be, poisoned_tensor(g, {n, c.hkv, c.d}));
  run.backward(lq.view, lk.view, lv.view, o.view, lse.view, ldo.view, dq.view, dk.view, dv.view);
  const double gtol = low || g != DType::f32 ? 8e-2 : 2e-4;
  for (auto [got, want, what] : {std::tuple{&dq, &rdq, "dq"}, {&dk, &rdk, "dk"}, {&dv, &rdv, "dv"}}) {
    const auto d = compare(got->to_host(be).to_f32(), take_rows(*want, shard).to_f32());
    EXPECT_LE(d.max_abs, gtol * std::max(1.0, d.max_ref)) << what;
  }
}

}  // namespace

void check_ring_against_reference(Communicator& comm, const RingCase& c, std::uint64_t seed, const std::string& backend_name,
                                  DeviceKind device, void* stream) {
  SCOPED_TRACE(describe(c) + fmt::format(" seed {} rank {}/{}", seed, comm.rank(), comm.size()));
  ShardPlan plan(c.cu, c.layout, comm.size());
  RingOptions opt;
  opt.causal = c.causal;
  opt.stream = stream;
  RingAttention ring(comm, plan, opt, make_backend(backend_name, device));
  check_against_reference(comm, c, seed,
                          {plan, ring.backend(), [&](auto... t) { ring.forward(t...); }, [&](auto... t) { ring.backward(t...); }});
}

int check_parallel_against_reference(Communicator& comm, const ParallelCase& c, std::uint64_t seed, const std::string& backend_name,
                                     DeviceKind device, void* stream) {
  SCOPED_TRACE(describe(c) + fmt::format(" seed {} rank {}/{}", seed, comm.rank(), comm.size()));
  const RingCase& s = c.shape;
  AttentionProblem problem{s.cu, s.hq, s.hkv, s.d, s.dtype, s.causal, s.layout};
  ParallelOptions options;
  options.strategy = c.strategy;
  options.ulysses_size = c.ulysses_size;
  options.ring.stream = stream;
  ParallelAttention attention(comm, problem, options, make_backend(backend_name, device));
  check_against_reference(comm, s, seed,
                          {attention.shards(), attention.backend(), [&](auto... t) { attention.forward(t...); },
                           [&](auto... t) { attention.backward(t...); }});
  return attention.ulysses_size();
}

}  // namespace longattn::test
