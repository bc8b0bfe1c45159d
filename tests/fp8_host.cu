// Host build of the two E4M3 conversions cuda/quant_gemm.cu uses (cuda_fp8.h's intrinsics also have
// host definitions, the specification of the device instructions): float -> E4M3 (round to nearest
// even, saturating: the activation quantizer's to_e4m3) and E4M3 pairs -> half -> float (the weight
// and activation decode). tests/test_quant.py::test_cuda_fp8_conversions_match_cpu compares them with
// the CPU's (torch's float8_e4m3fn, which the CPU kernels equal bit for bit).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

extern "C" void fp8_host_encode(int64_t n, const float* v, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(v[i], __NV_SATFINITE, __NV_E4M3));
}

extern "C" void fp8_host_decode(int64_t n, const uint8_t* q, float* out) {
  for (int64_t i = 0; i + 1 < n; i += 2) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(q[i] | (q[i + 1] << 8)), __NV_E4M3);
    __half2 hh;
    hh = h;
    const float2 f = __half22float2(hh);
    out[i] = f.x;
    out[i + 1] = f.y;
  }
}
