// Communicator handles of the C API: MPI's world (initializing MPI when the caller has not), a
// caller's MPI communicator, TCP from torchrun's environment, NCCL over a host communicator.
#include <fmt/format.h>

#include <memory>

#include "capi/guard.hpp"
#include "capi/handles.hpp"

namespace longattn::capi {
namespace {
// MPI initialized by the C API is finalized when the process exits: MPI cannot be initialized
// twice in a process, so tying it to a handle's life would forbid making a second one.
void ensure_mpi_initialized() {
  static std::unique_ptr<MpiSession> session = std::make_unique<MpiSession>(nullptr, nullptr);
}
}  // namespace
}  // namespace longattn::capi

using longattn::capi::guarded;
using longattn::capi::require_non_null;

extern "C" {

longattn_status longattn_comm_create_mpi_world(longattn_comm** out) {
  return guarded(__func__, [&] {
    require_non_null(out, "out");
    longattn::capi::ensure_mpi_initialized();
    auto handle = std::make_unique<longattn_comm>();
    handle->comm = longattn::make_mpi_world_communicator();
    *out = handle.release();
  });
}

longattn_status longattn_comm_create_mpi(int64_t mpi_fortran_handle, longattn_comm** out) {
  return guarded(__func__, [&] {
    require_non_null(out, "out");
    auto handle = std::make_unique<longattn_comm>();
    handle->comm = longattn::make_mpi_communicator(mpi_fortran_handle);
    *out = handle.release();
  });
}

longattn_status longattn_comm_create_tcp_from_env(int port_offset, longattn_comm** out) {
  return guarded(__func__, [&] {
    require_non_null(out, "out");
    auto handle = std::make_unique<longattn_comm>();
    handle->comm = longattn::make_tcp_communicator_from_env(port_offset);
    *out = handle.release();
  });
}

longattn_status longattn_comm_create_nccl(longattn_comm* host, longattn_comm** out) {
  return guarded(__func__, [&] {
    require_non_null(host, "host");
    require_non_null(out, "out");
    auto handle = std::make_unique<longattn_comm>();
    handle->comm = longattn::make_nccl_communicator(*host->comm);
    *out = handle.release();
  });
}

void longattn_comm_destroy(longattn_comm* comm) {
  // A communicator's destructor does not throw; the guard only keeps that a promise of the ABI.
  guarded(__func__, [&] { delete comm; });
}

longattn_status longattn_comm_rank(const longattn_comm* comm, int* rank) {
  return guarded(__func__, [&] {
    require_non_null(comm, "comm");
    require_non_null(rank, "rank");
    *rank = comm->comm->rank();
  });
}

longattn_status longattn_comm_size(const longattn_comm* comm, int* size) {
  return guarded(__func__, [&] {
    require_non_null(comm, "comm");
    require_non_null(size, "size");
    *size = comm->comm->size();
  });
}

longattn_status longattn_comm_set_timeout(longattn_comm* comm, int seconds) {
  return guarded(__func__, [&] {
    require_non_null(comm, "comm");
    comm->comm->set_timeout(std::chrono::seconds(seconds));
  });
}

}  // extern "C"
