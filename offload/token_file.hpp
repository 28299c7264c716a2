// Reading the server's shared secret from its token file, with the checks an operator needs to
// hear about at start-up rather than later: the file must be a regular file (a FIFO or a device
// would block or never end), not readable by every user, and hold a token of sensible length.
#pragma once

#include <string>

namespace longattn::offload {

// The token (surrounding whitespace trimmed). Throws Error(io / invalid_argument) with what to do.
std::string read_token_file(const std::string& path);

}  // namespace longattn::offload
