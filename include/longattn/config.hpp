// Every LONGATTN_* environment variable is read here and only here (see docs/environment.md).
#pragma once

#include <string>
#include <vector>

namespace longattn {

struct EnvVarInfo {
  const char* name;
  const char* default_value;
  const char* meaning;
};

// The documented table of all variables.
const std::vector<EnvVarInfo>& environment_variables();

// Value of a documented variable (its default when unset). Throws for undocumented names, so a
// variable cannot be read without being listed.
std::string env_string(const char* name);
// An integer variable; a value that is not an integer, or lies outside the variable's documented
// range (LONGATTN_NUM_THREADS >= 0, ...), is an Error naming the variable and the range.
long env_int(const char* name);

// Reads every variable whose values are a fixed set or range (log level, log subsystems, thread
// count, timeouts, switches) and throws an Error naming the first bad one and what it accepts.
// Programs call it at start, so a typo is refused at once rather than silently changing behaviour.
void check_environment();

// CPU threads one process should use: LONGATTN_NUM_THREADS when set (> 0), otherwise the cores of
// this machine divided among the processes that share it (at least 1).
int cpu_threads_per_process(int processes_on_node);

}  // namespace longattn
