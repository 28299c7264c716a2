// Logging by subsystem, with the rank in each line. Level from LONGATTN_LOG (trace, debug, info,
// warn, error, off; any case), subsystems from LONGATTN_LOG_SUBSYS (comma list, default all).
// Unknown values are refused with the valid ones, never read as "off".
#pragma once

#include <memory>

#include <spdlog/spdlog.h>

namespace longattn {

enum class Subsystem { kernels, partition, comm, ring, offload, app };
enum class LogLevel { trace, debug, info, warn, error, off };

// The logger of one subsystem (created on first use, level from the environment; throws Error
// when LONGATTN_LOG or LONGATTN_LOG_SUBSYS holds an unknown value).
spdlog::logger& logger(Subsystem s);
// Tags every later line with this process's rank ("[r3]").
void set_log_rank(int rank);

// LONGATTN_LOG as a level; an unknown name is an Error that lists the valid ones.
LogLevel log_level_from_environment();
// Whether LONGATTN_LOG_SUBSYS selects `s` ("all" or empty: every subsystem; names in any case);
// an unknown name in the list is an Error that lists the valid ones.
bool log_subsystem_enabled(Subsystem s);

}  // namespace longattn
