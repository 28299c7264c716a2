// Shared test helpers: fresh random tensors, comparisons against the double-precision oracle.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "longattn/host_buffer.hpp"
#include "longattn/tensor.hpp"

namespace longattn::test {

// A fresh seed per run (printed on failure through SCOPED_TRACE by callers), so tests see new data.
std::uint64_t fresh_seed();

// An owned host tensor with a view.
struct HostTensor {
  HostBuffer buf;
  TensorView view;
  HostTensor() = default;
  HostTensor(DType t, std::initializer_list<std::int64_t> dims);
  float at(std::size_t i) const;  // element i as f32
  std::vector<float> to_f32() const;
};

// Uniform random values in [-scale, scale], never all zero.
HostTensor random_tensor(std::mt19937_64& rng, DType t, std::initializer_list<std::int64_t> dims, float scale = 1.0f);
// Filled with a NaN-like poison so unwritten outputs are caught.
HostTensor poisoned_tensor(DType t, std::initializer_list<std::int64_t> dims);

struct Diff {
  double max_abs = 0;  // max |a - b| (inf where exactly one side is -inf or either is NaN)
  double max_ref = 0;  // max |b|
  double rel() const { return max_abs / (max_ref > 0 ? max_ref : 1.0); }
};
Diff compare(const std::vector<float>& got, const std::vector<float>& want);

// Random cu_seqlens for a batch: lengths in [max_len/2, max_len]; with 3+ sequences the first is empty and the
// second has one token.
std::vector<std::int32_t> random_cu_seqlens(std::mt19937_64& rng, int batch, int max_len);

}  // namespace longattn::test
