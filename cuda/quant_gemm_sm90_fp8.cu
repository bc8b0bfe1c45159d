// FP8 (e4m3) on Hopper: y[m, n] = sum_b (s[m, b] * sw(n, b)) * (sum_{k in b} xq[m, k] wq[n, k]) (+ bias[n]) (+ y),
// e4m3 x e4m3 wgmma, fp32 partial sums per 128-wide K block promoted with both scales in the mainloop
// (cuda/quant_gemm_sm90.cuh); bias and residual in the epilogue tree.
#include "quant_gemm_sm90.cuh"

namespace ne {
namespace cuda {

namespace {

// The scales as the mainloop reads them (sm90::fp8_arguments): M / N-major, one 128-row slice of a K block's
// activation scales per TMA load.
//   sfa[b * Mp + m] = sx[m * KB + b]     (rows M .. Mp-1: 0; their A rows are TMA's zero fill)
//   sfb[b * NB + j] = sw[j * KB + b]     (per-tensor weights: sw[0] in every block)
__global__ void transpose_scales(int64_t M, int64_t Mp, int64_t KB, int64_t NB, const float* __restrict__ sx,
                                 const float* __restrict__ sw, bool per_block, float* __restrict__ sfa,
                                 float* __restrict__ sfb) {
  const int64_t na = Mp * KB, total = na + NB * KB;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (i < na) {
      const int64_t m = i / KB, b = i % KB;
      sfa[b * Mp + m] = m < M ? sx[i] : 0.f;
    } else {
      const int64_t j = (i - na) / KB, b = (i - na) % KB;
      sfb[b * NB + j] = per_block ? sw[i - na] : sw[0];
    }
  }
}

}  // namespace

void sm90_fp8_gemm(const Sm90QGemm& a, int device, int sm_count, cudaStream_t stream) {
  const int64_t KB = (a.K + 127) / 128, NB = (a.N + 127) / 128, Mp = sm90::fp8_scale_rows(a.M);
  StreamScratch scratch;
  auto* sfa = static_cast<float*>(scratch.alloc(static_cast<size_t>((Mp + NB) * KB) * sizeof(float), stream));
  float* sfb = sfa + Mp * KB;
  const int64_t total = (Mp + NB) * KB;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
  transpose_scales<<<blocks, 256, 0, stream>>>(a.M, Mp, KB, NB, a.sx, a.sw, a.wgroup != 0, sfa, sfb);
  check_launch("fp8 transpose_scales");
  if (a.accumulate)
    sm90::run<sm90::Fp8Gemm<true>>(sm90::fp8_arguments<true>(a, device, sm_count, sfa, sfb), stream, "fp8 y += x W^T");
  else
    sm90::run<sm90::Fp8Gemm<false>>(sm90::fp8_arguments<false>(a, device, sm_count, sfa, sfb), stream,
                                    "fp8 y = x W^T");
}

}  // namespace cuda
}  // namespace ne
