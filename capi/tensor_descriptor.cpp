// See tensor_descriptor.hpp.
#include "capi/tensor_descriptor.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstring>
#include <span>
#include <vector>

#include "capi/guard.hpp"

namespace longattn::capi {

DType to_dtype(int dtype) {
  switch (dtype) {
    case LONGATTN_DTYPE_F32: return DType::f32;
    case LONGATTN_DTYPE_BF16: return DType::bf16;
    case LONGATTN_DTYPE_F16: return DType::f16;
    default: break;
  }
  throw Error(ErrorCode::invalid_argument,
              fmt::format("dtype {} is not a longattn_dtype: use LONGATTN_DTYPE_F32, _BF16 or _F16", dtype));
}

Device to_device(const longattn_device& d) {
  const int kind = enum_value(d.kind);
  if (kind != LONGATTN_DEVICE_CPU && kind != LONGATTN_DEVICE_CUDA)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("device kind {} is not a longattn_device_kind: use LONGATTN_DEVICE_CPU or _CUDA", kind));
  if (d.index < 0 || (kind == LONGATTN_DEVICE_CPU && d.index != 0))
    throw Error(ErrorCode::invalid_argument,
                fmt::format("device index {} is invalid: the CPU is index 0, CUDA devices 0 and up", d.index));
  return {kind == LONGATTN_DEVICE_CPU ? DeviceKind::cpu : DeviceKind::cuda, d.index};
}

std::string descriptor_problem(const char* name, const longattn_tensor* desc) {
  if (!desc) return fmt::format("tensor '{}' is NULL: pass a longattn_tensor descriptor", name);
  try {
    to_dtype(enum_value(desc->dtype));
    to_device(desc->device);
  } catch (const Error& e) {
    return fmt::format("tensor '{}': {}", name, e.what());
  }
  if (desc->ndim < 1 || desc->ndim > TensorView::kMaxDims)
    return fmt::format("tensor '{}' has ndim {}: descriptors take 1 to {} dimensions", name, desc->ndim, TensorView::kMaxDims);
  const auto n = static_cast<std::size_t>(desc->ndim);
  const std::span<const std::int64_t> shape(desc->shape, n), strides(desc->strides, n);
  std::vector<std::int64_t> dense(n);
  std::int64_t elements = 1;
  bool contiguous = true;
  for (std::size_t k = n; k-- > 0;) {
    if (shape[k] < 0) return fmt::format("tensor '{}' has a negative extent in shape [{}]", name, fmt::join(shape, ", "));
    dense[k] = elements;
    if (shape[k] > 1 && strides[k] != dense[k]) contiguous = false;
    elements *= shape[k];
  }
  // A tensor without elements has no layout to get wrong (PyTorch gives a [2, 0] tensor strides [1, 1]).
  if (!contiguous && elements > 0)
    return fmt::format("tensor '{}' of shape [{}] has strides [{}] (in elements), which is not a dense row-major layout "
                       "(that would be strides [{}]): the kernels read contiguous tensors only; pass a contiguous copy "
                       "(e.g. tensor.contiguous())",
                       name, fmt::join(shape, ", "), fmt::join(strides, ", "), fmt::join(dense, ", "));
  if (elements > 0 && !desc->data) return fmt::format("tensor '{}' has {} elements but a NULL data pointer", name, elements);
  return {};
}

TensorView to_view(const longattn_tensor& desc) {
  TensorView v;
  v.data = desc.data;
  v.dtype = to_dtype(enum_value(desc.dtype));
  v.device = to_device(desc.device);
  v.ndim = desc.ndim;
  std::int64_t s = 1;
  for (int k = desc.ndim - 1; k >= 0; --k) {
    const auto uk = static_cast<std::size_t>(k);
    v.shape[uk] = desc.shape[uk];
    v.stride[uk] = s;  // dense strides: a size-1 dimension's stride does not matter to a reader
    s *= desc.shape[uk];
  }
  return v;
}

}  // namespace longattn::capi

extern "C" longattn_tensor longattn_tensor_contiguous(void* data, longattn_dtype dtype, longattn_device device, int ndim,
                                                      const int64_t* shape) {
  longattn_tensor t{};
  t.data = data;
  std::memcpy(&t.dtype, &dtype, sizeof dtype);  // as given: a value outside the enum is refused later
  t.device = device;
  if (ndim < 1 || ndim > longattn::TensorView::kMaxDims || !shape) return t;  // ndim 0: refused by every call
  t.ndim = ndim;
  std::int64_t s = 1;
  for (int k = ndim - 1; k >= 0; --k) {
    t.shape[k] = shape[k];
    t.strides[k] = s;
    s *= shape[k];
  }
  return t;
}
