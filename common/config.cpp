// The table of LONGATTN_* variables. Adding a variable means adding a row here (and to
// docs/environment.md); env_string refuses names that are not in the table.
#include "longattn/config.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <string_view>
#include <thread>

#include "common/check.hpp"
#include "longattn/log.hpp"

namespace longattn {

const std::vector<EnvVarInfo>& environment_variables() {
  static const std::vector<EnvVarInfo> table = {
      {"LONGATTN_LOG", "info", "log level, any case: trace, debug, info, warn, error, off"},
      {"LONGATTN_LOG_SUBSYS", "all", "comma list of subsystems to log: kernels,partition,comm,ring,offload,app"},
      {"LONGATTN_BACKEND", "auto", "local attention backend: auto (GPU: cudnn where it can, else cuda; CPU: cpu), reference, cpu, cuda, cudnn"},
      {"LONGATTN_DETERMINISTIC", "0", "1 = deterministic GPU backward (bit-identical run to run): cuda without atomics, cudnn's deterministic algorithm"},
      {"LONGATTN_NUM_THREADS", "0", "CPU kernel threads per process (>= 0); 0 = cores / processes on this node"},
      {"LONGATTN_NODE_SIZE", "0", "simulate nodes: group every N consecutive ranks into one node (0 = real hostnames)"},
      {"LONGATTN_MPI_PROGRESS", "1", "1 = a thread drives MPI progress while transfers are pending (overlap on CPUs)"},
      {"LONGATTN_COMM_TIMEOUT_S", "300", "seconds a communication may wait before it is reported as a hang"},
      {"LONGATTN_LINK_PROBE", "1", "1 = strategy auto measures link bandwidth and latency at startup (a few ping-pongs inside and across nodes); 0 = use the machine model's figures"},
      {"LONGATTN_CUDA_FWD_KERNEL", "auto", "forward kernel of the cuda backend: auto (wgmma on Hopper, else mma), mma (mma.sync, every shape) or wgmma (Hopper warpgroup kernel for head dim 128 without explicit positions; other shapes fall back to mma)"},
      {"LONGATTN_CUDA_BWD_KERNEL", "auto", "backward kernel of the cuda backend: auto (wgmma on Hopper, else mma), mma (mma.sync, every shape) or wgmma (Hopper warpgroup kernel for head dim 128 without explicit positions, atomic dQ; other calls, deterministic mode included, fall back to mma)"},
      {"LONGATTN_CUDA_WGMMA_FWD_SCHEDULE", "overlap", "how the wgmma forward's warpgroups schedule their work: overlap (three K/V stages with per-stage barriers so the two warpgroups drift apart, and each computes the next tile's scores while its P V product runs; the fastest) or pipeline (the same without the overlap inside a warpgroup; fewer registers)"},
      {"LONGATTN_DECODE_ISA", "auto", "highest instruction set of the CPU decode kernel: auto, generic, avx2, avx512, avx512_bf16 (for comparisons; auto = the best the CPU has)"},
  };
  return table;
}

std::string env_string(const char* name) {
  for (const auto& v : environment_variables()) {
    if (std::string_view(v.name) == name) {
      const char* value = std::getenv(name);
      return value ? std::string(value) : std::string(v.default_value);
    }
  }
  throw Error(ErrorCode::internal, fmt::format("environment variable {} is read but not documented in config.cpp", name));
}

namespace {

// The integer variables and the values that mean something for each; anything else is refused
// rather than clamped, because a negative thread count or a zero timeout is a typo, not a wish.
struct IntegerRange {
  const char* name;
  long min, max;
  const char* hint;
};
constexpr IntegerRange kIntegerRanges[] = {
    {"LONGATTN_NUM_THREADS", 0, 1L << 20, "0 = cores / processes on this node"},
    {"LONGATTN_NODE_SIZE", 0, 1L << 30, "0 = real hostnames"},
    {"LONGATTN_COMM_TIMEOUT_S", 1, 100'000'000, "seconds"},
    {"LONGATTN_DETERMINISTIC", 0, 1, "1 = deterministic GPU backward"},
    {"LONGATTN_MPI_PROGRESS", 0, 1, "1 = a progress thread"},
    {"LONGATTN_LINK_PROBE", 0, 1, "1 = probe the links for strategy auto"},
};

}  // namespace

long env_int(const char* name) {
  const std::string s = env_string(name);
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s.c_str(), &end, 10);
  LONGATTN_INVALID(!s.empty() && *end == '\0' && errno != ERANGE, "{}='{}' is not an integer; unset it or give a whole number",
                   name, s);
  for (const auto& r : kIntegerRanges)
    if (std::string_view(r.name) == name)
      LONGATTN_INVALID(v >= r.min && v <= r.max, "{}={} is outside [{}, {}] ({}); unset it or give a value in range", name, v,
                       r.min, r.max, r.hint);
  return v;
}

void check_environment() {
  log_level_from_environment();
  log_subsystem_enabled(Subsystem::app);  // parses, and so checks, the whole list
  for (const auto& r : kIntegerRanges) env_int(r.name);
}

int cpu_threads_per_process(int processes_on_node) {
  const long forced = env_int("LONGATTN_NUM_THREADS");
  if (forced > 0) return static_cast<int>(forced);
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, processes_on_node));
}

}  // namespace longattn
