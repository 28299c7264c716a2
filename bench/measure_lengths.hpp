// Batches of sequence lengths for the balance benchmarks: read from a lengths file, and cut down to
// a token budget where a measured run must fit one device and a few minutes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace longattn::bench {

// One sequence length per line; '#' comments and blank lines skipped. Throws Error(io) naming the
// file and line on anything else, and on a file with no length in it.
std::vector<std::int64_t> read_lengths(const std::string& path);

// The batch unchanged when it holds at most `total_tokens` (or total_tokens is 0). Otherwise a
// smaller batch of the same kind of sequences: its longest sequence (cut to half the budget if
// longer), then the file's other sequences in batch order, each cut likewise, skipping those that
// no longer fit. Lengths stay what the file says wherever they fit, so the kernels see the block
// sizes the distribution has, which scaling every length down would not keep.
std::vector<std::int64_t> cut_to_total_tokens(const std::vector<std::int64_t>& lengths, std::int64_t total_tokens);

}  // namespace longattn::bench
