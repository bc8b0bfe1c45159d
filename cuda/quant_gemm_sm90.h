// Hopper (sm_90a) tensor-core GEMMs for the 8-bit packed formats: wgmma from shared memory, fed by TMA
// (the bulk tensor copy engine), warp-specialized, from CUTLASS 3.x collectives (cuda/quant_gemm_sm90.cuh).
// quant_linear (cuda/quant_gemm.cu) tries these first for M > 8 rows on an sm_90 device and falls back to
// its mma.sync kernel when they decline. Same numerics as that kernel and as the CPU (cpp/ops/quant_gemm.cpp):
//
//   Int8 (W8A8)  y[m, n] = (float(sum_k q[m, k] wq[n, k]) * s_m) * sw[n] (+ bias[n]) (+ y[m, n])
//                s8 x s8 wgmma, int32 sums; both scales, the bias and the residual in the epilogue.
//   FP8 (e4m3)   y[m, n] = sum_b (s[m, b] * sw(n, b)) * (sum_{k in b} xq[m, k] wq[n, k]) (+ bias[n]) (+ y[m, n])
//                e4m3 x e4m3 wgmma; after each 128-wide K block (b) its fp32 partial sums are promoted into
//                the accumulators times both scales (CUTLASS's blockwise-scaling mainloop).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/quant_gemm.h"

namespace ne {
namespace cuda {

struct Sm90QGemm {
  QFormat format;           // Int8 or FP8
  int64_t M, N, K;          // K: bytes of a weight row (= elements)
  const void* A;            // quantized activations [M, lda], zero padded past K
  int64_t lda;
  const float* sx;          // Int8: [M]; FP8: [M, KB] (KB = ceil(K / 128)), row stride KB
  const void* W;            // [N, K], row stride ldw
  int64_t ldw;
  const float* sw;          // Int8: [N]; FP8: [1] (wgroup 0) or [ceil(N / 128), KB] (wgroup 128)
  int64_t wgroup;
  const float* bias;        // [N] or null
  float* y;                 // [M, ldy]
  int64_t ldy;
  bool accumulate;          // y += instead of y =
};

// Runs the GEMM and returns true, or returns false without touching anything when this build has no sm_90a
// kernels, the current device is not compute capability 9.0, they are switched off (set_sm90_gemm), or an
// operand misses TMA's 16-byte alignment (the base pointers and row strides of A, W and y).
// (sm90_gemm_compiled / set_sm90_gemm / sm90_gemm_enabled: ops/quant_gemm.h.)
bool quant_gemm_sm90(const Sm90QGemm& a, cudaStream_t stream);

// The two instantiations (cuda/quant_gemm_sm90_int8.cu, cuda/quant_gemm_sm90_fp8.cu); shapes already checked.
void sm90_int8_gemm(const Sm90QGemm& a, int sm_count, cudaStream_t stream);
void sm90_fp8_gemm(const Sm90QGemm& a, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace ne
