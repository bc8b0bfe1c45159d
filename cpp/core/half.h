// Portable scalar conversions between float and the 16-bit float formats, bit-exact with the
// hardware conversions (round to nearest even, NaN stays NaN, overflow goes to Inf).
#pragma once
#include <cstdint>
#include <cstring>

namespace ne {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// bf16 is the top half of an f32.
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    // subnormal: man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;           // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;          // rounds to >= 65520: Inf
  if (a < 0x38800000u) {                                // below 2^-14: subnormal or zero
    // value * 2^24 rounded to nearest even integer gives the subnormal mantissa
    float v = bits_f32(a) * 16777216.0f;                // exact scaling
    uint32_t m = static_cast<uint32_t>(v);
    float rem = v - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return sign | static_cast<uint16_t>(m);
  }
  // normal: rebias exponent, round mantissa 23 -> 10 bits to nearest even
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return sign | static_cast<uint16_t>(((r >> 13) - (112u << 10)) & 0x7fffu);
}

// Uniform load/store as float for the kernels' scalar paths.
template <class T> inline float to_f32(T v) { return static_cast<float>(v); }
template <> inline float to_f32<bf16>(bf16 v) { return bf16_to_f32(v.bits); }
template <> inline float to_f32<f16>(f16 v) { return f16_to_f32(v.bits); }
template <class T> inline T from_f32(float v) { return static_cast<T>(v); }
template <> inline bf16 from_f32<bf16>(float v) { return bf16{f32_to_bf16(v)}; }
template <> inline f16 from_f32<f16>(float v) { return f16{f32_to_f16(v)}; }

}  // namespace ne
