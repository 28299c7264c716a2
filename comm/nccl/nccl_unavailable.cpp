// Builds without NCCL: the factory explains how to get it.
#include "common/check.hpp"
#include "longattn/communicator.hpp"

namespace longattn {
bool nccl_available() { return false; }
std::unique_ptr<Communicator> make_nccl_communicator(Communicator&) {
  throw Error(ErrorCode::unsupported,
              "this longattn was built without NCCL; rebuild where CUDA and NCCL are installed (nccl.h, libnccl)");
}
}  // namespace longattn
