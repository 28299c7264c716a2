// An owned, aligned block of host memory. Aligned to 64 bytes so vector kernels never straddle
// cache lines at the start of a row block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "longattn/tensor.hpp"

namespace longattn {

class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(std::size_t bytes);
  HostBuffer(HostBuffer&&) noexcept = default;
  HostBuffer& operator=(HostBuffer&&) noexcept = default;

  void* data() noexcept { return ptr_.get(); }
  const void* data() const noexcept { return ptr_.get(); }
  std::size_t bytes() const noexcept { return bytes_; }
  template <class T> T* as() noexcept { return static_cast<T*>(data()); }
  template <class T> const T* as() const noexcept { return static_cast<const T*>(data()); }
  TensorView view(DType t, std::initializer_list<std::int64_t> dims);

 private:
  struct Free { void operator()(void* p) const noexcept; };
  std::unique_ptr<void, Free> ptr_;
  std::size_t bytes_ = 0;
};

}  // namespace longattn
