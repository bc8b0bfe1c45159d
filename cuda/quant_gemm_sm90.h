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
// kernels, the current device is not compute capability 9.0, they are switched off (set_sm90_gemm), or the
// operands are not what TMA and CUTLASS's checks take (sm90_tma_fits).
// (sm90_gemm_compiled / set_sm90_gemm / sm90_gemm_enabled / sm90_gemm_calls: ops/quant_gemm.h.)
bool quant_gemm_sm90(const Sm90QGemm& a, cudaStream_t stream);

// TMA addresses 16-byte aligned bases and row strides (A, W: 1-byte elements; y: 4-byte ones, also the
// source when accumulating), and CUTLASS's can_implement wants each operand's contiguous extent a multiple
// of 16 bytes too: K % 16 for A and W, N % 4 for y (tests/sm90_host.cu checks that every call accepted
// here passes can_implement). The per-row / per-column vectors (scales, bias) are read per element.
inline bool sm90_tma_fits(const Sm90QGemm& a) {
  const auto a16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  if (a.format != QFormat::Int8 && a.format != QFormat::FP8) return false;
  if (a.M <= 0 || a.N <= 0 || a.K <= 0 || a.M > INT32_MAX || a.N > INT32_MAX || a.K > INT32_MAX) return false;
  if (a.K % 16 || a.N % 4 || a.lda % 16 || a.ldw % 16 || a.ldy % 4) return false;
  if (!a16(a.A) || !a16(a.W) || !a16(a.y)) return false;
  if (a.format == QFormat::FP8 && a.wgroup != 0 && a.wgroup != 128) return false;
  return true;
}

// The two instantiations (cuda/quant_gemm_sm90_int8.cu, cuda/quant_gemm_sm90_fp8.cu); operands already checked.
void sm90_int8_gemm(const Sm90QGemm& a, int device, int sm_count, cudaStream_t stream);
void sm90_fp8_gemm(const Sm90QGemm& a, int device, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace ne
