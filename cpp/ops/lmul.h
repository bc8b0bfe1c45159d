// L-Mul (Luo & Sun 2024, "Addition is All You Need for Energy-efficient Language Models"): a float
// multiplication replaced by one integer addition of the operands' bit patterns (kernels in
// cpp/ops/lmul.cpp, one instance per ISA; entry points in cpp/ops/lmul_entry.cpp; CUDA in cuda/lmul.cu;
// Python: normengine.ops.lmul / lmul_matmul / lmul_attention).
//
// For fp32 operands with mantissas truncated (not rounded) to m bits (1 <= m <= 23):
//   L-Mul(x, y) = (1 + x_m + y_m + 2^-l(m)) * 2^(x_e + y_e),  sign = sign(x) XOR sign(y),
//   l(m) = m for m <= 3, 3 for m = 4, 4 for m > 4,
// computed as in the paper by one integer addition of the sign-stripped, truncated bit patterns:
//   bits = A + B - C,   C = (127 << 23) - 2^(23 - l)   (one exponent bias, minus the 2^-l offset)
// The exponent fields add and the mantissa fields add with the offset; the field sum s = x_m + y_m + 2^-l
// spills floor(s) into the exponent, so the result is 2^(e + floor(s)) (1 + s - floor(s)): the formula
// above when s < 1, 2^(e+1) s when 1 <= s < 2, 2^(e+2) (s - 1) when s >= 2 (only possible for l < m).
// This is the paper's bit-level behaviour.
// The product is exact in fp32 (at most max(m, l) + 1 mantissa bits), so all rounding is in the sums.
// Special values (the engine's choices, identical in every kernel, CPU and CUDA):
//   - a NaN operand (any payload) is first canonicalised to 0x7fc00000 so truncation cannot turn it
//     into Inf; a NaN operand gives the canonical NaN 0x7fc00000 (positive);
//   - a zero or subnormal operand gives a zero signed as the XOR (subnormals flush, as in the paper's
//     normal-only analysis);
//   - Inf times a normal number is Inf signed as the XOR; Inf times zero/subnormal is NaN (IEEE);
//   - a result exponent below the normal range flushes to (signed) zero, above it saturates to (signed) Inf.
#pragma once
#include <cstdint>

#include "core/dispatch.h"
#include "ops/attention.h"

namespace ne {

// One L-Mul product of fp32 values: the scalar definition every kernel matches bit for bit.
float lmul_scalar(float a, float b, int mantissa_bits);

// y[m, n] = sum_k lmul(x[m, k], W[n, k]) (+ bias[n]) (+ y[m, n] if accumulate); fp32 accumulation
// strictly in k order per output (so every ISA, any thread count and the CUDA kernel give the same
// bits), then + bias, then + old y. W float32 [N, K] rows with stride ldw (torch.nn.Linear layout), or with
// w_kn [K, N] rows (w[k * ldw + n]: torch.matmul's right operand, read in place; the same bits); x rows
// stride ldx; multithreaded over N. y must not overlap x or W.
void lmul_gemm_f32(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                   const float* bias, float* y, int64_t ldy, bool accumulate, int mantissa_bits, bool w_kn = false);

// out[i] = lmul(a[i], b[i]) for i < n (contiguous), multithreaded.
void lmul_map_f32(int64_t n, const float* a, const float* b, float* out, int mantissa_bits);

// The runner's causal softmax attention over a KV cache (AttnArgs, ops/attention.h: GQA, scale
// applied exactly after the q.k sum) with every q.k and p.v product an L-Mul; the softmax itself is
// exact, p normalised before the p.v products; sums in key / feature order.
void lmul_cache_attention(const AttnArgs& a, int mantissa_bits);

// ------------------------------------------------------------------------------ internal
// Truncation mask and offset constant of m mantissa bits.
struct LmulConst {
  uint32_t trunc;  // keeps sign, exponent and the top m mantissa bits
  uint32_t c;      // (127 << 23) - 2^(23 - l(m))
};
inline int lmul_l(int m) { return m <= 3 ? m : (m == 4 ? 3 : 4); }
inline LmulConst lmul_const(int m) {
  LmulConst k;
  k.trunc = 0xffffffffu << (23 - m);
  k.c = (127u << 23) - (1u << (23 - lmul_l(m)));
  return k;
}

// Per row of x over its K entries (after truncation): smallest and largest biased exponent of the
// normal entries; bad = 2 if any entry is Inf / NaN (only the checked kernel may touch the row), else 1
// if any is zero / subnormal (the fast kernel skips those products), else 0.
struct LmulRowStat {
  int32_t emin, emax, bad;
};

struct LmulArgs {
  int64_t M, N, K;
  const uint32_t* xp;        // prepared x: [M, K] contiguous, truncated bits minus C (see lmul.cpp)
  const LmulRowStat* xstat;  // [M]
  const float* w; int64_t ldw;  // W [N, K]: w[n * ldw + k]
  const float* bias;
  float* y; int64_t ldy;
  bool accumulate;
  int bits;
  bool w_kn = false;         // W stored [K, N] instead (w[k * ldw + n]): a V cache read as V^T
};

struct LmulTable {
  // columns [n0, n1) of the product, all rows (the caller splits N; each output is independent)
  void (*gemm_cols)(const LmulArgs& a, int64_t n0, int64_t n1);
  void (*map)(int64_t n, const float* a, const float* b, float* out, int bits);
  // out[i] += lmul(p, v[i]) for i < n
  void (*axpy)(int64_t n, float p, const float* v, float* out, int bits);
  // out[j] = sum_d lmul(q[d], k[j * ldk + d]), d = 0 .. D - 1 in order, for j < n
  void (*dots)(int64_t n, int D, const float* q, const float* k, int64_t ldk, float* out, int bits);
  // xp[i] = prep(x[i]) for one row of n; returns the row's stats
  LmulRowStat (*prep_row)(int64_t n, const float* x, uint32_t* xp, int bits);
};

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::LmulTable, lmul_table)

#if defined(NE_WITH_CUDA)
namespace ne {
namespace cuda {
// cuda/lmul.cu: the same products on the GPU (bit for bit), on `stream` (a cudaStream_t).
// out[i] = lmul(a[i], b[i]), contiguous, n elements.
void lmul_map(int64_t n, const float* a, const float* b, float* out, int bits, void* stream);
// y[b, m, n] = sum_k lmul(x[b, m, k], w[b, n, k]), k in order; strides in elements (batch, row), unit
// stride along k and n.
void lmul_bmm(int64_t B, int64_t M, int64_t N, int64_t K, const float* x, int64_t sxb, int64_t ldx,
              const float* w, int64_t swb, int64_t ldw, float* y, int64_t syb, int64_t ldy, int bits, void* stream);
// lmul_gemm_f32 on the GPU, bit for bit: y[m, n] = sum_k lmul(x[m, k], w[n, k]) (+ bias[n]) (+ old y[m, n]
// if accumulate), k in order from +0, then + bias, then + old y. Device pointers; unit stride along k.
void lmul_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                 const float* bias, float* y, int64_t ldy, bool accumulate, int bits, void* stream);
}  // namespace cuda
}  // namespace ne
#endif
