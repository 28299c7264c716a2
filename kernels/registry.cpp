// Backend registry: names to factories. CPU backends are always built; GPU ones join where the
// build found CUDA (LONGATTN_HAVE_CUDA) and a GPU is present at run time.
#include <functional>

#include "common/check.hpp"
#include "kernels/cpu_backend.hpp"
#include "kernels/fallback_backend.hpp"
#include "longattn/config.hpp"
#include "longattn/log.hpp"

#ifdef LONGATTN_HAVE_CUDA
#include <cuda_runtime.h>

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

void AttentionBackend::copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
                               std::size_t width, std::size_t rows, void* stream) {
  for (std::size_t r = 0; r < rows; ++r)
    copy_bytes(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width, stream);
}

std::size_t gpu_memory_used_bytes() {
#ifdef LONGATTN_HAVE_CUDA
  std::size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) return total - free_bytes;
#endif
  return 0;
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names;
  for (const auto& e : entries())
    if (e.available()) names.emplace_back(e.name);
  return names;
}

std::unique_ptr<AttentionBackend> make_backend(const std::string& requested, DeviceKind kind) {
  std::string name = requested;
  if (name.empty() || name == "auto") name = env_string("LONGATTN_BACKEND");
  if (name == "auto") {
    // GPUs: every available GPU backend, each call going to the first that supports it (cuDNN
    // where it can, the own kernels elsewhere). CPU: the fast kernels (the reference is an oracle).
    std::vector<std::unique_ptr<AttentionBackend>> candidates;
    for (const auto& e : entries())
      if (e.kind == kind && e.available() && std::string(e.name) != "reference") candidates.push_back(e.make());
    if (candidates.empty())
      throw Error(ErrorCode::unsupported, fmt::format("no attention backend is available for device {}", to_string(kind)));
    if (candidates.size() == 1) return std::move(candidates.front());
    auto backend = kernels::make_fallback_backend(std::move(candidates));
    logger(Subsystem::kernels).debug("backend auto -> {}", backend->name());
    return backend;
  }
  for (const auto& e : entries()) {
    if (name != e.name) continue;
    LONGATTN_REQUIRE(e.available(), ErrorCode::unsupported, "backend '{}' is built but cannot run here (no GPU?)", name);
    return e.make();
  }
  std::string known;
  for (const auto& e : entries()) known += std::string(known.empty() ? "" : ", ") + e.name;
  throw Error(ErrorCode::invalid_argument, fmt::format("unknown backend '{}'; this build has: auto, {}", name, known));
}

}  // namespace longattn
