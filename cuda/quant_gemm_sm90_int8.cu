// Int8 (W8A8) on Hopper: y[m, n] = (float(sum_k q[m, k] wq[n, k]) * s_m) * sw[n] (+ bias[n]) (+ y[m, n]),
// s8 x s8 wgmma with int32 sums, everything after the sum in the epilogue tree (cuda/quant_gemm_sm90.cuh).
#include "quant_gemm_sm90.cuh"

namespace ne {
namespace cuda {

void sm90_int8_gemm(const Sm90QGemm& a, int device, int sm_count, cudaStream_t stream) {
  if (a.accumulate)
    sm90::run<sm90::Int8Gemm<true>>(sm90::int8_arguments<true>(a, device, sm_count), stream, "int8 y += x W^T");
  else
    sm90::run<sm90::Int8Gemm<false>>(sm90::int8_arguments<false>(a, device, sm_count), stream, "int8 y = x W^T");
}

}  // namespace cuda
}  // namespace ne
