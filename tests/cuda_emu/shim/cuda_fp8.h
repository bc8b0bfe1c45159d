// Stand-in for the CUDA toolkit header of the same name when kernels are compiled for the host
// emulator (tests/cuda_emu/cuda_emu.h): the E4M3 / E5M2 storage types and the conversions the kernels
// use, with the device's results (E4M3 round to nearest even, __NV_SATFINITE clamps to +-448, NaN ->
// 0x7f; E4M3 -> f16 exact). E5M2 is not emulated (a conversion to or from it faults).
#pragma once
#include "cuda_fp16.h"

typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };

inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float v, __nv_saturation_t sat, __nv_fp8_interpretation_t fmt) {
  if (fmt != __NV_E4M3) ::ne_emu::detail::fault("__nv_cvt_float_to_fp8: E5M2 is not emulated");
  return ::ne_emu::e4m3_bits(v, sat == __NV_SATFINITE);
}
inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t v, __nv_fp8_interpretation_t fmt) {
  if (fmt != __NV_E4M3) ::ne_emu::detail::fault("__nv_cvt_fp8_to_halfraw: E5M2 is not emulated");
  __half_raw r;
  // every E4M3 value is an f16 value; NaN -> the canonical f16 NaN 0x7fff (sign kept)
  r.x = ::ne_emu::e4m3_value(v) != ::ne_emu::e4m3_value(v) ? static_cast<unsigned short>(0x7fff | ((v & 0x80) << 8))
                                                           : __float2half_rn(::ne_emu::e4m3_value(v)).__x;
  return r;
}
// Two E4M3 bytes (low byte -> .x) -> two f16.
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t v, __nv_fp8_interpretation_t fmt) {
  __half2_raw r;
  r.x = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v & 0xffu), fmt).x;
  r.y = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v >> 8), fmt).x;
  return r;
}
