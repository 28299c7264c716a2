// Raising the soft open-file limit (see open_files.hpp).
#include "offload/open_files.hpp"

#include <sys/resource.h>

#include <algorithm>

namespace longattn::offload {

OpenFileLimit raise_open_file_limit(std::size_t wanted) noexcept {
  OpenFileLimit out;
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return out;
  const auto as_size = [](rlim_t v) { return v == RLIM_INFINITY ? static_cast<std::size_t>(-1) : static_cast<std::size_t>(v); };
  out.soft = as_size(lim.rlim_cur);
  out.hard = as_size(lim.rlim_max);
  if (out.soft >= wanted) return out;
  const std::size_t target = std::min(wanted, out.hard);
  if (target <= out.soft) return out;
  rlimit raised = lim;
  raised.rlim_cur = static_cast<rlim_t>(target);
  if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) {
    out.soft = target;
    out.raised = true;
  }
  return out;
}

}  // namespace longattn::offload
