// Scalar conversions between f32 and the 16-bit types (round to nearest even), and bulk versions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "longattn/tensor.hpp"

namespace longattn {

inline float bf16_to_f32(std::uint16_t h) noexcept {
  std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline std::uint16_t f32_to_bf16(float f) noexcept {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

float f16_to_f32(std::uint16_t h) noexcept;
std::uint16_t f32_to_f16(float f) noexcept;

// Element i of a buffer of type t, as f32.
inline float load_as_f32(const void* p, DType t, std::size_t i) noexcept {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const std::uint16_t*>(p)[i]);
    case DType::f16: return f16_to_f32(static_cast<const std::uint16_t*>(p)[i]);
  }
  return 0.0f;
}
inline void store_from_f32(void* p, DType t, std::size_t i, float v) noexcept {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<std::uint16_t*>(p)[i] = f32_to_bf16(v); break;
    case DType::f16: static_cast<std::uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

// Index of the first NaN or infinity among n elements of type t, or n when all are finite: a bit
// test of the exponent, with no conversion, so a server can check every byte it is sent.
std::size_t first_non_finite(const void* p, DType t, std::size_t n) noexcept;

void convert_to_f32(const void* src, DType t, float* dst, std::size_t n) noexcept;
void convert_from_f32(const float* src, void* dst, DType t, std::size_t n) noexcept;

}  // namespace longattn
