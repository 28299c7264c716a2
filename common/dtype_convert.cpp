// f16 <-> f32 by bit manipulation (no F16C dependency in the scalar path) and bulk loops the
// compiler vectorizes.
#include "longattn/dtype_convert.hpp"

namespace longattn {

float f16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | (static_cast<std::uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::uint16_t f32_to_f16(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // subnormal or zero in f16
    if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);
    const std::uint32_t e = abs >> 23;
    const std::uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;  // 14 - (e - 127) + 13 - 1 ... exact shift to f16 subnormal
    std::uint32_t r = man >> (shift);
    const std::uint32_t rem = man & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t r = abs + 0xc8000fffu + ((abs >> 13) & 1u);  // rebias exponent and round to nearest even
  return static_cast<std::uint16_t>(sign | (r >> 13));
}

void convert_to_f32(const void* src, DType t, float* dst, std::size_t n) noexcept {
  switch (t) {
    case DType::f32:
      if (n) std::memcpy(dst, src, n * 4);  // n = 0 may come with null pointers
      break;
    case DType::bf16: {
      auto s = static_cast<const std::uint16_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      break;
    }
    case DType::f16: {
      auto s = static_cast<const std::uint16_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      break;
    }
  }
}

void convert_from_f32(const float* src, void* dst, DType t, std::size_t n) noexcept {
  switch (t) {
    case DType::f32:
      if (n) std::memcpy(dst, src, n * 4);  // n = 0 may come with null pointers
      break;
    case DType::bf16: {
      auto d = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      break;
    }
    case DType::f16: {
      auto d = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      break;
    }
  }
}

namespace {
// All-ones exponent marks infinity and NaN in every IEEE format.
template <class Bits>
std::size_t first_with_exponent(const void* p, std::size_t n, Bits exponent_mask) noexcept {
  const auto* x = static_cast<const Bits*>(p);
  for (std::size_t i = 0; i < n; ++i) {
    Bits v;
    std::memcpy(&v, x + i, sizeof v);
    if ((v & exponent_mask) == exponent_mask) return i;
  }
  return n;
}
}  // namespace

std::size_t first_non_finite(const void* p, DType t, std::size_t n) noexcept {
  switch (t) {
    case DType::f32: return first_with_exponent<std::uint32_t>(p, n, 0x7f800000u);
    case DType::bf16: return first_with_exponent<std::uint16_t>(p, n, 0x7f80u);
    case DType::f16: return first_with_exponent<std::uint16_t>(p, n, 0x7c00u);
  }
  return n;
}

}  // namespace longattn
