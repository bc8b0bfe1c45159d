// One element of a packed weight (ops/quant_gemm.h's QWeight formats) as float: the definition that
// the CPU runner's embedding lookups (cpp/model/runner.cpp) and the CUDA runner's (cuda/runner.cu)
// both use, so a quantized (tied) embedding reads alike on both. Host and device code under nvcc.
#pragma once
#include <cmath>
#include <cstdint>

#include "ops/quant_gemm.h"

#if defined(__CUDACC__)
#define NE_QE_HD __host__ __device__ __forceinline__
#else
#define NE_QE_HD inline
#endif

namespace ne {

// E4M3 (fn) bits -> float: s eeee mmm, bias 7, subnormals at e = 0, 0x7f / 0xff NaN, no Inf.
NE_QE_HD float e4m3_to_f32(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = NAN;
  else if (e == 0) v = ldexpf(static_cast<float>(m) / 8.0f, -6);
  else v = ldexpf(1.0f + static_cast<float>(m) / 8.0f, e - 7);
  return (b & 0x80) ? -v : v;
}

// Two-level scales (QWeight::sub): group gi's (= n * K / group + g) scale scale[gi / super] * sub[gi] and
// offset zero[gi / super] * sub_zero[gi] (0 without offsets).
NE_QE_HD float qe_sub_scale(const QWeight& q, int64_t gi) {
  return q.scale[gi / q.super] * static_cast<float>(q.sub[gi]);
}
NE_QE_HD float qe_sub_offset(const QWeight& q, int64_t gi) {
  return q.sub_zero ? q.zero[gi / q.super] * static_cast<float>(q.sub_zero[gi]) : 0.0f;
}

// w[n, k] of q, exactly as the GEMMs read it:
//   int8 / int8-weight: q * scale[n] (grouped int8-weight: q * scale[n, k / group], or (q - zero) * scale)
//   int4: (nibble - zero) * scale per group of q.group along K (no zero array: q.zero_point, 7.5 unless the runner
//         found a weight's zero points all equal)
//   two-level scales (QWeight::sub): q * s - o (int4: (nibble - zero_point) * s without offsets)
//   fp8: e4m3(q) * scale (per tensor, or per 128 x 128 block)
NE_QE_HD float quant_elem(const QWeight& q, int64_t n, int64_t k) {
  const int64_t K = q.K;
  switch (q.format) {
    case QFormat::Int8:
    case QFormat::Int8Weight: {
      const float v = static_cast<float>(static_cast<const int8_t*>(q.data)[n * K + k]);
      if (q.group == 0) return v * q.scale[n];
      const int64_t gi = n * (K / q.group) + k / q.group;
      if (q.sub) return v * qe_sub_scale(q, gi) - qe_sub_offset(q, gi);
      return q.zero ? (v - q.zero[gi]) * q.scale[gi] : v * q.scale[gi];
    }
    case QFormat::Int4: {
      const uint8_t byte = static_cast<const uint8_t*>(q.data)[n * (K / 2) + k / 2];
      const int nib = (k & 1) ? (byte >> 4) : (byte & 15);
      const int64_t gi = n * (K / q.group) + k / q.group;
      if (q.sub) return (static_cast<float>(nib) - (q.sub_zero ? 0.0f : q.zero_point)) * qe_sub_scale(q, gi) -
                        qe_sub_offset(q, gi);
      const float z = q.zero ? q.zero[gi] : q.zero_point;
      return (static_cast<float>(nib) - z) * q.scale[gi];
    }
    case QFormat::FP8:
    default: {
      const float s = q.group == 0 ? q.scale[0] : q.scale[(n / 128) * ((K + 127) / 128) + k / 128];
      return e4m3_to_f32(static_cast<const uint8_t*>(q.data)[n * K + k]) * s;
    }
  }
}

}  // namespace ne
