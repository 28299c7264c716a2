// Every check macro of longattn: LONGATTN_REQUIRE / LONGATTN_INVALID for our own conditions, and
// LONGATTN_CUDA_CHECK, LONGATTN_CUDNN_CHECK, LONGATTN_NCCL_CHECK, LONGATTN_MPI_CHECK for the status
// codes of the libraries we call. Each throws longattn::Error with a message that names what
// failed; the library checks add the call, the library's own explanation and file:line.
//
// The library macros name their library's symbols only where they are expanded, so this header
// includes none of those libraries and comm/ and kernels/ share it. nvcc-compiled files see only
// the library macros: fmt's compile-time format checks do not survive nvcc, so the formatting
// macros are left out of device code.
#pragma once

#include "longattn/error.hpp"

namespace longattn {

// Throws Error(code, "<call> failed: <status_text> (<file>:<line>)"). Kept out of line so that the
// macros expand to a test and a call.
[[noreturn]] void throw_call_failed(ErrorCode code, const char* call, const char* status_text, const char* file, int line);
// Throws Error(unsupported, what): for code that cannot format (device code compiled by nvcc).
[[noreturn]] void throw_unsupported(const char* what);

}  // namespace longattn

#ifndef __CUDACC__
#include <fmt/format.h>

#define LONGATTN_REQUIRE(cond, code, ...)                                     \
  do {                                                                        \
    if (!(cond)) throw ::longattn::Error((code), ::fmt::format(__VA_ARGS__)); \
  } while (0)

#define LONGATTN_INVALID(cond, ...) LONGATTN_REQUIRE(cond, ::longattn::ErrorCode::invalid_argument, __VA_ARGS__)
#endif

// What the CUDA, cuDNN and NCCL checks share: the call evaluated once, and a status that is
// neither `ok` nor `also_ok` thrown with the library's own text for it. `call_text` is the call as
// written (stringified by each check, before any of the library's own macros expand in it).
#define LONGATTN_LIBRARY_CHECK_(status_type, call, call_text, ok, also_ok, code, status_text)               \
  do {                                                                                                   \
    const status_type longattn_status_ = (call);                                                         \
    if (longattn_status_ != (ok) && longattn_status_ != (also_ok))                                       \
      ::longattn::throw_call_failed((code), call_text, status_text(longattn_status_), __FILE__, __LINE__); \
  } while (0)

// A failing CUDA runtime or cuDNN call is a bug or a broken device or setup, never the caller's
// input: internal; except a full GPU memory, which is the problem's size against the card
// (out_of_capacity, so that callers can tell "too long for these GPUs" from a bug). That error is
// not sticky, but CUDA also keeps it as the thread's last error: cleared here, or the next launch
// check of a process that goes on (a trainer catching the error) would report it again.
#define LONGATTN_CUDA_CHECK(call)                                                                          \
  do {                                                                                                     \
    const cudaError_t longattn_cuda_status_ = (call);                                                      \
    if (longattn_cuda_status_ == cudaErrorMemoryAllocation) {                                              \
      (void)cudaGetLastError();                                                                            \
      ::longattn::throw_call_failed(::longattn::ErrorCode::out_of_capacity, #call,                         \
                                    cudaGetErrorString(longattn_cuda_status_), __FILE__, __LINE__);        \
    }                                                                                                      \
    if (longattn_cuda_status_ != cudaSuccess)                                                              \
      ::longattn::throw_call_failed(::longattn::ErrorCode::internal, #call, cudaGetErrorString(longattn_cuda_status_), \
                                    __FILE__, __LINE__);                                                   \
  } while (0)
#define LONGATTN_CUDNN_CHECK(call)                                                                       \
  LONGATTN_LIBRARY_CHECK_(cudnnStatus_t, call, #call, CUDNN_STATUS_SUCCESS, CUDNN_STATUS_SUCCESS,                   \
                          ::longattn::ErrorCode::internal, cudnnGetErrorString)

// After a kernel launch: catches bad launch configurations at once (asynchronous faults surface
// at the next synchronizing call).
#define LONGATTN_CUDA_CHECK_LAUNCH() LONGATTN_CUDA_CHECK(cudaGetLastError())

// ncclInProgress is not a failure: a non-blocking communicator returns it while the operation
// goes on, and the caller polls for its end.
#define LONGATTN_NCCL_CHECK(call)                                                                         \
  LONGATTN_LIBRARY_CHECK_(ncclResult_t, call, #call, ncclSuccess, ncclInProgress, ::longattn::ErrorCode::communication, \
                          ncclGetErrorString)

#define LONGATTN_MPI_CHECK(call)                                                                      \
  do {                                                                                                \
    const int longattn_mpi_status_ = (call);                                                          \
    if (longattn_mpi_status_ != MPI_SUCCESS) {                                                        \
      char longattn_mpi_text_[MPI_MAX_ERROR_STRING] = {};                                             \
      int longattn_mpi_text_length_ = 0;                                                              \
      MPI_Error_string(longattn_mpi_status_, longattn_mpi_text_, &longattn_mpi_text_length_);         \
      ::longattn::throw_call_failed(::longattn::ErrorCode::communication, #call, longattn_mpi_text_,  \
                                    __FILE__, __LINE__);                                              \
    }                                                                                                 \
  } while (0)
