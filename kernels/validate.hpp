// Argument checks shared by every backend, so each backend refuses bad input with the same words.
#pragma once

#include <cstdint>
#include <vector>

#include "longattn/attention.hpp"

namespace longattn::kernels {

struct ProblemShape {
  std::int64_t tq = 0, tk = 0;  // packed tokens
  int hq = 0, hkv = 0, d = 0;
  int batch = 1;
  int group() const noexcept { return hq / hkv; }  // query heads per kv head
};

// Checks shapes, dtypes, contiguity and head ratios of q/k/v; throws Error(invalid_argument).
ProblemShape validate_inputs(const AttentionArgs& args);
void validate_forward(const AttentionArgs& args, const ForwardOutputs& out, const ProblemShape& s);
void validate_backward(const AttentionArgs& args, const BackwardArgs& g, const ProblemShape& s);
// What every backend checks first: validate_inputs, then the forward's outputs (or the backward's
// gradients) against that shape.
ProblemShape validate_call(const AttentionArgs& args, const ForwardOutputs& out);
ProblemShape validate_call(const AttentionArgs& args, const BackwardArgs& g);

// Host-side sequence boundaries: the caller's cu_seqlens checked (monotone, ending at the token
// count), or {0, T} when none was given. Only for host-resident arguments.
std::vector<std::int32_t> host_cu_seqlens(const std::int32_t* cu, int batch, std::int64_t tokens, const char* which);

}  // namespace longattn::kernels
