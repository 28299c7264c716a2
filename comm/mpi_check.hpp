// MPI_CHECK: turns an MPI error code into longattn::Error(communication) with the call and place.
#pragma once

#include <mpi.h>

#include "common/check.hpp"

namespace longattn::comm {
[[noreturn]] void throw_mpi_error(int code, const char* call, const char* file, int line);
}

#define MPI_CHECK(call)                                                                          \
  do {                                                                                           \
    const int mpi_check_rc_ = (call);                                                            \
    if (mpi_check_rc_ != MPI_SUCCESS) ::longattn::comm::throw_mpi_error(mpi_check_rc_, #call, __FILE__, __LINE__); \
  } while (0)
