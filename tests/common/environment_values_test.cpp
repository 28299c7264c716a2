// The values LONGATTN_LOG, LONGATTN_LOG_SUBSYS and the integer variables accept: names in any case,
// and every unknown or out-of-range value refused with a message that lists what is accepted.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>

#include "longattn/config.hpp"
#include "longattn/error.hpp"
#include "longattn/log.hpp"

namespace longattn {
namespace {

// Sets a variable for one scope and restores what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

std::string random_case(const std::string& s, std::mt19937& rng) {
  std::string out = s;
  for (auto& c : out)
    if (rng() % 2) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

// The message of the Error `f` throws ("" when it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    return e.what();
  }
  return "";
}

TEST(EnvironmentValues, LogLevelInAnyCase) {
  std::mt19937 rng(std::random_device{}());
  const std::pair<const char*, LogLevel> levels[] = {{"trace", LogLevel::trace}, {"debug", LogLevel::debug},
                                                     {"info", LogLevel::info},   {"warn", LogLevel::warn},
                                                     {"error", LogLevel::error}, {"off", LogLevel::off}};
  for (const auto& [name, level] : levels) {
    for (const std::string& spelled : {std::string(name), random_case(name, rng), random_case(name, rng)}) {
      ScopedEnv env("LONGATTN_LOG", spelled);
      EXPECT_EQ(log_level_from_environment(), level) << spelled;
    }
    std::string upper = name;
    for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    ScopedEnv env("LONGATTN_LOG", upper);
    EXPECT_EQ(log_level_from_environment(), level) << upper;
  }
}

TEST(EnvironmentValues, UnknownLogLevelIsRefusedWithTheList) {
  std::mt19937 rng(std::random_device{}());
  for (const std::string& bad : {std::string("verbose"), std::string("warning2"), "lvl" + std::to_string(rng() % 1000 + 1)}) {
    ScopedEnv env("LONGATTN_LOG", bad);
    const std::string message = error_of([] { log_level_from_environment(); });
    EXPECT_NE(message.find("LONGATTN_LOG='" + bad + "'"), std::string::npos) << message;
    EXPECT_NE(message.find("trace, debug, info, warn, error, off"), std::string::npos) << message;
    EXPECT_NE(error_of([] { check_environment(); }), "") << "check_environment accepts LONGATTN_LOG=" << bad;
  }
}

TEST(EnvironmentValues, SubsystemListInAnyCaseWithSpaces) {
  std::mt19937 rng(std::random_device{}());
  {
    ScopedEnv env("LONGATTN_LOG_SUBSYS", random_case("ring", rng) + ", " + random_case("comm", rng));
    EXPECT_TRUE(log_subsystem_enabled(Subsystem::ring));
    EXPECT_TRUE(log_subsystem_enabled(Subsystem::comm));
    EXPECT_FALSE(log_subsystem_enabled(Subsystem::kernels));
    EXPECT_FALSE(log_subsystem_enabled(Subsystem::offload));
  }
  for (const std::string& every : {std::string("all"), random_case("all", rng), std::string("")}) {
    ScopedEnv env("LONGATTN_LOG_SUBSYS", every);
    EXPECT_TRUE(log_subsystem_enabled(Subsystem::partition)) << "'" << every << "'";
    EXPECT_TRUE(log_subsystem_enabled(Subsystem::app)) << "'" << every << "'";
  }
}

TEST(EnvironmentValues, UnknownSubsystemIsRefusedWithTheList) {
  ScopedEnv env("LONGATTN_LOG_SUBSYS", "ring,network");
  const std::string message = error_of([] { log_subsystem_enabled(Subsystem::ring); });
  EXPECT_NE(message.find("'network'"), std::string::npos) << message;
  EXPECT_NE(message.find("kernels, partition, comm, ring, offload, app"), std::string::npos) << message;
  EXPECT_NE(error_of([] { check_environment(); }), "");
}

TEST(EnvironmentValues, NegativeThreadCountIsRefused) {
  std::mt19937 rng(std::random_device{}());
  const std::string negative = std::to_string(-static_cast<int>(rng() % 64 + 1));
  ScopedEnv env("LONGATTN_NUM_THREADS", negative);
  const std::string message = error_of([] { cpu_threads_per_process(1); });
  EXPECT_NE(message.find("LONGATTN_NUM_THREADS=" + negative), std::string::npos) << message;
  EXPECT_NE(message.find("[0, "), std::string::npos) << message;
  EXPECT_NE(error_of([] { check_environment(); }), "");
}

TEST(EnvironmentValues, ThreadCountInRangeIsUsed) {
  std::mt19937 rng(std::random_device{}());
  const int threads = static_cast<int>(rng() % 64 + 1);
  ScopedEnv env("LONGATTN_NUM_THREADS", std::to_string(threads));
  EXPECT_EQ(cpu_threads_per_process(static_cast<int>(rng() % 8 + 1)), threads);
  EXPECT_EQ(error_of([] { check_environment(); }), "");
}

TEST(EnvironmentValues, NonIntegersAndOutOfRangeSwitchesAreRefused) {
  std::mt19937 rng(std::random_device{}());
  {
    ScopedEnv env("LONGATTN_COMM_TIMEOUT_S", std::to_string(rng() % 100 + 1) + "s");
    EXPECT_NE(error_of([] { env_int("LONGATTN_COMM_TIMEOUT_S"); }).find("not an integer"), std::string::npos);
  }
  {
    ScopedEnv env("LONGATTN_DETERMINISTIC", std::to_string(rng() % 100 + 2));
    EXPECT_NE(error_of([] { check_environment(); }).find("LONGATTN_DETERMINISTIC"), std::string::npos);
  }
}

}  // namespace
}  // namespace longattn
