// The ring runtime on a GPU with several ranks: ranks are threads sharing the device, each with its
// own compute stream, linked by stream-ordered in-process communicators (NCCL's contract: transfers
// wait for events on the callers' streams, completion is an event). Checks the ring's buffer reuse
// under real asynchrony against the CPU reference, every layout, forward and backward.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <thread>

#include "longattn/backend.hpp"
#include "longattn/communicator.hpp"
#include "support/ring_check.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

class GpuLocalRing : public ::testing::TestWithParam<std::tuple<int, Layout, int>> {};

TEST_P(GpuLocalRing, MatchesReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [ranks, layout, dim] = GetParam();
  const auto seed = test::fresh_seed();
  auto comms = make_local_communicators(ranks, /*stream_ordered=*/true);
  std::vector<std::thread> threads;
  for (auto& c : comms) {
    threads.emplace_back([&, comm = c.get()] {
      cudaSetDevice(0);
      cudaStream_t stream;
      cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
      test::check_ring_against_reference(*comm, {layout, true, {0, 1, 300, 517}, 4, 2, dim, DType::bf16}, seed, "cuda",
                                         DeviceKind::cuda, stream);
      test::check_ring_against_reference(*comm, {layout, false, {0, 333}, 2, 1, dim, DType::f16}, seed + 1, "cuda",
                                         DeviceKind::cuda, stream);
      // One causal sequence under "auto": every step cut into plain blocks (row ranges, lse
      // copies with copy_2d), which cuDNN takes where built.
      test::check_ring_against_reference(*comm, {layout, true, {0, 701}, 4, 2, dim, DType::bf16}, seed + 2, "auto",
                                         DeviceKind::cuda, stream);
      cudaStreamDestroy(stream);
    });
  }
  for (auto& t : threads) t.join();
}

INSTANTIATE_TEST_SUITE_P(All, GpuLocalRing,
                         ::testing::Combine(::testing::Values(2, 3), ::testing::Values(Layout::contiguous, Layout::zigzag, Layout::striped),
                                            ::testing::Values(64, 128)),
                         [](const auto& param_info) {
                           return std::string(to_string(std::get<1>(param_info.param))) + "_P" +
                                  std::to_string(std::get<0>(param_info.param)) + "_d" + std::to_string(std::get<2>(param_info.param));
                         });

}  // namespace
}  // namespace longattn
