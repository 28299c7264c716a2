// What the C API's MPI tests share: a descriptor of a host tensor, and one session's handles (MPI's
// world, a cpu context) released at scope end.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <vector>

#include "longattn/backend.hpp"
#include "longattn/longattn.h"
#include "support/test_util.hpp"

namespace longattn::capi_test {

inline constexpr longattn_device kCpu{LONGATTN_DEVICE_CPU, 0};

inline longattn_tensor desc(const test::HostTensor& t) {
  const auto& v = t.view;
  return longattn_tensor_contiguous(v.data, static_cast<longattn_dtype>(v.dtype), kCpu, v.ndim, v.shape.data());
}

struct Session {
  longattn_comm* comm = nullptr;
  longattn_context* context = nullptr;
  int rank = 0, size = 1;
  Session() {
    EXPECT_EQ(longattn_comm_create_mpi_world(&comm), LONGATTN_OK) << longattn_last_error();
    EXPECT_EQ(longattn_context_create("cpu", kCpu, &context), LONGATTN_OK) << longattn_last_error();
    longattn_comm_rank(comm, &rank);
    longattn_comm_size(comm, &size);
  }
  ~Session() {
    longattn_context_destroy(context);
    longattn_comm_destroy(comm);
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  // One seed for every rank (rank 0's fresh one), so all ranks draw the same batch.
  std::uint64_t shared_seed() const {
    std::uint64_t seed = test::fresh_seed();
    MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    return seed;
  }
};

// The double-precision reference over the whole packed batch: o, lse and the gradients for d_o.
struct WholeBatchReference {
  test::HostTensor o, lse, dq, dk, dv;
};

inline WholeBatchReference whole_batch_reference(const test::HostTensor& q, const test::HostTensor& k,
                                                 const test::HostTensor& v, const test::HostTensor& d_o,
                                                 const std::vector<std::int32_t>& cu, bool causal) {
  const std::int64_t T = q.view.dim(0), hq = q.view.dim(1), hkv = k.view.dim(1), D = q.view.dim(2);
  WholeBatchReference r{test::HostTensor(DType::f32, {T, hq, D}), test::HostTensor(DType::f32, {hq, T}),
                        test::HostTensor(DType::f32, {T, hq, D}), test::HostTensor(DType::f32, {T, hkv, D}),
                        test::HostTensor(DType::f32, {T, hkv, D})};
  auto ref = make_backend("reference");
  AttentionArgs args;
  args.q = q.view;
  args.k = k.view;
  args.v = v.view;
  args.batch = static_cast<int>(cu.size()) - 1;
  args.cu_seqlens_q = args.cu_seqlens_k = cu.data();
  args.causal = causal;
  ref->forward(args, {r.o.view, r.lse.view});
  ref->backward(args, {r.o.view, r.lse.view, d_o.view, {}, r.dq.view, r.dk.view, r.dv.view, false});
  return r;
}

}  // namespace longattn::capi_test
