// GPU decode attention: a few query tokens against a long KV of one sequence. Memory-bound, so the
// KV is split along its length over all SMs (every byte read once, 16-byte loads), each split
// keeps an online softmax per query row, and the splits are merged by the LSE identity.
#pragma once

#include <string>

#include "longattn/attention.hpp"

namespace longattn::kernels::cuda {

// Query rows the decode kernel holds in registers: query tokens x (q heads per kv head).
constexpr int kDecodeMaxRows = 8;

// Empty when cuda_decode_attention can run these arguments, else why not.
std::string decode_unsupported_reason(const AttentionArgs& args);

// Same contract as AttentionBackend::forward (o [Tq, Hq, D], lse [Hq, Tq]; causal by positions;
// rows that see nothing get o = 0, lse = -inf), for one sequence with Tq * Hq / Hkv <= 8 rows.
// Runs on args.stream; its split partials live in stream-ordered memory (cudaMallocAsync).
void cuda_decode_attention(const AttentionArgs& args, const ForwardOutputs& out);

}  // namespace longattn::kernels::cuda
