// L-Mul on the GPU (definition and special values: cpp/ops/lmul.h). Every product is the same integer
// arithmetic on fp32 bit patterns as the CPU kernels (cpp/ops/lmul.cpp), so products agree bit for
// bit; GEMM sums run strictly in k order per output, as on the CPU.
//
//   t(x) = (x is NaN ? 0x7fc00000 : bits(x)) & trunc
//   A = t(x) & 0x7fffffff, B = t(y) & 0x7fffffff, s = (t(x) ^ t(y)) & 0x80000000
//   u = A + B, r = u - C  (C = (127 << 23) - 2^(23 - l))
//   r -> 0 on underflow (u < C + 2^23), Inf on overflow (r >= 0x7f800000); specials as documented; | s
//
// lmul_bmm: y[b] = x[b] (M x K) times w[b]^T (w: N x K) (lmul_linear: one such product + bias + old y), 64 x 64 output tiles per block of 256
// threads, 4 x 4 register tile per thread, K in steps of 16 staged in shared memory as t(.) bit
// patterns (transposed to [k][row] so the inner loop reads 4 + 4 words per 16 products). Inner loop:
// integer adds and compares, one fp32 add per product. Traffic: each x / w element is read from global
// memory N/64 resp. M/64 times (L2 absorbs most), y written once.
#include <cstdint>

#include "common.cuh"
#include "ops/lmul.h"
#include "ops/lmul_bits.h"

namespace ne {
namespace cuda {
namespace {

using lmul_bits::checked1, lmul_bits::prep1;  // cpp/ops/lmul_bits.h: the CPU's scalar definition, verbatim

__global__ void map_kernel(int64_t n, const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                           uint32_t trunc, uint32_t C) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __uint_as_float(checked1(prep1(__float_as_uint(a[i]), trunc), prep1(__float_as_uint(b[i]), trunc), C));
}

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;

__global__ void __launch_bounds__(256) bmm_kernel(int64_t M, int64_t N, int64_t K, const float* __restrict__ x,
                                                  int64_t sxb, int64_t ldx, const float* __restrict__ w, int64_t swb,
                                                  int64_t ldw, float* __restrict__ y, int64_t syb, int64_t ldy,
                                                  uint32_t trunc, uint32_t C, const float* __restrict__ bias,
                                                  bool accumulate) {
  __shared__ uint32_t As[BK][BM + 1];
  __shared__ uint32_t Bs[BK][BN + 1];
  const int64_t bi = blockIdx.z, m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  x += bi * sxb;
  w += bi * swb;
  y += bi * syb;
  const int tid = threadIdx.x, tr = tid / (BN / TN), tc = tid % (BN / TN);
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    // stage t(x) and t(w): 64 rows x 16 k each, 4 elements per thread
    for (int e = tid; e < BM * BK; e += 256) {
      const int r = e / BK, k = e % BK;
      const int64_t gm = m0 + r, gn = n0 + r, gk = k0 + k;
      As[k][r] = (gm < M && gk < K) ? prep1(__float_as_uint(x[gm * ldx + gk]), trunc) : 0u;
      Bs[k][r] = (gn < N && gk < K) ? prep1(__float_as_uint(w[gn * ldw + gk]), trunc) : 0u;
    }
    __syncthreads();
    const int kc = int(K - k0 < BK ? K - k0 : BK);
    for (int k = 0; k < kc; ++k) {
      uint32_t a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[k][tr * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[k][tc * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = __fadd_rn(acc[i][j], __uint_as_float(checked1(a[i], b[j], C)));
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t gm = m0 + tr * TM + i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t gn = n0 + tc * TN + j;
      if (gn >= N) continue;
      float v = acc[i][j];  // the sum, then + bias, then + old y (lmul_gemm_f32's order)
      if (bias) v = __fadd_rn(v, bias[gn]);
      y[gm * ldy + gn] = accumulate ? __fadd_rn(y[gm * ldy + gn], v) : v;
    }
  }
}

}  // namespace

void lmul_map(int64_t n, const float* a, const float* b, float* out, int bits, void* stream) {
  if (n <= 0) return;
  const LmulConst k = lmul_const(bits);
  int64_t blocks = (n + 255) / 256;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  map_kernel<<<static_cast<unsigned>(blocks), 256, 0, as_stream(stream)>>>(n, a, b, out, k.trunc, k.c);
  check_launch("lmul map_kernel");
}

void lmul_bmm(int64_t B, int64_t M, int64_t N, int64_t K, const float* x, int64_t sxb, int64_t ldx, const float* w,
              int64_t swb, int64_t ldw, float* y, int64_t syb, int64_t ldy, int bits, void* stream) {
  if (B <= 0 || M <= 0 || N <= 0) return;
  const LmulConst k = lmul_const(bits);
  if ((M + BM - 1) / BM > 65535) throw ShapeError("lmul_bmm: more than 65535 * 64 rows per batch entry");
  for (int64_t b0 = 0; b0 < B; b0 += 65535) {  // grid.z is limited to 65535
    const int64_t nb = B - b0 < 65535 ? B - b0 : 65535;
    dim3 grid(static_cast<unsigned>((N + BN - 1) / BN), static_cast<unsigned>((M + BM - 1) / BM),
              static_cast<unsigned>(nb));
    bmm_kernel<<<grid, 256, 0, as_stream(stream)>>>(M, N, K, x + b0 * sxb, sxb, ldx, w + b0 * swb, swb, ldw,
                                                    y + b0 * syb, syb, ldy, k.trunc, k.c, nullptr, false);
    check_launch("lmul bmm_kernel");
  }
}

void lmul_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                 const float* bias, float* y, int64_t ldy, bool accumulate, int bits, void* stream) {
  if (M <= 0 || N <= 0) return;
  const LmulConst k = lmul_const(bits);
  if ((M + BM - 1) / BM > 65535) throw ShapeError("lmul_linear: more than 65535 * 64 rows");
  dim3 grid(static_cast<unsigned>((N + BN - 1) / BN), static_cast<unsigned>((M + BM - 1) / BM), 1);
  bmm_kernel<<<grid, 256, 0, as_stream(stream)>>>(M, N, K, x, 0, ldx, w, 0, ldw, y, 0, ldy, k.trunc, k.c, bias,
                                                  accumulate);
  check_launch("lmul bmm_kernel (linear)");
}

}  // namespace cuda
}  // namespace ne
