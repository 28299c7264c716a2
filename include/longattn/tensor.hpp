// Non-owning tensor views and the element types longattn understands.
// Owners are explicit RAII types elsewhere (HostBuffer, device buffers); a view never frees.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace longattn {

enum class DType : std::uint8_t { f32, bf16, f16 };
enum class DeviceKind : std::uint8_t { cpu, cuda };

std::size_t dtype_size(DType t) noexcept;
const char* to_string(DType t) noexcept;
// Parses "fp32"/"f32"/"float32", "bf16"/"bfloat16", "fp16"/"f16"/"float16"; throws on anything else.
DType parse_dtype(const std::string& name);
const char* to_string(DeviceKind d) noexcept;

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;
  friend bool operator==(const Device&, const Device&) = default;
};

// A dense row-major view of up to 4 dimensions. Kernels require contiguous views; strides are kept
// so that a caller's strided tensor is detected and refused with a clear message, not misread.
struct TensorView {
  static constexpr int kMaxDims = 4;
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device{};
  int ndim = 0;
  std::array<std::int64_t, kMaxDims> shape{};
  std::array<std::int64_t, kMaxDims> stride{};  // in elements

  TensorView() = default;
  TensorView(void* ptr, DType type, std::initializer_list<std::int64_t> dims, Device dev = {});

  bool empty() const noexcept { return data == nullptr; }
  std::int64_t dim(int i) const noexcept { return shape[static_cast<std::size_t>(i)]; }
  std::int64_t numel() const noexcept;
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  bool is_contiguous() const noexcept;
  std::string describe() const;  // "bf16[128, 8, 64] on cpu", for error messages

  template <class T>
  T* as() const noexcept { return static_cast<T*>(data); }
};

}  // namespace longattn
