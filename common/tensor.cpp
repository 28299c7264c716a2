// TensorView helpers and dtype names.
#include "longattn/tensor.hpp"

#include <fmt/format.h>

#include "common/check.hpp"

namespace longattn {

std::size_t dtype_size(DType t) noexcept { return t == DType::f32 ? 4 : 2; }

const char* to_string(DType t) noexcept {
  switch (t) {
    case DType::f32: return "fp32";
    case DType::bf16: return "bf16";
    case DType::f16: return "fp16";
  }
  return "?";
}

DType parse_dtype(const std::string& name) {
  if (name == "fp32" || name == "f32" || name == "float32") return DType::f32;
  if (name == "bf16" || name == "bfloat16") return DType::bf16;
  if (name == "fp16" || name == "f16" || name == "float16") return DType::f16;
  throw Error(ErrorCode::invalid_argument, fmt::format("unknown dtype '{}': use fp32, bf16 or fp16", name));
}

const char* to_string(DeviceKind d) noexcept { return d == DeviceKind::cpu ? "cpu" : "cuda"; }

TensorView::TensorView(void* ptr, DType type, std::initializer_list<std::int64_t> dims, Device dev)
    : data(ptr), dtype(type), device(dev), ndim(static_cast<int>(dims.size())) {
  LONGATTN_INVALID(dims.size() <= kMaxDims, "a tensor view has at most {} dimensions, got {}", kMaxDims, dims.size());
  std::size_t i = 0;
  for (auto d : dims) shape[i++] = d;
  std::int64_t s = 1;
  for (int k = ndim - 1; k >= 0; --k) {
    stride[static_cast<std::size_t>(k)] = s;
    s *= shape[static_cast<std::size_t>(k)];
  }
}

std::int64_t TensorView::numel() const noexcept {
  std::int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[static_cast<std::size_t>(i)];
  return ndim == 0 ? 0 : n;
}

bool TensorView::is_contiguous() const noexcept {
  std::int64_t s = 1;
  for (int k = ndim - 1; k >= 0; --k) {
    auto uk = static_cast<std::size_t>(k);
    if (shape[uk] > 1 && stride[uk] != s) return false;
    s *= shape[uk];
  }
  return true;
}

std::string TensorView::describe() const {
  std::string dims;
  for (int i = 0; i < ndim; ++i) dims += fmt::format("{}{}", i ? ", " : "", shape[static_cast<std::size_t>(i)]);
  return fmt::format("{}[{}] on {}", to_string(dtype), dims, to_string(device.kind));
}

}  // namespace longattn
