// Logging by subsystem, with the rank in each line. Level from LONGATTN_LOG (trace, debug, info,
// warn, error, off), subsystems from LONGATTN_LOG_SUBSYS (comma list, default all).
#pragma once

#include <memory>

#include <spdlog/spdlog.h>

namespace longattn {

enum class Subsystem { kernels, partition, comm, ring, offload, app };

// The logger of one subsystem (created on first use, level from the environment).
spdlog::logger& logger(Subsystem s);
// Tags every later line with this process's rank ("[r3]").
void set_log_rank(int rank);

}  // namespace longattn
