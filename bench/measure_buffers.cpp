// random_buffer (measure_buffers.hpp): one random pattern on the host, copied over the buffer
// piece by piece, so filling gigabytes costs a few copies rather than a random draw per element.
#include "measure_buffers.hpp"

#include <algorithm>
#include <random>
#include <vector>

#include "longattn/dtype_convert.hpp"

namespace longattn::bench {

std::unique_ptr<DeviceBuffer> random_buffer(DeviceOps& ops, std::size_t elements, DType dtype, std::uint64_t seed) {
  constexpr std::size_t kPatternElements = 1 << 18;
  const std::size_t element_bytes = dtype_size(dtype);
  const std::size_t bytes = std::max<std::size_t>(elements, 1) * element_bytes;
  auto buffer = ops.allocate(bytes);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const std::size_t pattern_elements = std::min(std::max<std::size_t>(elements, 1), kPatternElements);
  std::vector<float> values(pattern_elements);
  for (auto& v : values) v = uniform(rng);
  std::vector<char> pattern(pattern_elements * element_bytes);
  convert_from_f32(values.data(), pattern.data(), dtype, pattern_elements);
  for (std::size_t offset = 0; offset < bytes; offset += pattern.size())
    ops.copy_bytes(static_cast<char*>(buffer->data()) + offset, pattern.data(), std::min(pattern.size(), bytes - offset), nullptr);
  ops.synchronize(nullptr);
  return buffer;
}

}  // namespace longattn::bench
