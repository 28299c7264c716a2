// The C API on a GPU: a CUDA context, device tensors (allocated through the public device
// operations, so the test needs no CUDA runtime of its own) and the default stream, forward and
// backward of a causal GQA batch in bf16 against the double reference. One rank (more would need a
// GPU each and NCCL); skips where the build or the machine has no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <vector>

#include "capi/capi_session.hpp"
#include "longattn/backend.hpp"
#include "longattn/device_ops.hpp"
#include "longattn/longattn.h"
#include "support/test_util.hpp"

namespace longattn {
namespace {

using test::HostTensor;

// A host tensor's copy in GPU memory, with its descriptor.
struct OnGpu {
  std::unique_ptr<DeviceBuffer> buf;
  TensorView view;
  longattn_tensor desc{};
  explicit OnGpu(const HostTensor& h) : buf(device_ops_for(DeviceKind::cuda).allocate(std::max<std::size_t>(h.view.bytes(), 64))), view(h.view) {
    auto& ops = device_ops_for(DeviceKind::cuda);
    ops.copy_bytes(buf->data(), h.view.data, h.view.bytes(), nullptr);
    ops.synchronize(nullptr);
    view.data = buf->data();
    desc = longattn_tensor_contiguous(buf->data(), static_cast<longattn_dtype>(h.view.dtype), {LONGATTN_DEVICE_CUDA, 0}, h.view.ndim,
                                      h.view.shape.data());
  }
  std::vector<float> to_f32() const {
    HostTensor h(view.dtype, {view.numel()});
    auto& ops = device_ops_for(DeviceKind::cuda);
    ops.copy_bytes(h.view.data, buf->data(), view.bytes(), nullptr);
    ops.synchronize(nullptr);
    return h.to_f32();
  }
};

TEST(CapiGpu, CausalGqaBatchForwardBackwardOnTheDefaultStream) {
  longattn_comm* world = nullptr;
  ASSERT_EQ(longattn_comm_create_mpi_world(&world), LONGATTN_OK) << longattn_last_error();
  int size = 0;
  longattn_comm_size(world, &size);
  longattn_context* ctx = nullptr;
  const auto made = longattn_context_create("auto", {LONGATTN_DEVICE_CUDA, 0}, &ctx);
  if (made == LONGATTN_ERROR_UNSUPPORTED || size != 1) {
    longattn_comm_destroy(world);
    GTEST_SKIP() << (size != 1 ? "one rank only" : longattn_last_error());
  }
  ASSERT_EQ(made, LONGATTN_OK) << longattn_last_error();

  const std::uint64_t seed = test::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  const std::vector<std::int32_t> cu = test::random_cu_seqlens(rng, 3, 300);
  const std::int64_t T = cu.back(), Hq = 8, Hkv = 2, D = 64;
  auto q = test::random_tensor(rng, DType::bf16, {T, Hq, D}), k = test::random_tensor(rng, DType::bf16, {T, Hkv, D});
  auto v = test::random_tensor(rng, DType::bf16, {T, Hkv, D}), d_o = test::random_tensor(rng, DType::bf16, {T, Hq, D});

  const auto r = capi_test::whole_batch_reference(q, k, v, d_o, cu, true);

  longattn_attention_params p;
  longattn_attention_params_init(&p);
  p.cu_seqlens = cu.data();
  p.batch = static_cast<int>(cu.size()) - 1;
  p.q_heads = static_cast<int>(Hq);
  p.kv_heads = static_cast<int>(Hkv);
  p.head_dim = static_cast<int>(D);
  p.dtype = LONGATTN_DTYPE_BF16;
  p.causal = 1;
  longattn_attention* a = nullptr;
  ASSERT_EQ(longattn_attention_create(ctx, world, &p, &a), LONGATTN_OK) << longattn_last_error();
  OnGpu gq(q), gk(k), gv(v), gdo(d_o);
  OnGpu go(test::poisoned_tensor(DType::bf16, {T, Hq, D})), gl(test::poisoned_tensor(DType::f32, {Hq, T}));
  OnGpu gdq(test::poisoned_tensor(DType::f32, {T, Hq, D})), gdk(test::poisoned_tensor(DType::f32, {T, Hkv, D})),
      gdv(test::poisoned_tensor(DType::f32, {T, Hkv, D}));
  EXPECT_EQ(longattn_attention_forward(a, &gq.desc, &gk.desc, &gv.desc, &go.desc, &gl.desc, nullptr), LONGATTN_OK)
      << longattn_last_error();
  EXPECT_EQ(longattn_attention_backward(a, &gq.desc, &gk.desc, &gv.desc, &go.desc, &gl.desc, &gdo.desc, &gdq.desc, &gdk.desc,
                                        &gdv.desc, nullptr),
            LONGATTN_OK)
      << longattn_last_error();
  device_ops_for(DeviceKind::cuda).synchronize(nullptr);
  EXPECT_LE(test::compare(go.to_f32(), r.o.to_f32()).max_abs, 2e-2) << "o";
  for (auto [got, want, what] : {std::tuple{&gdq, &r.dq, "dq"}, {&gdk, &r.dk, "dk"}, {&gdv, &r.dv, "dv"}}) {
    const auto d = test::compare(got->to_f32(), want->to_f32());
    EXPECT_LE(d.max_abs, 8e-2 * std::max(1.0, d.max_ref)) << what;
  }
  longattn_attention_destroy(a);
  longattn_context_destroy(ctx);
  longattn_comm_destroy(world);
}

}  // namespace
}  // namespace longattn
