// Job-side helpers shared by the example programs and benchmarks: a tensor owned on a backend's
// device, filled chunk by chunk from a counter-based random generator (so any rank makes exactly
// its own rows of the global inputs, never the whole tensor, and never zeros) or from host rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <vector>

#include "longattn/backend.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/host_buffer.hpp"
#include "longattn/layout.hpp"

namespace longattn::examples {

// Value in [-1, 1) for element `index` of input tensor `tensor` (0=q, 1=k, 2=v, 3=dO).
inline float random_value(std::uint64_t seed, int tensor, std::int64_t index) {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ULL + static_cast<std::uint64_t>(tensor) * 0xbf58476d1ce4e5b9ULL +
                    static_cast<std::uint64_t>(index) * 0x94d049bb133111ebULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) / static_cast<double>(1ULL << 23) - 1.0);
}

struct DeviceTensor {
  std::unique_ptr<DeviceBuffer> buf;
  TensorView view;

  DeviceTensor(AttentionBackend& be, DType t, std::initializer_list<std::int64_t> dims) {
    TensorView v(nullptr, t, dims, be.device());
    buf = be.device_ops().allocate(std::max<std::size_t>(v.bytes(), 64));
    view = v;
    view.data = buf->data();
  }
  std::int64_t rows() const { return view.dim(0); }
  std::int64_t width() const { return view.numel() / std::max<std::int64_t>(1, view.dim(0)); }

  // Fills rows in chunks: value(local_row, column) -> float, converted to the tensor's dtype.
  void fill_rows(AttentionBackend& be, const std::function<float(std::int64_t, std::int64_t)>& value) {
    const std::int64_t w = width(), chunk = std::max<std::int64_t>(1, (std::int64_t{32} << 20) / std::max<std::int64_t>(1, w));
    const std::size_t esize = dtype_size(view.dtype);
    HostBuffer staging(static_cast<std::size_t>(std::min(chunk, std::max<std::int64_t>(1, rows())) * w) * esize);
    for (std::int64_t r0 = 0; r0 < rows(); r0 += chunk) {
      const std::int64_t n = std::min(chunk, rows() - r0);
#pragma omp parallel for schedule(static)
      for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t c = 0; c < w; ++c)
          store_from_f32(staging.data(), view.dtype, static_cast<std::size_t>(r * w + c), value(r0 + r, c));
      be.device_ops().copy_bytes(static_cast<char*>(view.data) + static_cast<std::size_t>(r0 * w) * esize, staging.data(),
                    static_cast<std::size_t>(n * w) * esize, nullptr);
      be.device_ops().synchronize(nullptr);
    }
  }
  // This rank's rows of global tensor `tensor`: random, or from a full host copy (row-major [T, width]).
  void fill_shard(AttentionBackend& be, const RankShard& shard, std::uint64_t seed, int tensor, const std::vector<float>* full) {
    const std::int64_t w = width();
    fill_rows(be, [&](std::int64_t r, std::int64_t c) {
      const std::int64_t g = shard.global_index[static_cast<std::size_t>(r)] * w + c;
      return full ? (*full)[static_cast<std::size_t>(g)] : random_value(seed, tensor, g);
    });
  }
  std::vector<float> download(AttentionBackend& be) const {
    HostBuffer tmp(view.bytes());
    be.device_ops().copy_bytes(tmp.data(), view.data, view.bytes(), nullptr);
    be.device_ops().synchronize(nullptr);
    std::vector<float> out(static_cast<std::size_t>(view.numel()));
    convert_to_f32(tmp.data(), view.dtype, out.data(), out.size());
    return out;
  }
};

}  // namespace longattn::examples
