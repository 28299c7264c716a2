// Test helpers.
#include "support/test_util.hpp"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "longattn/dtype_convert.hpp"

namespace longattn::test {

std::uint64_t fresh_seed() {
  static std::uint64_t counter = 0;
  return static_cast<std::uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count()) ^ (++counter * 0x9e3779b97f4a7c15ULL);
}

HostTensor::HostTensor(DType t, std::initializer_list<std::int64_t> dims) {
  TensorView v(nullptr, t, dims);
  buf = HostBuffer(std::max<std::size_t>(v.bytes(), 1));
  view = v;
  view.data = buf.data();
}

float HostTensor::at(std::size_t i) const { return load_as_f32(view.data, view.dtype, i); }

std::vector<float> HostTensor::to_f32() const {
  std::vector<float> out(static_cast<std::size_t>(view.numel()));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = at(i);
  return out;
}

HostTensor random_tensor(std::mt19937_64& rng, DType t, std::initializer_list<std::int64_t> dims, float scale) {
  HostTensor h(t, dims);
  std::uniform_real_distribution<float> u(-scale, scale);
  for (std::size_t i = 0; i < static_cast<std::size_t>(h.view.numel()); ++i) store_from_f32(h.view.data, t, i, u(rng));
  return h;
}

HostTensor poisoned_tensor(DType t, std::initializer_list<std::int64_t> dims) {
  HostTensor h(t, dims);
  for (std::size_t i = 0; i < static_cast<std::size_t>(h.view.numel()); ++i)
    store_from_f32(h.view.data, t, i, std::numeric_limits<float>::quiet_NaN());
  return h;
}

Diff compare(const std::vector<float>& got, const std::vector<float>& want) {
  Diff d;
  if (got.size() != want.size()) {
    d.max_abs = std::numeric_limits<double>::infinity();
    return d;
  }
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double a = got[i], b = want[i];
    if (std::isnan(a) || std::isnan(b)) {
      d.max_abs = std::numeric_limits<double>::infinity();
      continue;
    }
    if (std::isinf(a) || std::isinf(b)) {
      if (a != b) d.max_abs = std::numeric_limits<double>::infinity();
      continue;
    }
    d.max_abs = std::max(d.max_abs, std::abs(a - b));
    d.max_ref = std::max(d.max_ref, std::abs(b));
  }
  return d;
}

std::vector<std::int32_t> random_cu_seqlens(std::mt19937_64& rng, int batch, int max_len) {
  std::vector<std::int32_t> cu{0};
  std::uniform_int_distribution<int> len(max_len / 2, max_len);
  for (int b = 0; b < batch; ++b) {
    int l = len(rng);
    if (batch >= 3 && b == 0) l = 0;  // an empty sequence
    if (batch >= 3 && b == 1) l = 1;  // a single token
    cu.push_back(cu.back() + l);
  }
  return cu;
}

}  // namespace longattn::test
