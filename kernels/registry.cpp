// Backend registry: names to factories. CPU backends are always built; GPU ones join where the
// build found CUDA (LONGATTN_HAVE_CUDA) and a GPU is present at run time.
#include <functional>

#include "common/check.hpp"
#include "kernels/cpu_backend.hpp"
#include "kernels/fallback_backend.hpp"
#include "longattn/config.hpp"
#include "longattn/log.hpp"

#ifdef LONGATTN_HAVE_CUDA
#include "kernels/cuda/cuda_backends.hpp"
#endif

namespace longattn {
namespace {

struct Entry {
  const char* name;
  DeviceKind kind;
  std::function<bool()> available;
  std::function<std::unique_ptr<AttentionBackend>()> make;
};

// In order of preference for "auto" on each device kind.
const std::vector<Entry>& entries() {
  static const std::vector<Entry> table = {
#ifdef LONGATTN_HAVE_CUDA
      {"cudnn", DeviceKind::cuda, kernels::cudnn_backend_available, kernels::make_cudnn_backend},
      {"cuda", DeviceKind::cuda, kernels::cuda_device_available,
       [] { return env_int("LONGATTN_DETERMINISTIC") ? kernels::make_cuda_backend_deterministic() : kernels::make_cuda_backend(); }},
#endif
      {"cpu", DeviceKind::cpu, [] { return true; }, kernels::make_cpu_fast_backend},
      {"reference", DeviceKind::cpu, [] { return true; }, kernels::make_reference_backend},
  };
  return table;
}

}  // namespace

std::vector<std::string> available_backends() {
  std::vector<std::string> names;
  for (const auto& e : entries())
    if (e.available()) names.emplace_back(e.name);
  return names;
}

namespace {

// The GPU backends longattn has, whether or not this build holds them.
constexpr const char* kGpuBackendNames[] = {"cudnn", "cuda"};

bool built(const std::string& name) {
  for (const auto& e : entries())
    if (name == e.name) return true;
  return false;
}

// The one list of choices that --backend and LONGATTN_BACKEND errors both print.
std::string backend_choices() {
  std::string usable = "auto", built_idle, absent;
  for (const auto& e : entries()) (e.available() ? usable : built_idle) += std::string(", ") + e.name;
  for (const char* name : kGpuBackendNames)
    if (!built(name)) absent += std::string(absent.empty() ? "" : ", ") + name;
  if (!built_idle.empty()) usable += fmt::format(" ({} built, but no CUDA GPU is visible)", built_idle.substr(2));
  if (!absent.empty()) usable += fmt::format(" ({}: not in this build)", absent);
  return usable;
}

}  // namespace

std::unique_ptr<AttentionBackend> make_backend(const std::string& requested, DeviceKind kind) {
  std::string name = requested;
  bool from_environment = false;
  if (name.empty() || name == "auto") {
    name = env_string("LONGATTN_BACKEND");
    from_environment = name != "auto";
  }
  auto refuse = [&](ErrorCode code, const std::string& why) {
    throw Error(code, fmt::format("{}{}; choices here: {}", from_environment ? "LONGATTN_BACKEND: " : "", why, backend_choices()));
  };
  if (name == "auto") {
    // GPUs: every available GPU backend, each call going to the first that supports it (cuDNN
    // where it can, the own kernels elsewhere). CPU: the fast kernels (the reference is an oracle).
    std::vector<std::unique_ptr<AttentionBackend>> candidates;
    for (const auto& e : entries())
      if (e.kind == kind && e.available() && std::string(e.name) != "reference") candidates.push_back(e.make());
    if (candidates.empty())
      refuse(ErrorCode::unsupported, fmt::format("no attention backend is available for device {}", to_string(kind)));
    if (candidates.size() == 1) return std::move(candidates.front());
    auto backend = kernels::make_fallback_backend(std::move(candidates));
    logger(Subsystem::kernels).debug("backend auto -> {}", backend->name());
    return backend;
  }
  for (const auto& e : entries()) {
    if (name != e.name) continue;
    if (!e.available())
      refuse(ErrorCode::unsupported,
             fmt::format("backend '{}' is built but cannot run: no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)", name));
    return e.make();
  }
  for (const char* gpu_name : kGpuBackendNames)
    if (name == gpu_name)
      refuse(ErrorCode::unsupported, fmt::format("backend '{}' is not in this build (it needs one configured with CUDA{})", name,
                                                 name == "cudnn" ? " and the cuDNN frontend" : ""));
  refuse(ErrorCode::invalid_argument, fmt::format("unknown or unavailable backend '{}'", name));
  return nullptr;
}

}  // namespace longattn
