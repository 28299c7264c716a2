// main() for multi-process suites: MPI up, other ranks print failures only, and the process exit code is
// failure on every rank when any rank failed (so mpirun reports it).
#include <gtest/gtest.h>

#include "longattn/communicator.hpp"

int main(int argc, char** argv) {
  longattn::MpiSession mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  auto world = longattn::make_mpi_world_communicator();
  if (world->rank() != 0) GTEST_FLAG_SET(brief, true);  // other ranks print their failures only
  std::int64_t failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  world->allreduce(&failed, 1, longattn::ReduceType::i64, longattn::ReduceOp::max);
  return failed ? 1 : 0;
}
