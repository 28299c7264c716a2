// Aligned host allocations.
#include "longattn/host_buffer.hpp"

#include <cstdlib>
#include <new>

#include "common/check.hpp"

namespace longattn {

void HostBuffer::Free::operator()(void* p) const noexcept { std::free(p); }

HostBuffer::HostBuffer(std::size_t bytes) : bytes_(bytes) {
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = rounded ? std::aligned_alloc(64, rounded) : nullptr;
  LONGATTN_REQUIRE(p || rounded == 0, ErrorCode::out_of_capacity,
                   "could not allocate {} bytes of host memory; use a shorter sequence or more ranks", bytes);
  ptr_.reset(p);
}

TensorView HostBuffer::view(DType t, std::initializer_list<std::int64_t> dims) {
  TensorView v(data(), t, dims);
  LONGATTN_REQUIRE(v.bytes() <= bytes_, ErrorCode::internal, "view {} larger than its buffer ({} bytes)", v.describe(), bytes_);
  return v;
}

}  // namespace longattn
