// Logging by subsystem, with the rank in each line. Level from LONGATTN_LOG (trace, debug, info,
// warn, error, off; any case), subsystems from LONGATTN_LOG_SUBSYS (comma list, default all).
// Unknown values are refused with the valid ones, never read as "off".
#pragma once

#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace longattn {

enum class Subsystem { kernels, partition, comm, ring, offload, app };
enum class LogLevel { trace, debug, info, warn, error, off };

// One subsystem's log. Arguments are formatted only when the line passes the level, so a debug
// line costs a comparison when debug is off. The sink (stderr, time, rank, subsystem, level) is an
// implementation detail of common/log.cpp.
class Logger {
 public:
  explicit Logger(Subsystem subsystem, LogLevel threshold) : subsystem_(subsystem), threshold_(threshold) {}

  bool enabled(LogLevel level) const noexcept { return level >= threshold_ && level != LogLevel::off; }
  // Writes one formatted line; thread-safe.
  void write(LogLevel level, std::string_view message) const;

  template <class... Args> void trace(fmt::format_string<Args...> f, Args&&... a) const { log(LogLevel::trace, f, std::forward<Args>(a)...); }
  template <class... Args> void debug(fmt::format_string<Args...> f, Args&&... a) const { log(LogLevel::debug, f, std::forward<Args>(a)...); }
  template <class... Args> void info(fmt::format_string<Args...> f, Args&&... a) const { log(LogLevel::info, f, std::forward<Args>(a)...); }
  template <class... Args> void warn(fmt::format_string<Args...> f, Args&&... a) const { log(LogLevel::warn, f, std::forward<Args>(a)...); }
  template <class... Args> void error(fmt::format_string<Args...> f, Args&&... a) const { log(LogLevel::error, f, std::forward<Args>(a)...); }

 private:
  template <class... Args> void log(LogLevel level, fmt::format_string<Args...> f, Args&&... a) const {
    if (enabled(level)) write(level, fmt::format(f, std::forward<Args>(a)...));
  }
  Subsystem subsystem_;
  LogLevel threshold_;
};

// The logger of one subsystem (created on first use, level from the environment; throws Error
// when LONGATTN_LOG or LONGATTN_LOG_SUBSYS holds an unknown value).
const Logger& logger(Subsystem s);
// Tags every later line with this process's rank ("[r3]").
void set_log_rank(int rank);

// LONGATTN_LOG as a level; an unknown name is an Error that lists the valid ones.
LogLevel log_level_from_environment();
// Whether LONGATTN_LOG_SUBSYS selects `s` ("all" or empty: every subsystem; names in any case);
// an unknown name in the list is an Error that lists the valid ones.
bool log_subsystem_enabled(Subsystem s);

}  // namespace longattn
