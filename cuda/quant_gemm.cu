// Quantized GEMMs on the GPU: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ y[m, n]) with W packed as
// in cpp/ops/quant_gemm.h, and the same numerics as the CPU kernels (cpp/ops/quant_gemm.cpp):
//
//   Int8 (W8A8)  s_m = max_k |x[m, k]| / 127,  q[m, k] = rne(x[m, k] * (1 / s_m)) clamped to [-127, 127]
//                y = (float(sum_k q[m, k] wq[n, k]) * s_m) * sw[n]                       int32 sums (IMMA)
//   Int8Weight   y = sw[n] * sum_k x[m, k] * wq[n, k]                                   fp32 sums
//                (grouped: y = sum_g sw[n, g] * sum_{k in g} x[m, k] * wq[n, k])
//   Int4         y = sum_g s[n, g] * sum_{k in g} x[m, k] (q[n, k] - z[n, g])           fp32 sums (z = 7.5 if symmetric)
//   FP8          s[m, b] = max_{k in b} |x[m, k]| / 448,  xq = e4m3_rne(x / s[m, b])     b = 128-channel block
//                y = sum_b (s[m, b] * sw(n, b)) * (sum_{k in b} xq[m, k] * e4m3(wq[n, k]))  fp32 (e4m3 MMA)
//
// Steps of one call (quant_linear):
//  1. activations: Int8 / FP8 quantized per row (per row and 128-block) into a zero-padded scratch
//     [M, Kp] (Kp = K rounded up to 128) plus their scales; Int8Weight / Int4: x widened to fp32 [M, Kp].
//     Traffic: x read once (twice for Int8, the second pass from L2), the scratch written once.
//  2. GEMM, by M:
//     - M <= 8 (decode): a GEMV. One warp per output column n streams row n of W once in 16-byte loads
//       (16 int8 / e4m3 weights or 32 int4 nibbles per lane and step) and dots it with the M rows of the
//       prepared activations (L1/L2 resident): int8 __dp4a, e4m3 -> f16 -> f32 products, int4 nibbles
//       widened in registers. Traffic: the packed weights once (1 byte / weight, 1/2 for int4) plus
//       scales: memory bound, the target is the copy bandwidth of W.
//     - Int8 / FP8, M > 8: tensor cores, mma.sync m16n8k32 (s8.s8.s32 and e4m3.e4m3.f32, sm_89+). Block
//       tile 128 x 128 x 128 bytes, 8 warps (2 x 4, warp tile 64 x 32 = 4 x 4 mma tiles), a 3-stage
//       cp.async pipeline into XOR-swizzled shared memory (16-byte chunk c of row r at c ^ (r & 7): the
//       ldmatrix phases and the cp.async stores are bank-conflict free), fragments by ldmatrix.x4.
//       FP8: the 128-wide K tile is exactly one scale block, so each tile's fp32 partial sums are
//       promoted into the accumulators with s[m, b] * sw(n, b) after the tile (per-block scaling).
//       Tails: rows >= M / N and bytes >= K are zero-filled by cp.async (src-size 0). Needs K % 16 == 0 and
//       a 16-byte aligned W; otherwise the GEMV kernel (any alignment) runs for every M.
//       On Hopper (sm_90) mma.sync e4m3 is not a native instruction: ptxas emulates it by converting the
//       fragments to f16 for the f16 tensor cores (NVIDIA on cutlass issue #1986). The resource report
//       shows it: for sm_90a the FP8 instantiation takes 255 registers and spills (268 bytes stored per
//       thread) where the same source for sm_89 (Ada, native e4m3 MMA) takes 178 and the s8 one 130. So on
//       an H100 / H200 this path computes at the f16 tensor-core rate at best; full FP8 speed there needs
//       wgmma (e4m3 from shared memory): on a compute capability 9.0 device Int8 and FP8 with more than 8 rows
//       go to the wgmma kernels of cuda/quant_gemm_sm90.h first, and come here only when those decline
//       (operands TMA and CUTLASS cannot take: sm90_tma_fits, e.g. N % 4 or a y not 16-byte aligned) or
//       are switched off.
//     - Int8Weight / Int4, M > 8: a tiled fp32 FMA kernel (64 x 64 tile, K steps of 32, 4 x 4 outputs per
//       thread) that dequantizes the W tile into shared memory ((q - z) s, or q for int8 with sw[n] in the
//       epilogue): the exact fp32 arithmetic of the contract (no bf16 rounding of x).
//  3. epilogue: scales as above, + bias, (+ y), masked at the M / N tails.
//
// bf16_linear (not a packed format: the CUDA runner's bfloat16 weights under matmul_precision "medium"):
//   y = sum_k bf16(x[m, k]) * w[n, k] (+ bias) (+ y), x rounded to bfloat16 (nearest even), products exact,
//   fp32 sums, on the same tensor-core kernel as Int8 / FP8: a bfloat16 row is a row of 2 K bytes, and
//   mma.sync m16n8k16 (bf16.bf16.f32) takes its fragments from exactly the bytes m16n8k32 takes (row g /
//   column g, bytes 4t .. 4t+3 and 16+4t ..), so the cp.async / ldmatrix pipeline is the same.
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "ops/quant_gemm.h"
#if !defined(NE_CUDA_EMU)
#include "quant_gemm_sm90.h"
#endif

namespace ne {
namespace cuda {
namespace {

constexpr int kKPad = 128;  // activation scratch rows are padded to a multiple of this (one FP8 block, one MMA K tile)
constexpr int kGemvMaxM = 8;

// ============================================================================ device helpers

template <class T>
__device__ __forceinline__ float ldf(const T* p) {
  return Elem<T>::load(p[0]);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// E4M3 (fn) round-to-nearest-even of v, saturating to +-448 (NaN stays NaN): the CPU's round_e4m3.
__device__ __forceinline__ uint8_t to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}
// Two E4M3 bytes (low byte first) -> their exact values (via f16, which holds every E4M3 value).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  __half2 hh;
  hh = *reinterpret_cast<const __half2*>(&h);
  return __half22float2(hh);
}

// 16 bytes of a row of `len` bytes from byte j0 on (bytes >= len read as 0). vec: the row start is
// 16-byte aligned and len % 16 == 0, so a full chunk is one 16-byte load.
__device__ __forceinline__ uint4 load_row16(const uint8_t* row, int64_t j0, int64_t len, bool vec) {
  if (vec && j0 + 16 <= len) return __ldg(reinterpret_cast<const uint4*>(row + j0));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (j0 + i < len) w[i >> 2] |= static_cast<uint32_t>(__ldg(row + j0 + i)) << (8 * (i & 3));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void store_out(float* y, int64_t off, float v, const float* bias, int64_t n, bool acc) {
  if (bias) v = __fadd_rn(v, bias[n]);
  y[off] = acc ? __fadd_rn(y[off], v) : v;
}

// ============================================================================ 1. activations

// Int8, one block per row: s = max|x| / 127, q = rne(x * (1 / s)) clamped to [-127, 127]; columns
// K .. Kout-1 are written as 0. fmaxf ignores NaN as the CPU's std::max does, and the clamp sends a
// NaN to -127 as the CPU's std::min(127, std::max(-127, NaN)) does.
template <class T>
__global__ void __launch_bounds__(256) quant_int8_rows(int64_t K, int64_t Kout, const T* __restrict__ x, int64_t ldx,
                                                       int8_t* __restrict__ q, int64_t ldq, float* __restrict__ s,
                                                       int64_t lds) {
  __shared__ float red[8];
  const int64_t m = blockIdx.x;
  const T* xr = x + m * ldx;
  float amax = 0.0f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(ldf(xr + k)));
  amax = warp_max(amax);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = red[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) amax = fmaxf(amax, red[w]);
  const float sm = __fdiv_rn(amax, 127.0f);
  const float inv = sm > 0.0f ? __frcp_rn(sm) : 0.0f;
  if (threadIdx.x == 0) s[m * lds] = sm;
  int8_t* qr = q + m * ldq;
  for (int64_t k = threadIdx.x; k < Kout; k += blockDim.x) {
    float v = 0.0f;
    if (k < K) v = fminf(127.0f, fmaxf(-127.0f, rintf(__fmul_rn(ldf(xr + k), inv))));
    qr[k] = static_cast<int8_t>(static_cast<int>(v));
  }
}

// FP8, one warp per (row, 128-channel block): s = max|x| / 448, q = e4m3(x / s) (0 where s == 0).
// Columns K .. Kout-1 are written as 0; `pairs` = M * ceil(Kout / 128).
template <class T>
__global__ void __launch_bounds__(256) quant_fp8_blocks(int64_t pairs, int64_t K, int64_t Kout, int64_t KBout,
                                                        const T* __restrict__ x, int64_t ldx, uint8_t* __restrict__ q,
                                                        int64_t ldq, float* __restrict__ s, int64_t lds) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (pair >= pairs) return;
  const int lane = threadIdx.x & 31;
  const int64_t m = pair / KBout, b = pair % KBout, k0 = b * 128 + lane * 4;
  const T* xr = x + m * ldx;
  float v[4];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = k0 + i < K ? ldf(xr + k0 + i) : 0.0f;
    amax = fmaxf(amax, fabsf(v[i]));
  }
  amax = warp_max(amax);
  const float sb = __fdiv_rn(amax, 448.0f);
  if (lane == 0 && b * 128 < K) s[m * lds + b] = sb;
  uint8_t* qr = q + m * ldq;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (k0 + i < Kout) qr[k0 + i] = (k0 + i < K && sb > 0.0f) ? to_e4m3(__fdiv_rn(v[i], sb)) : uint8_t(0);
}

// Int8Weight / Int4: x widened to fp32 [M, Kout], zero padded.
template <class T>
__global__ void to_f32_rows(int64_t M, int64_t K, int64_t Kout, const T* __restrict__ x, int64_t ldx,
                            float* __restrict__ xf) {
  const int64_t total = M * Kout;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / Kout, k = i % Kout;
    xf[i] = k < K ? ldf(x + m * ldx + k) : 0.0f;
  }
}

// bf16_linear: x' rounded to bfloat16 (nearest even) [M, Kout], zero padded, where x' = x, or with a fused
// norm x' = ((x - shift) - shift_lo) * scale per row (the normalized row, as norm_forward would write it).
__global__ void to_bf16_rows(int64_t M, int64_t K, int64_t Kout, const float* __restrict__ x, int64_t ldx,
                             RowNorm nrm, __nv_bfloat16* __restrict__ xb) {
  const int64_t total = M * Kout;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / Kout, k = i % Kout;
    float v = 0.0f;
    if (k < K) {
      v = x[m * ldx + k];
      if (nrm.shift) v -= nrm.shift[m];
      if (nrm.shift_lo) v -= nrm.shift_lo[m];
      if (nrm.scale) v *= nrm.scale[m];
    }
    xb[i] = __float2bfloat16_rn(v);
  }
}

// ============================================================================ 2a. GEMV (M <= 8, and the unaligned fallback)

struct GemvArgs {
  int64_t M, N, K;
  const void* act;   // Int8: int8 [M, ldact]; FP8: e4m3 [M, ldact]; else float [M, ldact] (ldact = Kp)
  int64_t ldact;
  const float* sx;   // Int8: [M]; FP8: [M, KB]
  int64_t KB;
  const uint8_t* W;  // row n at W + n * row_bytes
  int64_t row_bytes;
  bool vec;
  const float* sw;
  const float* zero;
  float zero_point;  // Int4 without zero: every group's (QWeight::zero_point)
  int64_t group;     // Int4 group; FP8: 0 (per tensor) or 128
  const float* bias;
  float* y;
  int64_t ldy;
  bool accumulate;
};

// One warp per output column n, MR rows of x (rows m0 .. m0+MR-1 of blockIdx.y's chunk) per W load.
template <QFormat F, int MR>
__global__ void __launch_bounds__(256) gemv_kernel(GemvArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (n >= a.N) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MR;
  const uint8_t* wr = a.W + n * a.row_bytes;
  float acc[MR];
  int iacc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    acc[r] = 0.0f;
    iacc[r] = 0;
  }
  const int64_t G = F == QFormat::Int4 ? a.K / a.group : 0;
#pragma unroll 2
  for (int64_t j0 = int64_t(lane) * 16; j0 < a.row_bytes; j0 += 32 * 16) {
    const uint4 wv = load_row16(wr, j0, a.row_bytes, a.vec);
    const uint32_t ww[4] = {wv.x, wv.y, wv.z, wv.w};
    if constexpr (F == QFormat::Int8) {
      // k = j0 .. j0+15: int32 dot of 16 int8 pairs (the activations are zero padded to Kp >= j0 + 16)
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (m0 + r >= a.M) break;
        const int8_t* xr = static_cast<const int8_t*>(a.act) + (m0 + r) * a.ldact;
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xr + j0));
        iacc[r] = __dp4a(static_cast<int>(ww[0]), static_cast<int>(xv.x), iacc[r]);
        iacc[r] = __dp4a(static_cast<int>(ww[1]), static_cast<int>(xv.y), iacc[r]);
        iacc[r] = __dp4a(static_cast<int>(ww[2]), static_cast<int>(xv.z), iacc[r]);
        iacc[r] = __dp4a(static_cast<int>(ww[3]), static_cast<int>(xv.w), iacc[r]);
      }
    } else if constexpr (F == QFormat::Int8Weight) {
      float wf[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) wf[i] = static_cast<float>(static_cast<int8_t>((ww[i >> 2] >> (8 * (i & 3))) & 0xffu));
      // grouped scales: k = j0 .. j0+15 lie in one group (group % 16 == 0), scaled here; per row: at the end.
      // Zero points (grouped only): the values (q - z) s
      const float sg = a.group > 0 ? a.sw[n * (a.K / a.group) + j0 / a.group] : 1.0f;
      if (a.zero) {
        const float zg = a.zero[n * (a.K / a.group) + j0 / a.group];
#pragma unroll
        for (int i = 0; i < 16; ++i) wf[i] -= zg;
      }
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (m0 + r >= a.M) break;
        const float4* xr = reinterpret_cast<const float4*>(static_cast<const float*>(a.act) + (m0 + r) * a.ldact + j0);
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float4 xv = __ldg(xr + i);
          part = fmaf(xv.x, wf[4 * i], part);
          part = fmaf(xv.y, wf[4 * i + 1], part);
          part = fmaf(xv.z, wf[4 * i + 2], part);
          part = fmaf(xv.w, wf[4 * i + 3], part);
        }
        acc[r] = a.group > 0 ? fmaf(sg, part, acc[r]) : acc[r] + part;
      }
    } else if constexpr (F == QFormat::FP8) {
      // k = j0 .. j0+15 lie in one 128-block b; the products e4m3 * e4m3 are exact in fp32
      float wf[16];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float2 p = e4m3x2_to_float2(ww[i >> 1] >> (16 * (i & 1)));
        wf[2 * i] = p.x;
        wf[2 * i + 1] = p.y;
      }
      const int64_t b = j0 / 128;
      const float swb = a.group == 0 ? a.sw[0] : a.sw[(n / 128) * a.KB + b];
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (m0 + r >= a.M) break;
        const uint8_t* xr = static_cast<const uint8_t*>(a.act) + (m0 + r) * a.ldact;
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xr + j0));
        const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float2 p = e4m3x2_to_float2(xw[i >> 1] >> (16 * (i & 1)));
          part = fmaf(p.x, wf[2 * i], part);
          part = fmaf(p.y, wf[2 * i + 1], part);
        }
        acc[r] = fmaf(__fmul_rn(a.sx[(m0 + r) * a.KB + b], swb), part, acc[r]);
      }
    } else {  // Int4: bytes j0 .. j0+15 hold k = 2 j0 .. 2 j0 + 31 (low nibble first), all in one group
      const int64_t k0 = 2 * j0, g = k0 / a.group;
      const float sc = a.sw[n * G + g];
      const float z = a.zero ? a.zero[n * G + g] : a.zero_point;
      float qf[32];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const uint32_t byte = (ww[i >> 2] >> (8 * (i & 3))) & 0xffu;
        qf[2 * i] = static_cast<float>(byte & 15u);
        qf[2 * i + 1] = static_cast<float>(byte >> 4);
      }
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (m0 + r >= a.M) break;
        const float4* xr = reinterpret_cast<const float4*>(static_cast<const float*>(a.act) + (m0 + r) * a.ldact + k0);
        float dq = 0.0f, xs = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float4 xv = __ldg(xr + i);
          dq = fmaf(xv.x, qf[4 * i], dq);
          dq = fmaf(xv.y, qf[4 * i + 1], dq);
          dq = fmaf(xv.z, qf[4 * i + 2], dq);
          dq = fmaf(xv.w, qf[4 * i + 3], dq);
          xs += (xv.x + xv.y) + (xv.z + xv.w);
        }
        acc[r] = fmaf(sc, fmaf(-z, xs, dq), acc[r]);  // s * (sum q x - z sum x)
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    if (m0 + r >= a.M) break;
    float v;
    if constexpr (F == QFormat::Int8) {
      const int dot = warp_sum(iacc[r]);
      v = __fmul_rn(__fmul_rn(static_cast<float>(dot), a.sx[m0 + r]), a.sw[n]);
    } else {
      v = warp_sum(acc[r]);
      if constexpr (F == QFormat::Int8Weight) {
        if (a.group == 0) v = __fmul_rn(v, a.sw[n]);
      }
    }
    if (lane == 0) store_out(a.y, (m0 + r) * a.ldy + n, v, a.bias, n, a.accumulate);
  }
}

// ============================================================================ 2b. tensor cores (Int8 / FP8 / bf16, M > 8)

constexpr int kBM = 128, kBN = 128, kBK = 128, kStages = 3, kMmaThreads = 256;
constexpr int kStageBytes = (kBM + kBN) * kBK;
constexpr int kMmaSmem = kStages * kStageBytes;  // 96 KiB

// What one mma.sync multiplies: int8 (s32 sums), E4M3 or bfloat16 (fp32 sums).
enum class MmaOp : int { S8, E4M3, BF16 };

struct MmaArgs {
  int64_t M, N, K, KT;  // K in bytes; KT = ceil(K / 128) = K tiles = FP8 scale blocks
  const uint8_t* A;     // quantized (bf16: rounded) activations [M, lda bytes], zero padded to lda = KT * 128
  int64_t lda;
  const uint8_t* W;     // [N, K] bytes, row n at W + n * ldw; K % 16 == 0, ldw % 16 == 0, 16-byte aligned
  int64_t ldw;
  const float* sx;      // Int8: [M]; FP8: [M, KT]; bf16: none
  const float* sw;      // Int8: [N]; FP8: [1] or [ceil(N / 128), KT]; bf16: none
  int64_t wgroup;
  const float* bias;
  float* y;
  int64_t ldy;
  bool accumulate;
  int grid_m, grid_n;
};

// NE_CUDA_EMU: the host build of tests/cuda_emu (g++, no GPU) runs these wrappers' PTX through the
// emulator's equivalents (tests/cuda_emu/cuda_emu.h); nvcc never defines it and compiles the asm below.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronously; bytes < 16 zero-fills the rest (0: all zeros, nothing read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
#if defined(NE_CUDA_EMU)
  ::ne_emu::cp_async16(dst, src, bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(NE_CUDA_EMU)
  ::ne_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(NE_CUDA_EMU)
  ::ne_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
// Four 8 x (8 x b16) = 8 rows x 16 bytes matrices; lane l gives the address of row (l & 7) of matrix l >> 3
// and receives, from each matrix i, bytes 4 (l & 3) .. 4 (l & 3) + 3 of its row l >> 2 in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(NE_CUDA_EMU)
  ::ne_emu::ldmatrix_x4(r, addr);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// D = A B + C for a 16 x 8 x 32 tile. Fragments (g = lane >> 2, t = lane & 3): A a[0] = row g, k 4t..4t+3;
// a[1] = row g+8, same k; a[2] = row g, k 16+4t..16+4t+3; a[3] = row g+8, k 16+4t..; B b[0] = column g,
// k 4t..4t+3; b[1] = column g, k 16+4t..; C/D c[0], c[1] = row g, columns 2t, 2t+1; c[2], c[3] = row g+8.
// (Only the pairing of A's and B's k slots matters for the sum; ldmatrix fills both the same way.)
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(NE_CUDA_EMU)
  ::ne_emu::mma_s8(c, a, b);
#else
  __trap();
#endif
}
__device__ __forceinline__ void mma_e4m3(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(NE_CUDA_EMU)
  ::ne_emu::mma_e4m3(c, a, b);
#else
  __trap();  // e4m3 MMA needs sm_89+; the host refuses older devices before launching
#endif
}

// D = A B + C for a 16 x 8 x 16 bfloat16 tile: fragments hold 2 bf16 per register, in the bytes mma_s8's hold
// 4 int8 (a[0] = row g, k 2t, 2t+1; a[2] = row g, k 8+2t ..; b[0] = column g, k 2t, 2t+1; b[1] k 8+2t ..).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(NE_CUDA_EMU)
  ::ne_emu::mma_bf16(c, a, b);
#else
  __trap();  // bf16 MMA needs sm_80+; bf16_linear declines older devices
#endif
}

// Byte offset of 16-byte chunk c (0..7) of row r in a [rows][128 bytes] swizzled tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return static_cast<uint32_t>(r * kBK + ((c ^ (r & 7)) << 4)); }

template <MmaOp OP>
__global__ void __launch_bounds__(kMmaThreads) mma_kernel(MmaArgs a) {
  constexpr bool FP8 = OP == MmaOp::E4M3;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;  // warp tile rows wm * 64 .., columns wn * 32 ..
  const int g = lane >> 2, t = lane & 3;

  // grouped rasterization: 8 row tiles share each sweep over the column tiles (A and W tiles stay in L2)
  const int pid = blockIdx.x, in_group = 8 * a.grid_n, first_m = (pid / in_group) * 8;
  const int gsize = min(a.grid_m - first_m, 8);
  const int bm = first_m + (pid % in_group) % gsize, bn = (pid % in_group) / gsize;
  const int64_t m0 = static_cast<int64_t>(bm) * kBM, n0 = static_cast<int64_t>(bn) * kBN;

  const uint32_t s_base = smem_u32(smem);
  auto load_tile = [&](int stage, int64_t kt) {
    const uint32_t sa = s_base + stage * kStageBytes, sb = sa + kBM * kBK;
    const int64_t kbase = kt * kBK;
#pragma unroll
    for (int j = 0; j < (kBM * kBK / 16) / kMmaThreads; ++j) {
      const int i = tid + j * kMmaThreads, r = i >> 3, c = i & 7;
      const int64_t k = kbase + c * 16;
      const int64_t gm = m0 + r;  // activations are padded along K: only the M tail is masked
      const bool okA = gm < a.M;
      cp_async16(sa + swz(r, c), okA ? static_cast<const void*>(a.A + gm * a.lda + k) : a.A, okA ? 16 : 0);
      const int64_t gn = n0 + r;  // weights: N tail and K tail (K % 16 == 0: whole chunks) masked
      const bool okB = gn < a.N && k < a.K;
      cp_async16(sb + swz(r, c), okB ? static_cast<const void*>(a.W + gn * a.ldw + k) : a.W, okB ? 16 : 0);
    }
  };

  using Acc = typename std::conditional<OP == MmaOp::S8, int, float>::type;
  Acc acc[4][4][4];
  float part[FP8 ? 4 : 1][FP8 ? 4 : 1][4];  // FP8: the current K block's sums before scaling
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = Acc(0);
  if constexpr (FP8) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[mi][ni][e] = 0.0f;
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < a.KT) load_tile(s, s);
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < a.KT; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (this thread's copies) ...
    __syncthreads();               // ... everyone's, and everyone is done with tile kt - 1's stage
    {
      const int64_t next = kt + kStages - 1;
      if (next < a.KT) load_tile(static_cast<int>(next % kStages), next);
      cp_async_commit();
    }
    const uint32_t sa = s_base + static_cast<int>(kt % kStages) * kStageBytes, sb = sa + kBM * kBK;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t af[4][4], bfr[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // matrices: (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31)
        const int r = wm * 64 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(af[mi], sa + swz(r, ks * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        // matrices: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31)
        const int r = wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) & 1) * 8;
        uint32_t q[4];
        ldmatrix_x4(q, sb + swz(r, ks * 2 + ((lane >> 3) & 1)));
        bfr[2 * np][0] = q[0];
        bfr[2 * np][1] = q[1];
        bfr[2 * np + 1][0] = q[2];
        bfr[2 * np + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          if constexpr (FP8)
            mma_e4m3(part[mi][ni], af[mi], bfr[ni]);
          else if constexpr (OP == MmaOp::BF16)
            mma_bf16(acc[mi][ni], af[mi], bfr[ni]);
          else
            mma_s8(acc[mi][ni], af[mi], bfr[ni]);
        }
    }
    if constexpr (FP8) {
      // promotion: acc += (s_x[m, b] * s_w(n, b)) * part, b = kt; the CTA's 128 columns are one weight block
      const float swb = a.wgroup == 0 ? a.sw[0] : a.sw[(n0 / 128) * a.KT + kt];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t m = m0 + wm * 64 + mi * 16 + g + 8 * h;
          const float f = m < a.M ? __fmul_rn(a.sx[m * a.KT + kt], swb) : 0.0f;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              acc[mi][ni][2 * h + e] = fmaf(f, part[mi][ni][2 * h + e], acc[mi][ni][2 * h + e]);
              part[mi][ni][2 * h + e] = 0.0f;
            }
        }
    }
  }
  cp_async_wait<0>();

  // epilogue: Int8 y = (float(dot) * s_x[m]) * s_w[n]; FP8 / bf16 y = acc; + bias (+ y)
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wm * 64 + mi * 16 + g + 8 * h;
      if (m >= a.M) continue;
      const float sxm = OP == MmaOp::S8 ? a.sx[m] : 1.0f;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t n = n0 + wn * 32 + ni * 8 + 2 * t + e;
          if (n >= a.N) continue;
          float v;
          if constexpr (OP != MmaOp::S8)
            v = acc[mi][ni][2 * h + e];
          else
            v = __fmul_rn(__fmul_rn(static_cast<float>(acc[mi][ni][2 * h + e]), sxm), a.sw[n]);
          store_out(a.y, m * a.ldy + n, v, a.bias, n, a.accumulate);
        }
    }
}

// ============================================================================ 2c. fp32 tiles (Int8Weight / Int4, M > 8)

constexpr int kFBM = 64, kFBN = 64, kFBK = 32;

struct FmaArgs {
  int64_t M, N, K;
  const float* xf;  // [M, ldx], zero padded to ldx = Kp (a multiple of 128 >= K)
  int64_t ldx;
  const uint8_t* W;
  const float* sw;
  const float* zero;
  float zero_point;  // Int4 without zero: every group's (QWeight::zero_point)
  int64_t group;
  const float* bias;
  float* y;
  int64_t ldy;
  bool accumulate;
};

// y tile = X tile (64 x K) times dequantized W tile^T (K x 64): Int4 w = (q - z) s (a K step of 32 lies in
// one group: group % 32 == 0), Int8Weight w = q with s_w[n] in the epilogue (grouped: w = q s_w[n, g] in the
// loader). 256 threads, 4 x 4 each.
template <QFormat F>
__global__ void __launch_bounds__(256) fma_kernel(FmaArgs a) {
  __shared__ __align__(16) float Xs[kFBK][kFBM + 4];
  __shared__ __align__(16) float Ws[kFBK][kFBN + 4];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kFBM, n0 = static_cast<int64_t>(blockIdx.x) * kFBN;
  const int lr = tid >> 2, lk = (tid & 3) * 8;  // loader: row lr of the tile, k lk .. lk+7
  const int tr = tid >> 4, tc = tid & 15;       // outputs rows tr*4 .. +3, columns tc*4 .. +3
  const int64_t G = F == QFormat::Int4 ? a.K / a.group : 0;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < a.K; k0 += kFBK) {
    {
      const int64_t m = m0 + lr;
      float xv[8];
      if (m < a.M) {
        const float4* p = reinterpret_cast<const float4*>(a.xf + m * a.ldx + k0 + lk);
        const float4 u = p[0], v = p[1];
        xv[0] = u.x, xv[1] = u.y, xv[2] = u.z, xv[3] = u.w, xv[4] = v.x, xv[5] = v.y, xv[6] = v.z, xv[7] = v.w;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[i] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) Xs[lk + i][lr] = xv[i];
    }
    {
      const int64_t n = n0 + lr;
      float wv[8];
      if constexpr (F == QFormat::Int8Weight) {
        const int8_t* wr = reinterpret_cast<const int8_t*>(a.W) + n * a.K;
        // grouped scales dequantize here (a loader's 8 columns lie in one group of 16 or more); per-row ones in
        // the epilogue
        const int64_t gi = (a.group > 0 && n < a.N) ? n * (a.K / a.group) + (k0 + lk) / a.group : 0;
        const float sg = (a.group > 0 && n < a.N) ? a.sw[gi] : 1.0f;
        const float zg = (a.zero && n < a.N) ? a.zero[gi] : 0.0f;  // (zero points: grouped only)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t k = k0 + lk + i;
          wv[i] = (n < a.N && k < a.K) ? __fmul_rn(static_cast<float>(wr[k]) - zg, sg) : 0.0f;
        }
      } else {  // Int4: K % 32 == 0, so k0 + lk + 8 <= K
        if (n < a.N) {
          const int64_t g = k0 / a.group;
          const float sc = a.sw[n * G + g], z = a.zero ? a.zero[n * G + g] : a.zero_point;
          const uint8_t* wr = a.W + n * (a.K / 2) + (k0 + lk) / 2;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t byte = wr[i];
            wv[2 * i] = __fmul_rn(static_cast<float>(byte & 15u) - z, sc);
            wv[2 * i + 1] = __fmul_rn(static_cast<float>(byte >> 4) - z, sc);
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) wv[i] = 0.0f;
        }
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) Ws[lk + i][lr] = wv[i];
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kFBK; ++kk) {
      const float4 xa = *reinterpret_cast<const float4*>(&Xs[kk][tr * 4]);
      const float4 wb = *reinterpret_cast<const float4*>(&Ws[kk][tc * 4]);
      const float xr[4] = {xa.x, xa.y, xa.z, xa.w}, wc[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xr[i], wc[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tr * 4 + i;
    if (m >= a.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tc * 4 + j;
      if (n >= a.N) continue;
      float v = acc[i][j];
      if constexpr (F == QFormat::Int8Weight) {
        if (a.group == 0) v = __fmul_rn(v, a.sw[n]);
      }
      store_out(a.y, m * a.ldy + n, v, a.bias, n, a.accumulate);
    }
  }
}

// ============================================================================ host side

void check_x(DType xdt) {
  if (xdt != DType::F32 && xdt != DType::BF16 && xdt != DType::F16)
    throw DTypeError(std::string("x: expected float32, bfloat16 or float16, got ") + dtype_name(xdt));
}

// FP8 MMA / e4m3 conversions need compute capability 8.9+ (Ada, Hopper).
void require_fp8_device() {
  int dev = 0, major = 0, minor = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major * 10 + minor < 89)
    throw UnsupportedError("fp8: the E4M3 kernels need a GPU of compute capability 8.9 or newer, this one is " +
                           std::to_string(major) + "." + std::to_string(minor));
}

template <class T>
void launch_quant_act(QFormat fmt, int64_t M, int64_t K, int64_t Kout, const T* x, int64_t ldx, void* q, int64_t ldq,
                      float* s, int64_t lds, cudaStream_t st) {
  if (fmt == QFormat::Int8) {
    if (M > 2147483647LL) throw ShapeError("x: too many rows");
    quant_int8_rows<T><<<static_cast<unsigned>(M), 256, 0, st>>>(K, Kout, x, ldx, static_cast<int8_t*>(q), ldq, s, lds);
    check_launch("quant_int8_rows");
  } else {
    const int64_t KBout = ceil_div(Kout, 128), pairs = M * KBout, blocks = ceil_div(pairs, 8);
    if (blocks > 2147483647LL) throw ShapeError("x: too many rows");
    quant_fp8_blocks<T><<<static_cast<unsigned>(blocks), 256, 0, st>>>(pairs, K, Kout, KBout, x, ldx,
                                                                        static_cast<uint8_t*>(q), ldq, s, lds);
    check_launch("quant_fp8_blocks");
  }
}

void quant_act_any(QFormat fmt, int64_t M, int64_t K, int64_t Kout, const void* x, DType xdt, int64_t ldx, void* q,
                   int64_t ldq, float* s, int64_t lds, cudaStream_t st) {
  switch (xdt) {
    case DType::F32:
      return launch_quant_act(fmt, M, K, Kout, static_cast<const float*>(x), ldx, q, ldq, s, lds, st);
    case DType::BF16:
      return launch_quant_act(fmt, M, K, Kout, static_cast<const __nv_bfloat16*>(x), ldx, q, ldq, s, lds, st);
    default:
      return launch_quant_act(fmt, M, K, Kout, static_cast<const __half*>(x), ldx, q, ldq, s, lds, st);
  }
}

void to_f32_any(int64_t M, int64_t K, int64_t Kout, const void* x, DType xdt, int64_t ldx, float* xf, cudaStream_t st) {
  const int64_t blocks = std::min<int64_t>(ceil_div(M * Kout, 256), 65535);
  const unsigned b = static_cast<unsigned>(std::max<int64_t>(1, blocks));
  switch (xdt) {
    case DType::F32: to_f32_rows<float><<<b, 256, 0, st>>>(M, K, Kout, static_cast<const float*>(x), ldx, xf); break;
    case DType::BF16:
      to_f32_rows<__nv_bfloat16><<<b, 256, 0, st>>>(M, K, Kout, static_cast<const __nv_bfloat16*>(x), ldx, xf);
      break;
    default: to_f32_rows<__half><<<b, 256, 0, st>>>(M, K, Kout, static_cast<const __half*>(x), ldx, xf); break;
  }
  check_launch("to_f32_rows");
}

template <QFormat F>
void launch_gemv(const GemvArgs& a, cudaStream_t st) {
  const int64_t gx = ceil_div(a.N, 8);
  if (gx > 2147483647LL) throw ShapeError("qweight: too many output features");
  auto go = [&](auto kernel, int mr) {
    const int64_t gy = ceil_div(a.M, mr);
    if (gy > 65535) throw ShapeError("x: too many rows for the GEMV kernel (" + std::to_string(a.M) + ")");
    kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), 256, 0, st>>>(a);
    check_launch("quant gemv_kernel");
  };
  if (a.M <= 1) go(gemv_kernel<F, 1>, 1);
  else if (a.M <= 2) go(gemv_kernel<F, 2>, 2);
  else if (a.M <= 4) go(gemv_kernel<F, 4>, 4);
  else go(gemv_kernel<F, 8>, 8);
}

// The tensor-core kernel over a's M x N outputs (grid from M, N), on st.
void launch_mma(void (*kernel)(MmaArgs), MmaArgs a, cudaStream_t st) {
  const int64_t gm = ceil_div(a.M, kBM), gn = ceil_div(a.N, kBN);
  if (gm * gn > 2147483647LL || gm > 2147483647LL / 8) throw ShapeError("mma_kernel: problem too large for one launch");
  a.grid_m = static_cast<int>(gm);
  a.grid_n = static_cast<int>(gn);
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaSmem),
        "cudaFuncSetAttribute (mma_kernel)");
  kernel<<<static_cast<unsigned>(gm * gn), kMmaThreads, kMmaSmem, st>>>(a);
  check_launch("mma_kernel");
}

}  // namespace

// ============================================================================ entry points

void quant_activations(int64_t M, int64_t K, const void* x, DType xdt, int64_t ldx, QFormat fmt, void* q, int64_t ldq,
                       float* s, int64_t lds, void* stream) {
  check_x(xdt);
  if (fmt != QFormat::Int8 && fmt != QFormat::FP8)
    throw ValueError("format: activations are quantized for int8 (W8A8) and fp8 only");
  if (M <= 0 || K <= 0) return;
  if (fmt == QFormat::FP8) require_fp8_device();
  quant_act_any(fmt, M, K, K, x, xdt, ldx, q, ldq, s, lds, as_stream(stream));
}

void quant_linear(int64_t M, const void* x, DType xdt, int64_t ldx, const QWeight& w, const float* bias, float* y,
                  int64_t ldy, bool accumulate, void* stream) {
  check_qweight(w);
  check_x(xdt);
  if (M <= 0) return;
  if (!x || !y) throw ValueError("quant_linear: null x or y");
  if (M > 1 && ldx < w.K) throw ShapeError("x: row stride " + std::to_string(ldx) + " < in_features " + std::to_string(w.K));
  if (M > 1 && ldy < w.N) throw ShapeError("out: row stride " + std::to_string(ldy) + " < out_features " + std::to_string(w.N));
  const cudaStream_t st = as_stream(stream);
  const int64_t N = w.N, K = w.K, KB = ceil_div(K, kKPad), Kp = KB * kKPad;
  const bool eight_bit = w.format == QFormat::Int8 || w.format == QFormat::FP8;
  if (w.format == QFormat::Int8 && Kp > 131072)
    throw UnsupportedError("int8: in_features " + std::to_string(K) +
                           " > 131072 could overflow the int32 accumulators (127 * 127 * K)");
  if (w.format == QFormat::FP8) require_fp8_device();

  // 1. activations into stream-ordered scratch
  StreamScratch scratch;
  const size_t act_bytes = static_cast<size_t>(M * Kp) * (eight_bit ? 1 : sizeof(float));
  const size_t act_pad = (act_bytes + 255) / 256 * 256;
  const size_t sx_count = w.format == QFormat::Int8 ? M : w.format == QFormat::FP8 ? M * KB : 0;
  char* buf = static_cast<char*>(scratch.alloc(act_pad + sx_count * sizeof(float) + 16, st));
  void* act = buf;
  float* sx = reinterpret_cast<float*>(buf + act_pad);
  if (eight_bit)
    quant_act_any(w.format, M, K, Kp, x, xdt, ldx, act, Kp, sx, w.format == QFormat::Int8 ? 1 : KB, st);
  else
    to_f32_any(M, K, Kp, x, xdt, ldx, static_cast<float*>(act), st);

  // 2 + 3. GEMM and epilogue
  const bool w_aligned = aligned16(w.data);
  const bool mma_ok = eight_bit && w_aligned && K % 16 == 0;
#if !defined(NE_CUDA_EMU)
  // On Hopper: wgmma kernels fed by TMA (cuda/quant_gemm_sm90.h); they decline what they cannot address.
  if (M > kGemvMaxM && eight_bit &&
      quant_gemm_sm90(Sm90QGemm{w.format, M, N, K, act, Kp, sx, w.data, K, w.scale, w.group, bias, y, ldy, accumulate},
                      st))
    return;
#endif
  if (M > kGemvMaxM && mma_ok) {
    MmaArgs a{};
    a.M = M;
    a.N = N;
    a.K = K;
    a.KT = KB;
    a.A = static_cast<const uint8_t*>(act);
    a.lda = Kp;
    a.W = static_cast<const uint8_t*>(w.data);
    a.ldw = K;
    a.sx = sx;
    a.sw = w.scale;
    a.wgroup = w.group;
    a.bias = bias;
    a.y = y;
    a.ldy = ldy;
    a.accumulate = accumulate;
    launch_mma(w.format == QFormat::FP8 ? mma_kernel<MmaOp::E4M3> : mma_kernel<MmaOp::S8>, a, st);
    return;
  }
  if (M > kGemvMaxM && !eight_bit) {
    FmaArgs a{};
    a.M = M;
    a.N = N;
    a.K = K;
    a.xf = static_cast<const float*>(act);
    a.ldx = Kp;
    a.W = static_cast<const uint8_t*>(w.data);
    a.sw = w.scale;
    a.zero = w.zero;
    a.zero_point = w.zero_point;
    a.group = w.group;
    a.bias = bias;
    a.y = y;
    a.ldy = ldy;
    a.accumulate = accumulate;
    const int64_t gx = ceil_div(N, kFBN), gy = ceil_div(M, kFBM);
    if (gx > 2147483647LL || gy > 65535) throw ShapeError("quant_linear: problem too large for one launch");
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    if (w.format == QFormat::Int4)
      fma_kernel<QFormat::Int4><<<grid, 256, 0, st>>>(a);
    else
      fma_kernel<QFormat::Int8Weight><<<grid, 256, 0, st>>>(a);
    check_launch("quant fma_kernel");
    return;
  }
  // GEMV: decode (M <= 8), or 8-bit weights the tensor-core kernel cannot stream (K % 16 != 0 or unaligned)
  GemvArgs a{};
  a.M = M;
  a.N = N;
  a.K = K;
  a.act = act;
  a.ldact = Kp;
  a.sx = sx;
  a.KB = KB;
  a.W = static_cast<const uint8_t*>(w.data);
  a.row_bytes = w.format == QFormat::Int4 ? K / 2 : K;
  a.vec = w_aligned && a.row_bytes % 16 == 0;
  a.sw = w.scale;
  a.zero = w.zero;
  a.zero_point = w.zero_point;
  a.group = w.group;
  a.bias = bias;
  a.y = y;
  a.ldy = ldy;
  a.accumulate = accumulate;
  switch (w.format) {
    case QFormat::Int8: launch_gemv<QFormat::Int8>(a, st); break;
    case QFormat::Int8Weight: launch_gemv<QFormat::Int8Weight>(a, st); break;
    case QFormat::Int4: launch_gemv<QFormat::Int4>(a, st); break;
    default: launch_gemv<QFormat::FP8>(a, st); break;
  }
}

bool bf16_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, int64_t ldw,
                 const float* bias, float* y, int64_t ldy, bool accumulate, void* stream, const RowNorm& norm) {
  if (M <= 0 || N <= 0 || K <= 0 || K % 8 || ldw % 8 || !aligned16(w)) return false;
  int dev = 0, major = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  if (major < 8) return false;
  const cudaStream_t st = as_stream(stream);
  const int64_t KB = ceil_div(2 * K, kBK), Kp = KB * kBK / 2;  // elements per padded activation row
  StreamScratch scratch;
  auto* xb = static_cast<__nv_bfloat16*>(scratch.alloc(static_cast<size_t>(M * Kp) * 2, st));
  const int64_t blocks = std::min<int64_t>(ceil_div(M * Kp, 256), 65535);
  to_bf16_rows<<<static_cast<unsigned>(blocks), 256, 0, st>>>(M, K, Kp, x, ldx, norm, xb);
  check_launch("to_bf16_rows");
  MmaArgs a{};
  a.M = M;
  a.N = N;
  a.K = 2 * K;
  a.KT = KB;
  a.A = reinterpret_cast<const uint8_t*>(xb);
  a.lda = 2 * Kp;
  a.W = static_cast<const uint8_t*>(w);
  a.ldw = 2 * ldw;
  a.bias = bias;
  a.y = y;
  a.ldy = ldy;
  a.accumulate = accumulate;
  launch_mma(mma_kernel<MmaOp::BF16>, a, st);
  return true;
}

}  // namespace cuda
}  // namespace ne
