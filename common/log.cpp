// One spdlog logger per subsystem, writing to stderr with the rank in each line.
#include "longattn/log.hpp"

#include <array>
#include <mutex>

#include <spdlog/sinks/stdout_color_sinks.h>

#include "longattn/config.hpp"

namespace longattn {
namespace {

constexpr std::array<const char*, 6> kNames = {"kernels", "partition", "comm", "ring", "offload", "app"};

struct Registry {
  std::mutex mu;
  std::array<std::shared_ptr<spdlog::logger>, kNames.size()> loggers{};
  int rank = -1;
};

Registry& registry() {
  static Registry r;
  return r;
}

std::string pattern(int rank) {
  return rank < 0 ? "[%H:%M:%S.%e] [%n] [%l] %v" : "[%H:%M:%S.%e] [r" + std::to_string(rank) + "] [%n] [%l] %v";
}

bool subsystem_enabled(const char* name) {
  const std::string list = env_string("LONGATTN_LOG_SUBSYS");
  if (list == "all" || list.empty()) return true;
  return ("," + list + ",").find("," + std::string(name) + ",") != std::string::npos;
}

}  // namespace

spdlog::logger& logger(Subsystem s) {
  auto& reg = registry();
  const auto i = static_cast<std::size_t>(s);
  std::lock_guard lock(reg.mu);
  if (!reg.loggers[i]) {
    auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    auto lg = std::make_shared<spdlog::logger>(kNames[i], sink);
    lg->set_pattern(pattern(reg.rank));
    auto level = spdlog::level::from_str(env_string("LONGATTN_LOG"));
    lg->set_level(subsystem_enabled(kNames[i]) ? level : spdlog::level::off);
    reg.loggers[i] = lg;
  }
  return *reg.loggers[i];
}

void set_log_rank(int rank) {
  auto& reg = registry();
  std::lock_guard lock(reg.mu);
  reg.rank = rank;
  for (auto& lg : reg.loggers)
    if (lg) lg->set_pattern(pattern(rank));
}

}  // namespace longattn
