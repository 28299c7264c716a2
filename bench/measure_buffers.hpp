// Device memory with random contents for the measuring benchmarks: attention kernels take the same
// time on any values, but random ones keep every score finite and every softmax non-trivial.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "longattn/device_ops.hpp"
#include "longattn/tensor.hpp"

namespace longattn::bench {

// `elements` values of `dtype`, uniform in [-1, 1], on the device of `ops` (at least one element
// allocated, so an empty view still has an address).
std::unique_ptr<DeviceBuffer> random_buffer(DeviceOps& ops, std::size_t elements, DType dtype, std::uint64_t seed);

}  // namespace longattn::bench
