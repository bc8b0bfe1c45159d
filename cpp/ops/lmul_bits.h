// The scalar L-Mul product on fp32 bit patterns (definition and special values: ops/lmul.h), one
// source for the CPU (cpp/ops/lmul.cpp: the scalar definition and the kernels' tails) and the GPU
// (cuda/lmul.cu: every product), so the two agree bit for bit by construction:
//   prep(x)  = (x is NaN ? 0x7fc00000 : bits(x)) & trunc            (t(x): canonical NaN, m mantissa bits)
//   checked(a, b) with A = a & 0x7fffffff, B = b & 0x7fffffff, s = (a ^ b) & 0x80000000:
//     NaN operand -> 0x7fc00000; Inf with zero / subnormal -> NaN; Inf -> Inf | s; zero / subnormal -> s;
//     u = A + B, r = u - C: u < C + 2^23 (exponent underflow) -> s; r >= 0x7f800000 (overflow) -> Inf | s;
//     else r | s.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define NE_LMUL_HD __host__ __device__ __forceinline__
#else
#define NE_LMUL_HD inline
#endif

namespace ne {
namespace lmul_bits {

constexpr uint32_t kAbs = 0x7fffffffu, kSign = 0x80000000u, kInf = 0x7f800000u, kQNaN = 0x7fc00000u,
                   kMin = 0x00800000u;

NE_LMUL_HD uint32_t prep1(uint32_t x, uint32_t trunc) { return ((x & kAbs) > kInf ? kQNaN : x) & trunc; }

NE_LMUL_HD uint32_t checked1(uint32_t a, uint32_t b, uint32_t C) {
  const uint32_t A = a & kAbs, B = b & kAbs, s = (a ^ b) & kSign;
  if (A > kInf || B > kInf) return kQNaN;
  const bool zero = A < kMin || B < kMin, inf = A == kInf || B == kInf;
  if (inf) return zero ? kQNaN : (kInf | s);
  if (zero) return s;
  const uint32_t u = A + B, r = u - C;
  if (u < C + kMin) return s;
  if (r >= kInf) return kInf | s;
  return r | s;
}

}  // namespace lmul_bits
}  // namespace ne
