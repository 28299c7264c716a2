// Device operations on host memory: what the CPU backends run on. Synchronous, so streams are
// ignored; element-wise loops are spread over the OpenMP threads where they are long.
#include <algorithm>
#include <cstring>

#include "common/check.hpp"
#include "kernels/cpu_backend.hpp"
#include "longattn/dtype_convert.hpp"
#include "longattn/host_buffer.hpp"

namespace longattn::kernels {
namespace {

class HostDeviceBuffer final : public DeviceBuffer {
 public:
  explicit HostDeviceBuffer(std::size_t bytes) : buf_(bytes) {}
  void* data() override { return buf_.data(); }
  std::size_t bytes() const override { return buf_.bytes(); }

 private:
  HostBuffer buf_;
};

class CpuDeviceOps final : public DeviceOps {
 public:
  std::unique_ptr<DeviceBuffer> allocate(std::size_t bytes) override { return std::make_unique<HostDeviceBuffer>(bytes); }
  void fill(TensorView dst, float value, void*) override {
    const auto n = static_cast<std::size_t>(dst.numel());
    if (dst.dtype == DType::f32) {
      std::fill_n(dst.as<float>(), n, value);
    } else {
      for (std::size_t i = 0; i < n; ++i) store_from_f32(dst.data, dst.dtype, i, value);
    }
  }
  void add_into(TensorView dst, TensorView src, void*) override {
    LONGATTN_INVALID(dst.dtype == DType::f32 && dst.numel() == src.numel(), "add_into: dst {} must be fp32 and match src {}",
                     dst.describe(), src.describe());
    float* d = dst.as<float>();
    const auto n = static_cast<std::int64_t>(dst.numel());
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) d[i] += load_as_f32(src.data, src.dtype, static_cast<std::size_t>(i));
  }
  void convert(TensorView dst, TensorView src, void*) override {
    LONGATTN_INVALID(dst.numel() == src.numel(), "convert: {} and {} differ in size", dst.describe(), src.describe());
    const auto n = static_cast<std::size_t>(dst.numel());
    if (n == 0) return;  // empty views may hold null pointers
    if (dst.dtype == src.dtype) {
      std::memcpy(dst.data, src.data, dst.bytes());
    } else if (src.dtype == DType::f32) {
      convert_from_f32(src.as<const float>(), dst.data, dst.dtype, n);
    } else if (dst.dtype == DType::f32) {
      convert_to_f32(src.data, src.dtype, dst.as<float>(), n);
    } else {
      for (std::size_t i = 0; i < n; ++i) store_from_f32(dst.data, dst.dtype, i, load_as_f32(src.data, src.dtype, i));
    }
  }
  void copy_bytes(void* dst, const void* src, std::size_t bytes, void*) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);  // an empty shard may pass null (memcpy must not see it)
  }
  void synchronize(void*) override {}
};

}  // namespace

DeviceOps& cpu_device_ops() {
  static CpuDeviceOps ops;
  return ops;
}

}  // namespace longattn::kernels
