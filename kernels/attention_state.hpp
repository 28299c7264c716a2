// The partial attention result of one query row and how partial results over disjoint key sets
// join (DESIGN.md, "Merging partial attention"). Every merge of partial results goes through these
// functions (the backends' merge, the joins of split-KV decode, the offload client's shards), so
// a row that saw no key is treated one way everywhere: lse = -inf and o = 0, and whatever its o buffer holds (even inf
// or NaN) never reaches a merged result. NaN in a finite part (a NaN input) still propagates.
// Usable from .cpp and .cu files alike.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define LONGATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LONGATTN_HOST_DEVICE inline
#endif

namespace longattn::kernels {

// The exponential base of a state's scores: natural, the base of the API's LSE. A kernel that
// folds log2(e) into its scale would add a base-2 twin (exp2f, log2f).
struct NaturalExp {
  static LONGATTN_HOST_DEVICE float exp(float x) { return expf(x); }
  static LONGATTN_HOST_DEVICE float log(float x) { return logf(x); }
};

// The factors that bring two accumulated outputs to a common scale when their states join:
// o = factor_self * o_self + factor_other * o_other (see mix).
struct MergeFactors {
  float self, other;
};

// A term of a merged output: a factor of exactly 0 drops its side whatever the side holds, so a
// part that saw no key cannot turn the result into NaN through 0 * inf or 0 * NaN.
LONGATTN_HOST_DEVICE float weighted(float factor, float value) { return factor == 0.0f ? 0.0f : factor * value; }
LONGATTN_HOST_DEVICE float mix(const MergeFactors& f, float self_value, float other_value) {
  return weighted(f.self, self_value) + weighted(f.other, other_value);
}

// The softmax statistics of a partial result: the largest score seen and the sum of
// exp(score - max) over the keys seen. The output accumulated with it is unnormalized until
// multiplied by normalizer(). A part that saw no key is {-inf, 0}; a finished result (o, lse) is
// the state of_result(lse) with o already normalized.
template <class Exp = NaturalExp>
struct SoftmaxState {
  float max = -INFINITY;
  float sum = 0.0f;

  static LONGATTN_HOST_DEVICE SoftmaxState of_result(float lse) { return {lse, lse == -INFINITY ? 0.0f : 1.0f}; }

  // exp(from - to) for a quantity kept relative to max `from`, now relative to `to` >= from; 0 for
  // a part that saw no key, also when no part has (where exp(-inf - -inf) would be NaN).
  static LONGATTN_HOST_DEVICE float rescale(float from, float to) { return from == -INFINITY ? 0.0f : Exp::exp(from - to); }

  // Joins `other` into this state (the online form, one part at a time).
  LONGATTN_HOST_DEVICE MergeFactors merge(const SoftmaxState& other) {
    const float m = fmaxf(max, other.max);
    const MergeFactors f{rescale(max, m), rescale(other.max, m)};
    sum = sum * f.self + other.sum * f.other;
    max = m;
    return f;
  }

  // The two-pass form for many parts: start from {largest max of all parts, 0}, then add each
  // part; returns the factor of that part's accumulated output.
  LONGATTN_HOST_DEVICE float add(const SoftmaxState& part) {
    const float f = rescale(part.max, max);
    sum += part.sum * f;
    return f;
  }

  // In Exp's base; -inf when no key was seen. A NaN sum stays NaN.
  LONGATTN_HOST_DEVICE float lse() const { return sum == 0.0f ? -INFINITY : max + Exp::log(sum); }
  // What an accumulated output is multiplied by at the end: 1 / sum, or 0 when no key was seen.
  LONGATTN_HOST_DEVICE float normalizer() const { return sum == 0.0f ? 0.0f : 1.0f / sum; }
};

// Two finished results (o1, lse1) and (o2, lse2) joined: lse and the weights of o1 and o2 for mix.
struct ResultMerge {
  float lse;
  MergeFactors weights;
};
LONGATTN_HOST_DEVICE ResultMerge merge_results(float lse1, float lse2) {
  SoftmaxState<> s = SoftmaxState<>::of_result(lse1);
  const MergeFactors f = s.merge(SoftmaxState<>::of_result(lse2));
  const float n = s.normalizer();
  return {s.lse(), {f.self * n, f.other * n}};
}

}  // namespace longattn::kernels
