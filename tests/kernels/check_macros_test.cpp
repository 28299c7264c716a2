// The library checks of common/check.hpp: a failing status becomes an Error with the right code,
// naming the call, the library's own message and the place; success (and NCCL's "in progress" of a
// non-blocking communicator) passes. The libraries are stood in for by the few names the macros
// use, so the test runs on every machine; the macros name them only where they are expanded.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <utility>

#include "common/check.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

// Each stand-in status carries its number in its message, so the test sees which status was named.
std::string status_text(int status) { return "status " + std::to_string(status) + " from the library"; }

namespace fake_cuda {
enum cudaError_t : int { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
std::string last_text;
const char* cudaGetErrorString(cudaError_t e) { return (last_text = status_text(e)).c_str(); }
// As CUDA's: the thread's last error, returned and reset by cudaGetLastError.
cudaError_t cudaGetLastError_value;
cudaError_t cudaGetLastError() { return std::exchange(cudaGetLastError_value, cudaSuccess); }
}  // namespace fake_cuda

namespace fake_cudnn {
enum cudnnStatus_t : int { CUDNN_STATUS_SUCCESS = 0 };
std::string last_text;
const char* cudnnGetErrorString(cudnnStatus_t st) { return (last_text = status_text(st)).c_str(); }
}  // namespace fake_cudnn

namespace fake_nccl {
enum ncclResult_t : int { ncclSuccess = 0, ncclInProgress = 7 };
std::string last_text;
const char* ncclGetErrorString(ncclResult_t r) { return (last_text = status_text(r)).c_str(); }
}  // namespace fake_nccl

namespace fake_mpi {
constexpr int MPI_SUCCESS = 0;
constexpr int MPI_MAX_ERROR_STRING = 64;
int MPI_Error_string(int code, char* text, int* length) {
  const auto s = status_text(code);
  s.copy(text, MPI_MAX_ERROR_STRING - 1);
  *length = static_cast<int>(s.size());
  return MPI_SUCCESS;
}
}  // namespace fake_mpi

// A failing status the stand-ins do not treat as success or progress.
int random_failure(std::mt19937_64& rng) { return std::uniform_int_distribution<int>(8, 999)(rng); }

// Runs `call`, which must throw; returns the Error.
template <class Call>
Error thrown_by(Call&& call) {
  try {
    call();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no Error was thrown";
  return Error(ErrorCode::internal, "");
}

TEST(CheckMacros, CudaFailureNamesTheCallTheStatusAndThePlace) {
  using namespace fake_cuda;
  std::mt19937_64 rng(test::fresh_seed());
  const auto status = static_cast<cudaError_t>(random_failure(rng));
  LONGATTN_CUDA_CHECK(cudaSuccess);
  const int line = __LINE__ + 1;
  const Error e = thrown_by([&] { LONGATTN_CUDA_CHECK(static_cast<cudaError_t>(status)); });
  EXPECT_EQ(e.code(), ErrorCode::internal);
  const std::string what = e.what();
  EXPECT_NE(what.find("static_cast<cudaError_t>(status) failed: " + status_text(status)), std::string::npos) << what;
  EXPECT_NE(what.find("check_macros_test.cpp:" + std::to_string(line)), std::string::npos) << what;

  cudaGetLastError_value = status;
  EXPECT_EQ(thrown_by([] { LONGATTN_CUDA_CHECK_LAUNCH(); }).code(), ErrorCode::internal);
  cudaGetLastError_value = cudaSuccess;
  LONGATTN_CUDA_CHECK_LAUNCH();
}

TEST(CheckMacros, CudaOutOfMemoryIsOutOfCapacityAndLeavesNoLastError) {
  using namespace fake_cuda;
  cudaGetLastError_value = cudaErrorMemoryAllocation;  // what CUDA keeps after a failed cudaMalloc
  const Error e = thrown_by([] { LONGATTN_CUDA_CHECK(cudaErrorMemoryAllocation); });
  // The problem's size against the card, not a bug: callers (a trainer) can tell it apart.
  EXPECT_EQ(e.code(), ErrorCode::out_of_capacity);
  EXPECT_NE(std::string(e.what()).find("cudaErrorMemoryAllocation failed: " + status_text(cudaErrorMemoryAllocation)),
            std::string::npos)
      << e.what();
  // A process that goes on is not told about the allocation again at its next launch check.
  EXPECT_EQ(cudaGetLastError_value, cudaSuccess);
  LONGATTN_CUDA_CHECK_LAUNCH();
}

// Checks that a failing status thrown by `check` is an Error of `code` naming the status's text.
template <class Check>
void expect_failure_named(Check&& check, int status, ErrorCode code) {
  const Error e = thrown_by(check);
  EXPECT_EQ(e.code(), code);
  EXPECT_NE(std::string(e.what()).find(" failed: " + status_text(status)), std::string::npos) << e.what();
}

TEST(CheckMacros, CudnnNcclAndMpiFailuresCarryTheirCodeAndText) {
  std::mt19937_64 rng(test::fresh_seed());
  const int status = random_failure(rng);
  {
    using namespace fake_cudnn;
    LONGATTN_CUDNN_CHECK(CUDNN_STATUS_SUCCESS);
    expect_failure_named([&] { LONGATTN_CUDNN_CHECK(static_cast<cudnnStatus_t>(status)); }, status, ErrorCode::internal);
  }
  {
    using namespace fake_nccl;
    LONGATTN_NCCL_CHECK(ncclSuccess);
    LONGATTN_NCCL_CHECK(ncclInProgress);  // a non-blocking operation still running
    expect_failure_named([&] { LONGATTN_NCCL_CHECK(static_cast<ncclResult_t>(status)); }, status, ErrorCode::communication);
  }
  {
    using namespace fake_mpi;
    LONGATTN_MPI_CHECK(MPI_SUCCESS);
    expect_failure_named([&] { LONGATTN_MPI_CHECK(status); }, status, ErrorCode::communication);
  }
}

TEST(CheckMacros, UnsupportedKeepsTheMessage) {
  const Error e = thrown_by([] { throw_unsupported("head dim 96 is not built"); });
  EXPECT_EQ(e.code(), ErrorCode::unsupported);
  EXPECT_STREQ(e.what(), "head dim 96 is not built");
}

}  // namespace
}  // namespace longattn
