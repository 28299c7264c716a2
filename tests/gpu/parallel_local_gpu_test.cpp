// ParallelAttention on a GPU with several ranks: ranks are threads sharing the device, each with
// its own compute stream, linked by stream-ordered in-process communicators (NCCL's contract), so
// the head all-to-alls (strided packing on the stream, transfers ordered by events) and the ring
// over the groups run under real asynchrony. Checked against the CPU double-precision reference,
// forward and backward, for ring, Ulysses and a hybrid with GQA and a packed batch.
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

struct GpuParallelCase {
  int ranks;
  Strategy strategy;
  int ulysses_size;
};

class GpuLocalParallel : public ::testing::TestWithParam<std::tuple<GpuParallelCase, Layout>> {};

TEST_P(GpuLocalParallel, MatchesReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto [run, layout] = GetParam();
  const auto seed = test::fresh_seed();
  auto comms = make_local_communicators(run.ranks, /*stream_ordered=*/true);
  std::vector<std::thread> threads;
  for (auto& c : comms) {
    threads.emplace_back([&, comm = c.get()] {
      cudaSetDevice(0);
      cudaStream_t stream;
      cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
      // GQA (2 kv heads for 8 query heads: replicated when U = 4), a packed causal batch with a
      // one-token sequence, bf16 with fp32 gradients.
      test::check_parallel_against_reference(
          *comm, {{layout, true, {0, 1, 300, 517}, 8, 2, 64, DType::bf16}, run.strategy, run.ulysses_size}, seed, "cuda",
          DeviceKind::cuda, stream);
      // MQA, one unmasked odd-length sequence, fp16 inputs and gradients.
      test::check_parallel_against_reference(
          *comm, {{layout, false, {0, 333}, 8, 1, 128, DType::f16, DType::f16}, run.strategy, run.ulysses_size}, seed + 1,
          "cuda", DeviceKind::cuda, stream);
      cudaStreamDestroy(stream);
    });
  }
  for (auto& t : threads) t.join();
}

INSTANTIATE_TEST_SUITE_P(All, GpuLocalParallel,
                         ::testing::Combine(::testing::Values(GpuParallelCase{2, Strategy::ulysses, 0},
                                                              GpuParallelCase{4, Strategy::ulysses, 0},
                                                              GpuParallelCase{4, Strategy::hybrid, 2},
                                                              GpuParallelCase{3, Strategy::ring, 0}),
                                            ::testing::Values(Layout::contiguous, Layout::zigzag, Layout::striped)),
                         [](const auto& param_info) {
                           const auto& c = std::get<0>(param_info.param);
                           return std::string(to_string(c.strategy)) + "_P" + std::to_string(c.ranks) + "_U" +
                                  std::to_string(c.ulysses_size) + "_" + to_string(std::get<1>(param_info.param));
                         });

}  // namespace
}  // namespace longattn
