// The process's open-file limit against the connections a server is asked to hold: every
// connection is a descriptor, and a soft limit below --max-connections turns connections past it
// into failed accepts. At start the server raises the soft limit as far as the hard limit allows.
#pragma once

#include <cstddef>

namespace longattn::offload {

struct OpenFileLimit {
  std::size_t soft = 0, hard = 0;  // after the attempt
  bool raised = false;
};

// Raises the soft RLIMIT_NOFILE to `wanted` where it is lower (never past the hard limit).
OpenFileLimit raise_open_file_limit(std::size_t wanted) noexcept;

}  // namespace longattn::offload
