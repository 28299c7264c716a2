// One spdlog logger per subsystem, writing to stderr with the rank in each line, and the parsing of
// LONGATTN_LOG / LONGATTN_LOG_SUBSYS that decides what each logger lets through.
#include "longattn/log.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "common/check.hpp"
#include "longattn/config.hpp"

namespace longattn {
namespace {

// Indexed by Subsystem and by LogLevel.
constexpr std::array<std::string_view, 6> kSubsystemNames = {"kernels", "partition", "comm", "ring", "offload", "app"};
constexpr std::array<std::string_view, 6> kLevelNames = {"trace", "debug", "info", "warn", "error", "off"};
constexpr std::array<spdlog::level::level_enum, 6> kSpdlogLevels = {spdlog::level::trace, spdlog::level::debug,
                                                                    spdlog::level::info,  spdlog::level::warn,
                                                                    spdlog::level::err,   spdlog::level::off};

// The public Logger holds only its subsystem and threshold; the spdlog objects behind it live here.
struct Registry {
  std::mutex mu;
  std::array<std::shared_ptr<spdlog::logger>, kSubsystemNames.size()> sinks{};
  std::array<std::unique_ptr<Logger>, kSubsystemNames.size()> loggers{};
  int rank = -1;
};

Registry& registry() {
  static Registry r;
  return r;
}

std::string pattern(int rank) {
  return rank < 0 ? "[%H:%M:%S.%e] [%n] [%l] %v" : "[%H:%M:%S.%e] [r" + std::to_string(rank) + "] [%n] [%l] %v";
}

// Lower case, without the spaces a hand-written "ring, comm" puts around items.
std::string normalized(std::string_view text) {
  const auto first = text.find_first_not_of(" \t");
  if (first == std::string_view::npos) return {};
  text = text.substr(first, text.find_last_not_of(" \t") - first + 1);
  std::string out(text);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

template <std::size_t N>
std::size_t index_of(const std::array<std::string_view, N>& names, std::string_view name) {
  return static_cast<std::size_t>(std::find(names.begin(), names.end(), name) - names.begin());
}

}  // namespace

LogLevel log_level_from_environment() {
  const std::string given = env_string("LONGATTN_LOG");
  const std::size_t i = index_of(kLevelNames, normalized(given));
  LONGATTN_INVALID(i < kLevelNames.size(), "LONGATTN_LOG='{}' is not a log level; use one of {} (any case)", given,
                   fmt::join(kLevelNames, ", "));
  return static_cast<LogLevel>(i);
}

bool log_subsystem_enabled(Subsystem s) {
  const std::string list = env_string("LONGATTN_LOG_SUBSYS");
  const std::string_view wanted = kSubsystemNames[static_cast<std::size_t>(s)];
  bool all = normalized(list).empty(), selected = false;
  for (std::size_t start = 0; start <= list.size();) {
    const std::size_t comma = std::min(list.find(',', start), list.size());
    const std::string item = normalized(std::string_view(list).substr(start, comma - start));
    start = comma + 1;
    if (item.empty()) continue;
    if (item == "all") {
      all = true;
      continue;
    }
    LONGATTN_INVALID(index_of(kSubsystemNames, item) < kSubsystemNames.size(),
                     "LONGATTN_LOG_SUBSYS='{}' names an unknown subsystem '{}'; use a comma list of {}, or all", list, item,
                     fmt::join(kSubsystemNames, ", "));
    selected = selected || item == wanted;
  }
  return all || selected;
}

const Logger& logger(Subsystem s) {
  auto& reg = registry();
  const auto i = static_cast<std::size_t>(s);
  std::lock_guard lock(reg.mu);
  if (!reg.loggers[i]) {
    const LogLevel level = log_subsystem_enabled(s) ? log_level_from_environment() : LogLevel::off;
    auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    auto lg = std::make_shared<spdlog::logger>(std::string(kSubsystemNames[i]), sink);
    lg->set_pattern(pattern(reg.rank));
    lg->set_level(kSpdlogLevels[static_cast<std::size_t>(level)]);
    reg.sinks[i] = std::move(lg);
    reg.loggers[i] = std::make_unique<Logger>(s, level);
  }
  return *reg.loggers[i];
}

void Logger::write(LogLevel level, std::string_view message) const {
  auto& reg = registry();
  std::shared_ptr<spdlog::logger> sink;
  {
    std::lock_guard lock(reg.mu);
    sink = reg.sinks[static_cast<std::size_t>(subsystem_)];
  }
  if (sink) sink->log(kSpdlogLevels[static_cast<std::size_t>(level)], message);
}

void set_log_rank(int rank) {
  auto& reg = registry();
  std::lock_guard lock(reg.mu);
  reg.rank = rank;
  for (auto& sink : reg.sinks)
    if (sink) sink->set_pattern(pattern(rank));
}

}  // namespace longattn
