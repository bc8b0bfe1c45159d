// W8A8 int8 GEMM on x86 with the integer dot-product instructions beyond AVX2, chosen at run time:
//
//   y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k]        (int32 sums; then the epilogue, quant_store)
//
// with xq the per-token int8 activations the entry point prepared (quant_gemm_f32) and wq the packed
// [N, K] int8 weight as stored (no repacking of W, ever). Three kernels:
//
//  - "avx512vnni": vpdpbusd (u8 x s8 -> 4 products summed into each int32 lane, no saturation). The
//    instruction wants one unsigned operand, so x is offset by 128 on load (xu = xq ^ 0x80 = xq + 128
//    as u8) and the offset taken back per output:  sum_k xq w = sum_k xu w - 128 sum_k w,  with
//    sum_k w accumulated by the same instruction on a vector of ones (one extra vpdpbusd per W load,
//    shared by every row of x). Micro-kernel: MR <= 4 rows of x by NR <= 4 rows of W, 64 k per step,
//    MR*NR + NR accumulators; K tails by byte-masked loads (masked-out w = 0 adds nothing). For
//    M >= 16 a packed-panel GEMM instead (32 W rows in VNNI order per panel, x broadcast 4 bytes at a
//    time, 8 x 32 outputs in registers, no horizontal sums).
//  - "avxvnni": the same on 256-bit vectors (VEX vpdpbusd, Alder Lake and later), MR <= 4 by NR <= 2
//    (16 ymm registers), K tail in scalar code; for M >= 16 the packed-panel GEMM on 16-row panels.
//  - "amx": Sapphire Rapids tile multiply (TDPBSSD, s8 x s8 -> int32, 16 x 16 x 64 per instruction).
//    The product is computed transposed, C^T[n, m] = sum_k W[n, k] x[m, k], so that W's rows load as
//    the A tile straight from the packed weight (16 rows x 64 bytes, row stride K) and only x is
//    re-laid out, once per call, into the B tiles' VNNI order: B[kk][4 m + j] = xq[m, k0 + 4 kk + j].
//    Register blocking 2 x 2 (tmm0-3 accumulate 32 n x 32 m, tmm4-5 W, tmm6-7 x): per 64 k, four tile
//    loads feed four TDPBSSD. Needs K % 64 == 0; W rows beyond the last multiple of 32 go to the VNNI
//    kernel. The OS must grant the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), asked once per process.
//
// Everything else (no VNNI, "isa" forced) runs the ISA family's kernel in quant_gemm.cpp (AVX2
// vpmaddubsw or scalar). The selection: int8_kernel() / force_int8_kernel() below.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "core/aligned.h"
#include "core/amx.h"
#include "core/parallel.h"
#include "normengine/errors.h"
#include "ops/quant_elem.h"
#include "ops/quant_gemm.h"

#if defined(NE_HAVE_X86_ISAS) && defined(__GNUC__)
#define NE_INT8_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace ne {

#if defined(NE_INT8_X86)
namespace {

// Rows of x in blocks of MR: f(std::integral_constant<int, MR>{}, m) for each whole block, then once
// with the remaining M % MR rows (the micro-kernels are templates on their row count).
template <int R, class F>
void row_tail(int64_t rest, int64_t m, F& f) {
  if constexpr (R > 0) {
    if (rest == R) f(std::integral_constant<int, R>{}, m);
    else row_tail<R - 1>(rest, m, f);
  }
}
template <int MR, class F>
void for_row_blocks(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) f(std::integral_constant<int, MR>{}, m);
  row_tail<MR - 1>(M - m, m, f);
}

// The packed-panel layout of both VNNI GEMMs below, element by element (the panels that the vector
// packers do not take: the last one, past N, or K % 4 != 0): Wp[kq][j][t] = W[n0 + j, 4 kq + t] (0 past
// N or K), wsum[j] = sum_k W[n0 + j, k], for j < width.
void pack_panel_scalar(const QArgs& a, int64_t n0, int64_t KQ, int width, int8_t* Wp, int32_t* wsum) {
  const int64_t K = a.w->K;
  const int8_t* W = static_cast<const int8_t*>(a.w->data);
  for (int j = 0; j < width; ++j) {
    const int64_t n = n0 + j;
    int32_t sum = 0;
    for (int64_t kq = 0; kq < KQ; ++kq)
      for (int t = 0; t < 4; ++t) {
        const int64_t k = 4 * kq + t;
        const int8_t v = (n < a.w->N && k < K) ? W[n * K + k] : 0;
        Wp[(kq * width + j) * 4 + t] = v;
        sum += v;
      }
    wsum[j] = sum;
  }
}

// ============================================================================ AVX-512 VNNI
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")

// y[m, n .. n+15] (the lanes of `mask`) from 16 int32 dot products: quant_store's epilogue, 16 at a time
// (the same operations in the same order: bit-identical to the scalar one).
inline void store16(const QArgs& a, int64_t m, int64_t n, __m512i dot, __mmask16 mask) {
  __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a.sx[m * a.ldsx])),
                           _mm512_maskz_loadu_ps(mask, a.w->scale + n));
  if (a.ep.row_scale || a.ep.row_shift) {
    if (a.ep.row_shift)
      v = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_set1_ps(a.ep.row_shift[m]), _mm512_maskz_loadu_ps(mask, a.ep.col_sum + n)));
    if (a.ep.row_scale) v = _mm512_mul_ps(_mm512_set1_ps(a.ep.row_scale[m]), v);
  }
  if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.bias + n));
  float* y = a.y + m * a.ldy + n;
  if (a.accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y), v);
  _mm512_mask_storeu_ps(y, mask, v);
}

// Outputs [m0, m0+MR) x [n, n+NR): acc[r][c] += xu[m0+r] . w[n+c] over K, wsum[c] = sum_k w[n+c].
template <int MR, int NR>
void vnni512_tile(const QArgs& a, int64_t m0, int64_t n) {
  const int64_t K = a.w->K;
  const int8_t* W = static_cast<const int8_t*>(a.w->data) + n * K;
  const int8_t* X = a.xq + m0 * a.ldxq;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), ones = _mm512_set1_epi8(1);
  __m512i acc[MR][NR], wsum[NR];
  for (int c = 0; c < NR; ++c) {
    wsum[c] = _mm512_setzero_si512();
    for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_setzero_si512();
  }
  // One step: 64 k of NR W rows (masked to K), every row of x. Written out twice (whole steps with a
  // prefetch, then the tail) rather than as a lambda: through a lambda GCC kept acc / wsum in memory,
  // storing all of them on every step.
#define NE_VNNI512_STEP(k, mask)                                                                          \
  do {                                                                                                    \
    __m512i wv[NR];                                                                                       \
    for (int c = 0; c < NR; ++c) {                                                                        \
      wv[c] = _mm512_maskz_loadu_epi8(mask, W + c * K + (k)); /* w[n+c, k .. k+63] (0 past K) */          \
      wsum[c] = _mm512_dpbusd_epi32(wsum[c], ones, wv[c]);                                                \
    }                                                                                                     \
    for (int r = 0; r < MR; ++r) {                                                                        \
      const __m512i xu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, X + r * a.ldxq + (k)), flip);     \
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], xu, wv[c]);                \
    }                                                                                                     \
  } while (0)
  const int64_t K64 = K / 64 * 64;
  for (int64_t k = 0; k < K64; k += 64) {
    // decode streams W from memory once: request each row's line 4 KB ahead (the rows are NR
    // separate streams; the next rows' starts follow from the last ones' ends)
    for (int c = 0; c < NR; ++c) _mm_prefetch(reinterpret_cast<const char*>(W + c * K + k) + 4096, _MM_HINT_T1);
    NE_VNNI512_STEP(k, ~__mmask64(0));
  }
  if (K64 < K) NE_VNNI512_STEP(K64, (__mmask64(1) << (K - K64)) - 1);
#undef NE_VNNI512_STEP
  for (int c = 0; c < NR; ++c) {
    const int32_t off = 128 * _mm512_reduce_add_epi32(wsum[c]);
    for (int r = 0; r < MR; ++r) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[r][c]) - off;
      quant_store(a, m0 + r, n + c, static_cast<float>(dot) * a.sx[(m0 + r) * a.ldsx] * a.w->scale[n + c]);
    }
  }
}

template <int MR>
void vnni512_rows(const QArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) vnni512_tile<MR, 4>(a, m0, n);
  for (; n < n1; ++n) vnni512_tile<MR, 1>(a, m0, n);
}

// All rows of x against W rows [n0, n1): W rows in blocks of 4 (16 KB at K = 4096, L1-resident while
// every 4-row group of x passes over them).
void int8_block_vnni512(const QArgs& a, int64_t n0, int64_t n1) {
  constexpr int64_t NB = 4;
  for (int64_t nb = n0; nb < n1; nb += NB) {
    const int64_t ne = std::min(n1, nb + NB);
    for_row_blocks<4>(a.M, [&](auto mr, int64_t m) { vnni512_rows<decltype(mr)::value>(a, m, nb, ne); });
  }
}
// Prefill (M >= 16) without AMX: a packed-panel GEMM with no horizontal sums. Per panel of 32 rows
// of W (one per pool thread at a time, 128 KB at K = 4096), the rows are laid out once in VNNI order
//   Wp[kq][j][0..3] = W[n0 + j, 4 kq .. 4 kq + 3]              (rows past N are zero)
// with wsum[j] = sum_k W[n0 + j, k] (the +128 offset's correction), and every block of MR <= 8 rows
// of x meets it: acc[r][h] (outputs n0 + 16 h .. + 15 of row m0 + r) += broadcast(xu[m0 + r, 4 kq ..])
// vpdpbusd Wp[kq][16 h ..]; per 4 k: 2 loads of W, MR broadcasts, 2 MR vpdpbusd.
constexpr int kPanel = 32;

void pack_panel_vnni(const QArgs& a, int64_t n0, int64_t KQ, int8_t* Wp, int32_t* wsum) {
  const int64_t K = a.w->K;
  const int8_t* W = static_cast<const int8_t*>(a.w->data);
  if (n0 + kPanel <= a.w->N && K % 4 == 0 && K < (int64_t(1) << 26)) {
    // whole panel: per 4 k, one gather of 4 bytes from each of 16 rows (twice), the row sums by
    // vpdpbusd with ones (lane j = row j)
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(K)));
    const __m512i ones = _mm512_set1_epi8(1);
    const int8_t* w0 = W + n0 * K;
    const int8_t* w1 = w0 + 16 * K;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
    for (int64_t kq = 0; kq < KQ; ++kq) {
      const __m512i v0 = _mm512_i32gather_epi32(rows, w0 + 4 * kq, 1);
      const __m512i v1 = _mm512_i32gather_epi32(rows, w1 + 4 * kq, 1);
      _mm512_storeu_si512(Wp + kq * 128, v0);
      _mm512_storeu_si512(Wp + kq * 128 + 64, v1);
      s0 = _mm512_dpbusd_epi32(s0, ones, v0);
      s1 = _mm512_dpbusd_epi32(s1, ones, v1);
    }
    _mm512_storeu_si512(wsum, s0);
    _mm512_storeu_si512(wsum + 16, s1);
    return;
  }
  pack_panel_scalar(a, n0, KQ, kPanel, Wp, wsum);
}

template <int MR>
void vnni512_panel_rows(const QArgs& a, const uint8_t* xu, int64_t ldxu, int64_t m0, const int8_t* Wp, int64_t KQ,
                        const int32_t* wsum, int64_t n0) {
  __m512i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t kq = 0; kq < KQ; ++kq) {
    const __m512i b0 = _mm512_loadu_si512(Wp + kq * 128), b1 = _mm512_loadu_si512(Wp + kq * 128 + 64);
    for (int r = 0; r < MR; ++r) {
      int32_t x4;
      std::memcpy(&x4, xu + (m0 + r) * ldxu + 4 * kq, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], xb, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], xb, b1);
    }
  }
  const int64_t left = a.w->N - n0;
  for (int h = 0; h < 2; ++h) {
    const int64_t cnt = std::min<int64_t>(16, left - 16 * h);
    if (cnt <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>(cnt >= 16 ? 0xFFFF : (1u << cnt) - 1u);
    const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512(wsum + 16 * h), 7);  // 128 sum_k w
    for (int r = 0; r < MR; ++r) store16(a, m0 + r, n0 + 16 * h, _mm512_sub_epi32(acc[r][h], off), mask);
  }
}

// Panels [p0, p1) of 32 W rows against every row of x (xu: x + 128 as u8, [M, ldxu], zero-padded K).
void int8_panels_vnni512(const QArgs& a, const uint8_t* xu, int64_t ldxu, int64_t p0, int64_t p1) {
  const int64_t KQ = (a.w->K + 3) / 4;
  thread_local AlignedVec<int8_t> wp;
  wp.resize(static_cast<size_t>(KQ * kPanel * 4));
  alignas(64) int32_t wsum[kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPanel;
    pack_panel_vnni(a, n0, KQ, wp.data(), wsum);
    for_row_blocks<8>(a.M, [&](auto mr, int64_t m) {
      vnni512_panel_rows<decltype(mr)::value>(a, xu, ldxu, m, wp.data(), KQ, wsum, n0);
    });
  }
}
#pragma GCC pop_options

// ============================================================================ AVX-VNNI (256-bit)
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")

inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int MR, int NR>
void vnni256_tile(const QArgs& a, int64_t m0, int64_t n) {
  const int64_t K = a.w->K;
  const int8_t* W = static_cast<const int8_t*>(a.w->data) + n * K;
  const int8_t* X = a.xq + m0 * a.ldxq;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi8(1);
  __m256i acc[MR][NR], wsum[NR];
  for (int c = 0; c < NR; ++c) {
    wsum[c] = _mm256_setzero_si256();
    for (int r = 0; r < MR; ++r) acc[r][c] = _mm256_setzero_si256();
  }
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
    if ((k & 63) == 0)  // decode streams W once: each row 4 KB ahead, as the AVX-512 kernel
      for (int c = 0; c < NR; ++c) _mm_prefetch(reinterpret_cast<const char*>(W + c * K + k) + 4096, _MM_HINT_T1);
    __m256i wv[NR];
    for (int c = 0; c < NR; ++c) {
      wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + c * K + k));
      wsum[c] = _mm256_dpbusd_avx_epi32(wsum[c], ones, wv[c]);
    }
    for (int r = 0; r < MR; ++r) {
      const __m256i xu =
          _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(X + r * a.ldxq + k)), flip);
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_dpbusd_avx_epi32(acc[r][c], xu, wv[c]);
    }
  }
  for (int c = 0; c < NR; ++c) {
    const int32_t off = 128 * hsum256(wsum[c]);
    for (int r = 0; r < MR; ++r) {
      int32_t dot = hsum256(acc[r][c]) - off;
      for (int64_t k = K32; k < K; ++k) dot += static_cast<int32_t>(X[r * a.ldxq + k]) * W[c * K + k];
      quant_store(a, m0 + r, n + c, static_cast<float>(dot) * a.sx[(m0 + r) * a.ldsx] * a.w->scale[n + c]);
    }
  }
}

template <int MR>
void vnni256_rows(const QArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) vnni256_tile<MR, 2>(a, m0, n);
  for (; n < n1; ++n) vnni256_tile<MR, 1>(a, m0, n);
}

// Prefill (M >= 16): the packed-panel GEMM of the AVX-512 VNNI section on 256-bit vectors: panels of
// 16 W rows, Wp[kq][j][0..3] = W[n0 + j, 4 kq ..], 6 rows of x x 16 outputs in 12 ymm registers.
constexpr int kPanel8 = 16;

// y[m, n .. n+7] from 8 int32 dots (quant_store's operations, in its order); cnt < 8 lanes: scalar
inline void store8(const QArgs& a, int64_t m, int64_t n, __m256i dot, int64_t cnt) {
  if (cnt < 8) {
    alignas(32) int32_t d[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(d), dot);
    for (int64_t i = 0; i < cnt; ++i)
      quant_store(a, m, n + i, static_cast<float>(d[i]) * a.sx[m * a.ldsx] * a.w->scale[n + i]);
    return;
  }
  __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.sx[m * a.ldsx])),
                           _mm256_loadu_ps(a.w->scale + n));
  if (a.ep.row_scale || a.ep.row_shift) {
    if (a.ep.row_shift)
      v = _mm256_sub_ps(v, _mm256_mul_ps(_mm256_set1_ps(a.ep.row_shift[m]), _mm256_loadu_ps(a.ep.col_sum + n)));
    if (a.ep.row_scale) v = _mm256_mul_ps(_mm256_set1_ps(a.ep.row_scale[m]), v);
  }
  if (a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + n));
  float* y = a.y + m * a.ldy + n;
  if (a.accumulate) v = _mm256_add_ps(_mm256_loadu_ps(y), v);
  _mm256_storeu_ps(y, v);
}

void pack_panel_vnni256(const QArgs& a, int64_t n0, int64_t KQ, int8_t* Wp, int32_t* wsum) {
  const int64_t K = a.w->K;
  const int8_t* W = static_cast<const int8_t*>(a.w->data);
  if (n0 + kPanel8 <= a.w->N && K % 4 == 0 && K < (int64_t(1) << 27)) {
    const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(K)));
    const __m256i ones = _mm256_set1_epi8(1);
    const int8_t* w0 = W + n0 * K;
    const int8_t* w1 = w0 + 8 * K;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (int64_t kq = 0; kq < KQ; ++kq) {
      const __m256i v0 = _mm256_i32gather_epi32(reinterpret_cast<const int*>(w0 + 4 * kq), rows, 1);
      const __m256i v1 = _mm256_i32gather_epi32(reinterpret_cast<const int*>(w1 + 4 * kq), rows, 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Wp + kq * 64), v0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Wp + kq * 64 + 32), v1);
      s0 = _mm256_dpbusd_avx_epi32(s0, ones, v0);
      s1 = _mm256_dpbusd_avx_epi32(s1, ones, v1);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(wsum), s0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(wsum + 8), s1);
    return;
  }
  pack_panel_scalar(a, n0, KQ, kPanel8, Wp, wsum);
}

template <int MR>
void vnni256_panel_rows(const QArgs& a, const uint8_t* xu, int64_t ldxu, int64_t m0, const int8_t* Wp, int64_t KQ,
                        const int32_t* wsum, int64_t n0) {
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t kq = 0; kq < KQ; ++kq) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Wp + kq * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Wp + kq * 64 + 32));
    for (int r = 0; r < MR; ++r) {
      int32_t x4;
      std::memcpy(&x4, xu + (m0 + r) * ldxu + 4 * kq, 4);
      const __m256i xb = _mm256_set1_epi32(x4);
      acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], xb, b0);
      acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], xb, b1);
    }
  }
  const int64_t left = a.w->N - n0;
  for (int h = 0; h < 2; ++h) {
    const int64_t cnt = std::min<int64_t>(8, left - 8 * h);
    if (cnt <= 0) break;
    const __m256i off = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + 8 * h)), 7);
    for (int r = 0; r < MR; ++r) store8(a, m0 + r, n0 + 8 * h, _mm256_sub_epi32(acc[r][h], off), cnt);
  }
}

void int8_panels_avxvnni(const QArgs& a, const uint8_t* xu, int64_t ldxu, int64_t p0, int64_t p1) {
  const int64_t KQ = (a.w->K + 3) / 4;
  thread_local AlignedVec<int8_t> wp;
  wp.resize(static_cast<size_t>(KQ * kPanel8 * 4));
  alignas(32) int32_t wsum[kPanel8];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPanel8;
    pack_panel_vnni256(a, n0, KQ, wp.data(), wsum);
    for_row_blocks<6>(a.M, [&](auto mr, int64_t m) {
      vnni256_panel_rows<decltype(mr)::value>(a, xu, ldxu, m, wp.data(), KQ, wsum, n0);
    });
  }
}

void int8_block_avxvnni(const QArgs& a, int64_t n0, int64_t n1) {
  constexpr int64_t NB = 4;
  for (int64_t nb = n0; nb < n1; nb += NB) {
    const int64_t ne = std::min(n1, nb + NB);
    for_row_blocks<4>(a.M, [&](auto mr, int64_t m) { vnni256_rows<decltype(mr)::value>(a, m, nb, ne); });
  }
}
#pragma GCC pop_options

// ============================================================================ AMX (tile multiply)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,amx-tile,amx-int8")

// x (already quantized, [M, Kp]) into B tiles: Bp[(mb * KB + kb) * 1024 + kk * 64 + 4 m + j] =
// xq[16 mb + m, 64 kb + 4 kk + j]; rows m >= M are zero. MB = ceil(M / 16) blocks of 16 rows.
void pack_x_amx(const QArgs& a, int64_t MBp, int8_t* Bp) {
  const int64_t KB = a.w->K / 64;
  for (int64_t mb = 0; mb < MBp; ++mb)
    for (int64_t kb = 0; kb < KB; ++kb) {
      int8_t* t = Bp + (mb * KB + kb) * 1024;
      for (int m = 0; m < 16; ++m) {
        const int64_t row = mb * 16 + m;
        const int8_t* src = a.xq + row * a.ldxq + kb * 64;
        for (int kk = 0; kk < 16; ++kk) {
          if (row < a.M) std::memcpy(t + kk * 64 + 4 * m, src + 4 * kk, 4);
          else std::memset(t + kk * 64 + 4 * m, 0, 4);
        }
      }
    }
}

// Output rows n in [nb0, nb1) (multiples of 32) against every row of x.
void int8_amx_blocks(const QArgs& a, const int8_t* Bp, int64_t MB, int64_t nb0, int64_t nb1) {
  const AmxTileConfig cfg;  // every tile 16 rows x 64 bytes
  _tile_loadconfig(&cfg);
  const int64_t K = a.w->K, KB = K / 64;
  const int8_t* W = static_cast<const int8_t*>(a.w->data);
  alignas(64) int32_t C[4][16][16];
  for (int64_t n0 = nb0; n0 < nb1; n0 += 32) {
    const int8_t* w0 = W + n0 * K;
    const int8_t* w1 = w0 + 16 * K;
    for (int64_t mb = 0; mb < MB; mb += 2) {
      const bool two = mb + 1 < MB;  // a second 16-row block of x (else tiles 1 and 3 stay idle)
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const int8_t* b0 = Bp + mb * KB * 1024;
      const int8_t* b1 = b0 + KB * 1024;
      auto run = [&](auto both) {
        for (int64_t kb = 0; kb < KB; ++kb) {
          _tile_loadd(4, w0 + kb * 64, K);     // W[n0 .. n0+15, 64 kb ..]
          _tile_loadd(5, w1 + kb * 64, K);     // W[n0+16 .. n0+31, ..]
          _tile_loadd(6, b0 + kb * 1024, 64);  // x rows 16 mb .. 16 mb + 15 (VNNI order)
          _tile_dpbssd(0, 4, 6);               // C^T[n0 .., 16 mb ..] += W x^T
          _tile_dpbssd(2, 5, 6);               // C^T[n0 + 16 .., 16 mb ..]
          if (decltype(both)::value) {
            _tile_loadd(7, b1 + kb * 1024, 64);  // x rows 16 (mb + 1) ..
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(3, 5, 7);
          }
        }
      };
      if (two) run(std::true_type{});
      else run(std::false_type{});
      _tile_stored(0, C[0], 64);
      _tile_stored(1, C[1], 64);
      _tile_stored(2, C[2], 64);
      _tile_stored(3, C[3], 64);
      // epilogue: C[t][i][j] = dot(W row n0 + 16 (t / 2) + i, x row 16 (mb + t % 2) + j); a gather
      // of column j gives x row j's 16 outputs, stored as one vector
      const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(16));
      for (int t = 0; t < 4; ++t) {
        if (!two && t % 2) continue;
        const int64_t nbase = n0 + 16 * (t / 2), mbase = 16 * (mb + t % 2);
        const int mcount = static_cast<int>(std::min<int64_t>(16, a.M - mbase));
        for (int j = 0; j < mcount; ++j)
          store16(a, mbase + j, nbase, _mm512_i32gather_epi32(_mm512_add_epi32(column, _mm512_set1_epi32(j)), &C[t][0][0], 4),
                  0xFFFF);
      }
    }
  }
  _tile_release();
}
#pragma GCC pop_options

// ============================================================================ int4 weights, int8 activations
// matmul precision "medium" at decode (W4A8): int4 weights against x rounded to int8 per 32 columns, as llama.cpp
// multiplies its 4-bit blocks. For row m of x and each block b of 32 columns: s_x = max|x_b| / 127, x_q =
// round-to-nearest-even(x * (1 / s_x)) (quantize_int8's arithmetic, per block); for row n of W:
//
//   y[m, n] = sum_b s_g(b) s_x(m, b) sum_{k in b} q[n, k] x_q[m, k]  -  sum_g f_g gsum[m, g]
//
// q the nibbles (0..15), s_g the group's scale (two-level: d sc), f_g its zero term's factor (s z, or the offset
// o = dmin m, or s zero_point) and gsum the exact float32 sums of x over each group (as the fp32 kernels). The
// entry point lays x_q out per 128 columns as the nibbles fall: 64 bytes of the even columns of four blocks (16
// each), then 64 of the odd ones, so the low and high nibbles of 64 bytes of W meet them in two VPDPBUSD (u8 x s8,
// 4 products a lane: lanes 4 j .. 4 j + 3 are block j's); s_x is laid out per lane (a.sx: 16 floats per 128
// columns). Per 128 weights: 1 load of W, 2 ands, 1 shift, 2 VPDPBUSD, 1 convert, 1 multiply, 1 FMA (the fp32
// kernel: 24 vector ops). Groups of 16 (two a block) to 128; K % 32 == 0.

// A kernel's per-thread room for one row's group scales s (zero for 8 past G: the last step's short blocks may read
// them) and zero-term factors f, both G floats. Plain code, outside the ISA regions: both int4 kernels call it.
struct RowRoom {
  float *s, *f;
};
RowRoom row_room(int64_t G) {
  thread_local AlignedVec<float> room;
  room.resize(static_cast<size_t>(2 * G + 16));
  float* s = room.data();
  for (int i = 0; i < 8; ++i) s[G + i] = 0.0f;
  return {s, s + G + 8};
}

// The super-block of group n G + g for the row scale kernels' steps of `step` groups (16 or 8), g = 0, step, ...:
// with S | step a shift, with step | S a count; no division where S is a power of two (64-bit idivs in the step
// loop cost 8 a row of a Q4_K weight). Only for spread weights: S | step or step | S, S | G (checked on entry).
// Whether super-blocks of S groups spread over steps of `step` (a power of two) groups: S | step or step | S (a power
// of two is one or the other; no division: step % S was an idiv a row)
inline bool spreads(int64_t S, int64_t step) { return S > 0 && ((S & (S - 1)) == 0 || (S & (step - 1)) == 0); }

struct SuperIndex {
  int64_t first = 0, sb = 0, left = 0, S = 1, step = 1;
  int sh = 0;
  SuperIndex(const QWeight& w, int64_t n, int64_t G, int64_t step_) : step(step_) {
    if (!w.sub || w.super <= 0) return;
    S = w.super;
    first = n * ((S & (S - 1)) == 0 ? G >> __builtin_ctzll(S) : G / S);
    left = S;
    sh = S < step ? __builtin_ctzll(S) : 0;
  }
  int64_t at(int64_t g) const { return first + (S < step ? g >> sh : sb); }
  void next() {
    if (S >= step && (left -= step) <= 0) ++sb, left = S;
  }
};

// s_g and f_g of row n for groups g0 .. G - 1, one at a time (quant_elem's definitions): the row scale kernels' tail
// (f null: the scales only)
void row_scales_from(const QWeight& w, int64_t n, int64_t G, int64_t g0, float* s, float* f) {
  for (int64_t g = g0; g < G; ++g) {
    const int64_t at = n * G + g;
    s[g] = w.sub ? qe_sub_scale(w, at) : w.scale[at];
    if (f) f[g] = w.sub_zero ? qe_sub_offset(w, at) : s[g] * (w.zero && !w.sub ? w.zero[at] : w.zero_point);
  }
}

// Rows n0 .. n1 - 1 of W against every row of x: row n's scales s_g and factors f_g by scales(w, n, G, s, f), then
// x's rows four at a time by rows[4] (the rest by rows[1 .. 3]). Plain code: both W4A8 kernels drive their own
// ISA's functions through it.
using W4A8Scales = void (*)(const QWeight&, int64_t, int64_t, float*, float*);
using W4A8Rows = void (*)(const QArgs&, int64_t, int64_t, const float*, const float*);
void w4a8_block(const QArgs& a, int64_t n0, int64_t n1, W4A8Scales scales, const W4A8Rows (&rows)[5]) {
  const int64_t G = a.w->K / a.w->group;
  const RowRoom room = row_room(G);
  for (int64_t n = n0; n < n1; ++n) {
    scales(*a.w, n, G, room.s, room.f);
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) rows[4](a, n, m, room.s, room.f);
    if (m < a.M) rows[a.M - m](a, n, m, room.s, room.f);
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")
// s_g and f_g of row n (G groups, G % 16 == 0 or a scalar tail) into s and f (null: s only), 16 groups a step: a
// two-level weight's super-block scales spread over the lanes by a permute when its super-blocks hold 1, 2, 4, 8
// or 16 groups (the 16 / S a step read, no further: the last row's may end the array), else one by one.
void w4a8_row_scales(const QWeight& w, int64_t n, int64_t G, float* s, float* f) {
  const int64_t S = w.super;
  const bool spread = w.sub && spreads(S, 16);
  const __mmask16 dmask = spread && S < 16 ? static_cast<__mmask16>((1u << (16 >> __builtin_ctzll(S))) - 1) : 1;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i idx = spread ? (S >= 16 ? _mm512_setzero_si512() : _mm512_srli_epi32(lane, __builtin_ctzll(S))) : lane;
  const __m512 zc = _mm512_set1_ps(w.zero_point);
  SuperIndex si(w, n, G, 16);
  int64_t g = 0;
  if (!w.sub || spread) {
    for (; g + 16 <= G; g += 16, si.next()) {
      const int64_t at = n * G + g;
      __m512 sg, fg;
      if (w.sub) {
        const int64_t sb = si.at(g);
        const __m512 d = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(dmask, w.scale + sb));
        sg = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(w.sub + at)))));
        if (!f) {
          fg = sg;
        } else if (w.sub_zero) {
          const __m512 dm = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(dmask, w.zero + sb));
          fg = _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                     reinterpret_cast<const __m128i*>(w.sub_zero + at)))));
        } else {
          fg = _mm512_mul_ps(sg, zc);
        }
      } else {
        sg = _mm512_loadu_ps(w.scale + at);
        fg = !f ? sg : _mm512_mul_ps(sg, w.zero ? _mm512_loadu_ps(w.zero + at) : zc);
      }
      _mm512_storeu_ps(s + g, sg);
      if (f) _mm512_storeu_ps(f + g, fg);
    }
  }
  row_scales_from(w, n, G, g, s, f);
}

// sum_g f_g gsum_g over G groups: the zero term of a row of y
inline float zero_dot(const float* f, const float* gs, int64_t G) {
  __m512 zt = _mm512_setzero_ps();
  int64_t gi = 0;
  for (; gi + 16 <= G; gi += 16) zt = _mm512_fmadd_ps(_mm512_loadu_ps(f + gi), _mm512_loadu_ps(gs + gi), zt);
  float z = _mm512_reduce_add_ps(zt);
  for (; gi < G; ++gi) z += f[gi] * gs[gi];
  return z;
}

// A block of 32 columns of x rounded to int8 (quantize_int8's arithmetic): s_x = max|x| / 127, q = round to
// nearest even (the default MXCSR mode) of x * (1 / s_x), within [-127, 127] by construction; returns s_x.
inline float round_block32(const float* xb, __m512i& q0, __m512i& q1) {
  const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float sx = amax / 127.0f, inv = sx > 0.0f ? 1.0f / sx : 0.0f;
  q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
  q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
  return sx;
}
// the same into t[32] (w4a8_activations' per-block step)
float round_block32_512(const float* xb, int32_t* t) {
  __m512i q0, q1;
  const float sx = round_block32(xb, q0, q1);
  _mm512_storeu_si512(t, q0);
  _mm512_storeu_si512(t + 16, q1);
  return sx;
}

// One 128-column step b4 of a W row wr (nb blocks of 32 in all) for MR rows of x (their int8 codes xr, lane scales
// sxr), the step's group scales per lane sw: the 64 bytes of W loaded and split into nibbles once for all rows.
template <int MR>
inline __attribute__((always_inline)) void w4a8_step(const uint8_t* wr, int64_t b4, int64_t nb, __m512 sw,
                                                     const int8_t* const* xr, const float* const* sxr, __m512* acc) {
  const __m512i lo4 = _mm512_set1_epi8(15);
  const int64_t rest = nb - 4 * b4;  // blocks left: the last 64 bytes of W may be short
  const __mmask64 mask = rest >= 4 ? ~0ULL : (1ULL << (16 * rest)) - 1;
  const __m512i wb = _mm512_maskz_loadu_epi8(mask, wr + 64 * b4);
  const __m512i lo = _mm512_and_si512(wb, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(wb, 4), lo4);
  for (int r = 0; r < MR; ++r) {
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr[r] + 128 * b4));
    d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xr[r] + 128 * b4 + 64));
    const __m512 sx = _mm512_loadu_ps(sxr[r] + 16 * b4);
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, sx), acc[r]);
  }
}

// Rows m0 .. m0 + MR - 1 of x against row n of W (its scales s, zero-term factors f): each step's group scales
// spread once for all MR rows.
template <int MR>
void w4a8_rows(const QArgs& a, int64_t n, int64_t m0, const float* s, const float* f) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, g = w.group, G = K >> __builtin_ctzll(g), nb = K / 32, nb4 = (nb + 3) / 4, per = g / 32;
  // the lanes of four blocks of 32 columns (4 int32 lanes each) read the scale of their group: s + 4 b4 / per;
  // groups of 16 (per 0: a GGUF Q3_K / Q2_K), two a block: bytes 0-7 of a block's 16 are columns 0-15, the first
  // group, so lanes 4 j, 4 j + 1 read group 2 j of the step's eight, s + 8 b4
  const bool g16 = g == 16;
  const __m512i lanes =
      g16 ? _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
          : _mm512_srli_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), __builtin_ctzll(per));
  const uint8_t* wr = static_cast<const uint8_t*>(w.data) + n * (K / 2);
  const int sh = g16 ? 0 : __builtin_ctzll(per);  // 4 b4 / per as a shift (per is 1, 2 or 4: a division per step
                                                  // cost an idiv in the loop)
  const int8_t* xr[MR];
  const float* sxr[MR];
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) {
    xr[r] = a.xq + (m0 + r) * a.ldxq;
    sxr[r] = a.sx + (m0 + r) * a.ldsx;
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t b4 = 0; b4 < nb4; ++b4) {
    const __m512 sw = g16 ? _mm512_permutexvar_ps(lanes, _mm512_castps256_ps512(_mm256_loadu_ps(s + 8 * b4)))
                          : _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(s + (4 * b4 >> sh))));
    w4a8_step<MR>(wr, b4, nb, sw, xr, sxr, acc);
  }
  for (int r = 0; r < MR; ++r)
    quant_store(a, m0 + r, n, _mm512_reduce_add_ps(acc[r]) - zero_dot(f, a.gsum + (m0 + r) * G, G));
}

// w4a8_rows for a two-level weight with groups of 32 (GGUF Q4_K) or 16 (Q3_K, Q2_K) whose super-blocks spread (S | 16
// or 16 | S): each 16 groups' scales d sc and zero factors dmin m (or s zero_point) made in registers, the scales
// spread to the steps by permutes (four steps of 4 groups, or two of 8) and the zero term accumulated beside
// (w4a8_row_scales stored them for the steps to load back: 8-9% of a Q4_K_M decode's samples, against 40% for the
// steps themselves)
template <int MR, bool G16>
void w4a8_rows_two_level(const QArgs& a, int64_t n, int64_t m0, const float*, const float*) {
  const QWeight& w = *a.w;
  constexpr int kPerStep = G16 ? 8 : 4;  // groups a 128-column step
  const int64_t K = w.K, G = K / (G16 ? 16 : 32), nb = K / 32, nb4 = (nb + 3) / 4, S = w.super;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i idx = S >= 16 ? _mm512_setzero_si512() : _mm512_srli_epi32(lane, __builtin_ctzll(S));
  // step k reads groups kPerStep k + lane / 4 (groups of 32: 4 lanes a block) or + lane / 2 (of 16: two a block)
  const __m512i quad = _mm512_srli_epi32(lane, G16 ? 1 : 2);
  const __m512 zc = _mm512_set1_ps(w.zero_point);
  const uint8_t* wr = static_cast<const uint8_t*>(w.data) + n * (K / 2);
  SuperIndex si(w, n, G, 16);
  const int8_t* xr[MR];
  const float *sxr[MR], *gs[MR];
  __m512 acc[MR], zacc[MR];
  for (int r = 0; r < MR; ++r) {
    xr[r] = a.xq + (m0 + r) * a.ldxq;
    sxr[r] = a.sx + (m0 + r) * a.ldsx;
    gs[r] = a.gsum + (m0 + r) * G;
    acc[r] = zacc[r] = _mm512_setzero_ps();
  }
  for (int64_t g0 = 0; g0 < G; g0 += 16, si.next()) {
    const int64_t left = G - g0, at = n * G + g0;
    const __mmask16 gm = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    // the super-blocks these groups fall in, and no further (the last row's may end the array)
    const int64_t nsb = S >= 16 ? 1 : ((left < 16 ? left : 16) + S - 1) >> __builtin_ctzll(S);
    const __mmask16 dm = static_cast<__mmask16>((1u << nsb) - 1);
    const int64_t sb = si.at(g0);
    const __m512 sg = _mm512_mul_ps(_mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(dm, w.scale + sb)),
                                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(gm, w.sub + at))));
    const __m512 fg =
        w.sub_zero ? _mm512_mul_ps(_mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(dm, w.zero + sb)),
                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(gm, w.sub_zero + at))))
                   : _mm512_mul_ps(sg, zc);
    for (int r = 0; r < MR; ++r) zacc[r] = _mm512_fmadd_ps(fg, _mm512_maskz_loadu_ps(gm, gs[r] + g0), zacc[r]);
    for (int64_t k = 0, b4 = g0 / kPerStep; k < 16 / kPerStep && b4 < nb4; ++k, ++b4) {
      const __m512i at_k = _mm512_add_epi32(quad, _mm512_set1_epi32(static_cast<int>(kPerStep * k)));
      w4a8_step<MR>(wr, b4, nb, _mm512_permutexvar_ps(at_k, sg), xr, sxr, acc);
    }
  }
  for (int r = 0; r < MR; ++r) quant_store(a, m0 + r, n, _mm512_reduce_add_ps(acc[r]) - _mm512_reduce_add_ps(zacc[r]));
}
void no_row_scales(const QWeight&, int64_t, int64_t, float*, float*) {}

void int4_block_w4a8(const QArgs& a, int64_t n0, int64_t n1) {
  const QWeight& w = *a.w;
  if (w.sub && (w.group == 32 || w.group == 16) && spreads(w.super, 16)) {
    static constexpr W4A8Rows g32[5] = {nullptr, w4a8_rows_two_level<1, false>, w4a8_rows_two_level<2, false>,
                                        w4a8_rows_two_level<3, false>, w4a8_rows_two_level<4, false>};
    static constexpr W4A8Rows g16[5] = {nullptr, w4a8_rows_two_level<1, true>, w4a8_rows_two_level<2, true>,
                                        w4a8_rows_two_level<3, true>, w4a8_rows_two_level<4, true>};
    return w4a8_block(a, n0, n1, no_row_scales, w.group == 16 ? g16 : g32);
  }
  static constexpr W4A8Rows rows[5] = {nullptr, w4a8_rows<1>, w4a8_rows<2>, w4a8_rows<3>, w4a8_rows<4>};
  w4a8_block(a, n0, n1, w4a8_row_scales, rows);
}

// int8-weight (Q8_0, Q6_K, Q5_K as they load) at decode under "medium": the same activations, but in column order
// (W's codes are bytes in column order), offset to unsigned for VPDPBUSD (u8 x s8): x_u = x_q + 128, and
// sum_k x_q w = sum_k x_u w - 128 sum_k w, the sums of w by the same instruction on a vector of ones. 64 columns
// a step (two blocks of 32: lanes 0-7 and 8-15), each lane's group scale spread by a permute (groups of 16 .. 128
// or one per row), s_x per lane as above. Per 64 weights: 2 loads, 2 VPDPBUSD, a shift and a subtract, 1
// convert, 1 permute, 1 multiply, 1 FMA (the fp32 kernel: 14-18 vector ops).
void int8w_block_w8a8(const QArgs& a, int64_t n0, int64_t n1) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, g = w.group > 0 ? w.group : K, G = w.group > 0 ? K / g : 1, steps = (K + 63) / 64;
  const RowRoom room = row_room(G);
  float *s = room.s, *f = room.f;
  // lane l of a 64-column step holds columns 4 l .. 4 l + 3: group (64 step + 4 l) / g
  const int64_t lanes_per_group = std::min<int64_t>(16, std::max<int64_t>(1, g / 4));
  const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               __builtin_ctzll(lanes_per_group));
  const __m512i ones = _mm512_set1_epi8(1);
  const int gsh = w.group > 0 ? __builtin_ctzll(g) : 0;  // (64 st) / g as a shift: groups are powers of two
  const int8_t* W = static_cast<const int8_t*>(w.data);
  for (int64_t n = n0; n < n1; ++n) {
    if (w.group > 0) {
      w4a8_row_scales(w, n, G, s, w.zero ? f : nullptr);  // (f: only zero points make a zero term here)
    } else {
      s[0] = w.scale[n];
      f[0] = 0.0f;
    }
    const int8_t* wr = W + n * K;
    for (int64_t m = 0; m < a.M; ++m) {
      const uint8_t* xr = reinterpret_cast<const uint8_t*>(a.xq) + m * a.ldxq;
      const float* sx = a.sx + m * a.ldsx;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t st = 0; st < steps; ++st) {
        const int64_t left = K - 64 * st;
        const __mmask64 mask = left >= 64 ? ~0ULL : (1ULL << left) - 1;
        const __m512i wv = _mm512_maskz_loadu_epi8(mask, wr + 64 * st);
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xr + 64 * st), wv);
        const __m512i c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv);  // sum of w, 4 a lane
        const __m512i dot = _mm512_sub_epi32(d, _mm512_slli_epi32(c, 7));       // sum x_q w
        const int64_t g0 = (64 * st) >> gsh;
        const __m512 sw = w.group > 0 ? _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(_mm_loadu_ps(s + g0)))
                                      : _mm512_set1_ps(s[0]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sw, _mm512_loadu_ps(sx + 16 * st)), acc);
      }
      const float z = w.zero ? zero_dot(f, a.gsum + m * G, G) : 0.0f;  // (zero points only)
      quant_store(a, m, n, _mm512_reduce_add_ps(acc) - z);
    }
  }
}

// x rows for int8w_block_w8a8: x_q + 128 as bytes in column order, [M, ldq] (ldq = 64 steps, zero past K: x_u
// 128 there, against w = 0), s_x per lane [M, 16 steps] (lanes 0-7: block 2 st, 8-15: block 2 st + 1)
void w8a8_activations(const float* x, int64_t ldx, int64_t K, uint8_t* xu, int64_t ldq, float* sl, int64_t m0,
                      int64_t m1) {
  const int64_t steps = (K + 63) / 64;
  for (int64_t m = m0; m < m1; ++m) {
    uint8_t* q = xu + m * ldq;
    float* s = sl + m * 16 * steps;
    std::memset(q, 128, static_cast<size_t>(ldq));
    std::memset(s, 0, sizeof(float) * static_cast<size_t>(16 * steps));
    const __m512i off = _mm512_set1_epi32(128);
    for (int64_t b = 0; b < K / 32; ++b) {
      __m512i q0, q1;
      const float sx = round_block32(x + m * ldx + 32 * b, q0, q1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtusepi32_epi8(_mm512_add_epi32(q0, off)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtusepi32_epi8(_mm512_add_epi32(q1, off)));
      for (int j = 0; j < 8; ++j) s[16 * (b / 2) + 8 * (b % 2) + j] = sx;
    }
  }
}

#pragma GCC pop_options

// ============================================================================ int4 weights, int8 activations: AVX2
// The W4A8 decode above on CPUs without VNNI (AVX2 and FMA only: Haswell .. Zen 3; or "isa" forced): the same
// activations in the same layout, each VPDPBUSD replaced by VPMADDUBSW (u8 x s8, two products into an int16:
// 2 * 15 * 127 at most, no saturation; the low and high nibbles' pairs added as int16, 4 * 15 * 127 at most) and
// VPMADDWD on ones (two int16 into an int32): an int32 lane again sums 4 columns of the low and the high nibbles,
// lanes 4 j .. 4 j + 3 block j's. 64 weights a step (half of the AVX-512 kernel's 128: 32 bytes of W, blocks 2 h
// and 2 h + 1 of a 128-column chunk, x's bytes at 32 h and 64 + 32 h of its 128, s_x lanes 8 h .. 8 h + 7).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// the super-block scales of 8 groups (super-blocks of S groups) spread over their lanes, reading the 8 / S there
// are and no further (the last row's may end the array); 8 int8 codes as floats
inline __m256 spread8(const float* p, int64_t S, __m256i idx) {
  if (S >= 8) return _mm256_set1_ps(*p);
  const __m256i there = _mm256_set1_epi32(8 >> __builtin_ctzll(S));  // 8 / S (S is 1, 2 or 4 here)
  const __m256i live = _mm256_cmpgt_epi32(there, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_permutevar8x32_ps(_mm256_maskload_ps(p, live), idx);
}
inline __m256 int8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// s_g and f_g of row n (w4a8_row_scales on 8 lanes; super-blocks of 1, 2, 4 or 8 groups or a multiple of 8
// spread by a permute, else one by one)
void w4a8_row_scales_avx2(const QWeight& w, int64_t n, int64_t G, float* s, float* f) {
  const int64_t S = w.super;
  const bool spread = w.sub && spreads(S, 8);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i idx = spread ? (S >= 8 ? _mm256_setzero_si256() : _mm256_srli_epi32(lane, __builtin_ctzll(S))) : lane;
  const __m256 zc = _mm256_set1_ps(w.zero_point);
  SuperIndex si(w, n, G, 8);
  int64_t g = 0;
  if (!w.sub || spread) {
    for (; g + 8 <= G; g += 8, si.next()) {
      const int64_t at = n * G + g;
      __m256 sg, fg;
      if (w.sub) {
        const int64_t sb = si.at(g);
        sg = _mm256_mul_ps(spread8(w.scale + sb, S, idx), int8x8(w.sub + at));
        fg = w.sub_zero ? _mm256_mul_ps(spread8(w.zero + sb, S, idx), int8x8(w.sub_zero + at))
                        : _mm256_mul_ps(sg, zc);
      } else {
        sg = _mm256_loadu_ps(w.scale + at);
        fg = _mm256_mul_ps(sg, w.zero ? _mm256_loadu_ps(w.zero + at) : zc);
      }
      _mm256_storeu_ps(s + g, sg);
      _mm256_storeu_ps(f + g, fg);
    }
  }
  row_scales_from(w, n, G, g, s, f);
}

inline float hsum256_ps(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

inline float zero_dot_avx2(const float* f, const float* gs, int64_t G) {
  __m256 zt = _mm256_setzero_ps();
  int64_t gi = 0;
  for (; gi + 8 <= G; gi += 8) zt = _mm256_fmadd_ps(_mm256_loadu_ps(f + gi), _mm256_loadu_ps(gs + gi), zt);
  float z = hsum256_ps(zt);
  for (; gi < G; ++gi) z += f[gi] * gs[gi];
  return z;
}

// round_block32's arithmetic on 8 lanes
float round_block32_avx2(const float* xb, int32_t* t) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
  }
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  const float amax = _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
  const float sx = amax / 127.0f, inv = sx > 0.0f ? 1.0f / sx : 0.0f;
  for (int i = 0; i < 4; ++i)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 8 * i),
                        _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv))));
  return sx;
}

// Rows m0 .. m0 + MR - 1 of x against row n of W (its scales s, zero-term factors f): W's nibbles and the group
// scales taken once per step for all MR rows.
template <int MR>
void w4a8_rows_avx2(const QArgs& a, int64_t n, int64_t m0, const float* s, const float* f) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, g = w.group, G = K >> __builtin_ctzll(g), nb = K / 32, per = g / 32;
  // the 8 lanes of blocks 2 h, 2 h + 1 of step b4 read their groups' scales: groups of 16, s + 8 b4 + 4 h, lanes
  // (0, 0, 1, 1, 2, 2, 3, 3); of 32, s + 4 b4 + 2 h, lanes (0 x 4, 1 x 4); of 64 or more, both blocks in group
  // (4 b4 + 2 h) / per
  const __m256i lanes = g == 16 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i lo4 = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* wr = static_cast<const uint8_t*>(w.data) + n * (K / 2);
  const int sh = g == 16 ? 0 : __builtin_ctzll(per);  // b / per as a shift (no idiv in the loop)
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b += 2) {  // blocks b, b + 1: step b4 = b / 4, half h = (b / 2) % 2
    const int64_t b4 = b / 4, h = (b / 2) % 2;
    const uint8_t* wp = wr + 16 * b;  // (one block left: its 16 bytes only)
    const __m256i wb = nb - b >= 2 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp))
                                   : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
    const __m256i lo = _mm256_and_si256(wb, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), lo4);
    const __m256 sw = g == 16   ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + 8 * b4 + 4 * h), lanes)
                      : per == 1 ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + b), lanes)
                                 : _mm256_set1_ps(s[b >> sh]);
    for (int r = 0; r < MR; ++r) {
      const int8_t* xe = a.xq + (m0 + r) * a.ldxq + 128 * b4 + 32 * h;
      const __m256i p = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + 64))));
      const __m256 sx = _mm256_loadu_ps(a.sx + (m0 + r) * a.ldsx + 16 * b4 + 8 * h);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_mul_ps(sw, sx), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r)
    quant_store(a, m0 + r, n, hsum256_ps(acc[r]) - zero_dot_avx2(f, a.gsum + (m0 + r) * G, G));
}

void int4_block_w4a8_avx2(const QArgs& a, int64_t n0, int64_t n1) {
  static constexpr W4A8Rows rows[5] = {nullptr, w4a8_rows_avx2<1>, w4a8_rows_avx2<2>, w4a8_rows_avx2<3>,
                                       w4a8_rows_avx2<4>};
  w4a8_block(a, n0, n1, w4a8_row_scales_avx2, rows);
}
#pragma GCC pop_options

// x rows quantized per 32 columns into the layout above: xq [M, ldq] (ldq = 128 nb4), s_x per lane [M, 16 nb4];
// round(xb, t) rounds one block of 32 into t and returns its s_x (round_block32_512, round_block32_avx2)
void w4a8_activations(const float* x, int64_t ldx, int64_t K, int8_t* xq, int64_t ldq, float* sl, int64_t m0,
                      int64_t m1, float (*round)(const float*, int32_t*)) {
  const int64_t nb = K / 32, nb4 = (nb + 3) / 4;
  for (int64_t m = m0; m < m1; ++m) {
    int8_t* q = xq + m * ldq;
    float* s = sl + m * 16 * nb4;
    std::memset(q, 0, static_cast<size_t>(ldq));
    std::memset(s, 0, sizeof(float) * static_cast<size_t>(16 * nb4));
    for (int64_t b = 0; b < nb; ++b) {
      int32_t t[32];
      const float sx = round(x + m * ldx + 32 * b, t);
      int8_t* even = q + 128 * (b / 4) + 16 * (b % 4);
      for (int j = 0; j < 16; ++j) {
        even[j] = static_cast<int8_t>(std::min(127, std::max(-127, t[2 * j])));
        even[64 + j] = static_cast<int8_t>(std::min(127, std::max(-127, t[2 * j + 1])));
      }
      for (int j = 0; j < 4; ++j) s[16 * (b / 4) + 4 * (b % 4) + j] = sx;
    }
  }
}

// ============================================================================ selection
struct Cpu {
  bool avx512vnni = false, avxvnni = false, amx = false;
};

Cpu detect() {
  Cpu c;
  unsigned a, b, cx, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &cx, &d)) return c;
  const bool avx512 = detected_isa() >= Isa::AVX512;  // includes the OS's AVX-512 state check
  c.avx512vnni = avx512 && (cx >> 11 & 1);
  unsigned a1, b1, c1, d1;
  if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) c.avxvnni = detected_isa() >= Isa::AVX2 && (a1 >> 4 & 1);
  c.amx = amx_caps().int8;  // core/amx.cpp: CPU, OS and the process's tile permission
  return c;
}

const Cpu& cpu() {
  static const Cpu c = detect();
  return c;
}

}  // namespace
#endif  // NE_INT8_X86

namespace {
// forced kernel: "" = automatic
std::string g_forced;  // guarded by the GIL in practice; set only from tests / benchmarks
}  // namespace

std::vector<std::string> int8_kernels() {
  // what the CPU has, within the active ISA (a capped ISA, force_cpu_isa / NORMENGINE_ISA, caps these too)
  std::vector<std::string> out;
#if defined(NE_INT8_X86)
  const Cpu& c = cpu();
  const Isa isa = active_isa();
  if (c.amx && isa >= Isa::AVX512) out.push_back("amx");
  if (c.avx512vnni && isa >= Isa::AVX512) out.push_back("avx512vnni");
  if (c.avxvnni && isa >= Isa::AVX2) out.push_back("avxvnni");
#endif
  out.push_back("isa");
  return out;
}

const char* int8_kernel() {
  // the best kernel the CPU has, capped by the active ISA (force_cpu_isa) and by force_int8_kernel
  const Isa isa = active_isa();
#if defined(NE_INT8_X86)
  const Cpu& c = cpu();
  auto allowed = [&](const char* k) { return g_forced.empty() || g_forced == k; };
  if (isa >= Isa::AVX512 && c.amx && allowed("amx")) return "amx";
  if (isa >= Isa::AVX512 && c.avx512vnni && allowed("avx512vnni")) return "avx512vnni";
  if (isa >= Isa::AVX2 && c.avxvnni && allowed("avxvnni")) return "avxvnni";
#endif
  (void)isa;
  return "isa";
}

void force_int8_kernel(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_forced.clear();
    return;
  }
  const auto ks = int8_kernels();
  if (std::find(ks.begin(), ks.end(), name) == ks.end()) {
    std::string have;
    for (const auto& k : ks) have += (have.empty() ? "" : ", ") + k;
    throw UnsupportedError("int8 kernel '" + name + "' is not available on this CPU (available: " + have + ")");
  }
  g_forced = name;
}

#if defined(NE_INT8_X86)
namespace {
// Which integer-activation decode kernels the active ISA and int8 kernel choice allow: AVX-512 VNNI (int4 and
// int8-weight), else AVX2 (int4 only: VPMADDUBSW would saturate on int8 weights)
struct W8Decode {
  bool vnni512 = false, avx2 = false;
};
W8Decode w8_decode_kernels() {
  W8Decode d;
  const std::string k = int8_kernel();
  d.vnni512 = cpu().avx512vnni && (k == "avx512vnni" || k == "amx");
  d.avx2 = !d.vnni512 && active_isa() >= Isa::AVX2;
  return d;
}

// ... and the call suits them: whole blocks of 32 columns, finite activations (NaN and Inf propagate on the float
// path)
bool w8_decode_ok(const QArgs& a, const float* x, int64_t ldx) {
  if (a.w->K % 32) return false;
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t i = 0; i < a.w->K; ++i)
      if (!std::isfinite(x[m * ldx + i])) return false;
  return true;
}

// One integer-activation decode call: x's rows prepared by prepare(xq, sx, m0, m1) into per-thread room of q_row
// bytes and s_row floats a row (a's xq / sx then), and block(a, n0, n1) over W's rows on every thread.
template <class Prepare, class Block>
void run_w8_decode(QArgs& a, int64_t q_row, int64_t s_row, const Prepare& prepare, const Block& block) {
  thread_local AlignedVec<int8_t> xq;
  thread_local AlignedVec<float> sl;
  xq.resize(static_cast<size_t>(a.M * q_row));
  sl.resize(static_cast<size_t>(a.M * s_row));
  int8_t* pq = xq.data();  // (thread_local: the workers must not name xq / sl themselves)
  float* ps = sl.data();
  parallel_for(a.M, 1, [&](int64_t m0, int64_t m1, int) { prepare(pq, ps, m0, m1); });
  a.xq = pq;
  a.ldxq = q_row;
  a.sx = ps;
  a.ldsx = s_row;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.w->K * a.M));
  parallel_for(a.w->N, grain, [&](int64_t n0, int64_t n1, int) { block(a, n0, n1); });
}
}  // namespace
#endif

std::vector<std::string> int8_decode_formats() {
  std::vector<std::string> out;
#if defined(NE_INT8_X86)
  const W8Decode k = w8_decode_kernels();
  if (k.vnni512 || k.avx2) out.push_back("int4");
  if (k.vnni512) out.push_back("int8-weight");
#endif
  return out;
}

bool int8_activations_decode_x86(QArgs& a, const float* x, int64_t ldx) {
#if defined(NE_INT8_X86)
  const QWeight& w = *a.w;
  // int8-weight up to 3 rows: from 4 the float kernel's 4 x 4 tiles share each load of W among four rows of x and
  // win (Q6_K-like weight, 46M weights, K 2048: 3.54 against 4.00 ms at 4 rows; 1.4-1.8x the other way at 1-3)
  const W8Decode kern = w8_decode_kernels();
  const bool int4 = w.format == QFormat::Int4 && (kern.vnni512 || kern.avx2);
  const bool int8w = w.format == QFormat::Int8Weight && a.M <= kInt8WeightDecodeRows && kern.vnni512;
  if (!(int4 || int8w) || !w8_decode_ok(a, x, ldx)) return false;
  const int64_t K = w.K, steps = (K + 63) / 64, nb4 = (K / 32 + 3) / 4;
  if (int4)
    run_w8_decode(a, 128 * nb4, 16 * nb4, [&](int8_t* q, float* sx, int64_t m0, int64_t m1) {
      w4a8_activations(x, ldx, K, q, 128 * nb4, sx, m0, m1, kern.vnni512 ? round_block32_512 : round_block32_avx2);
    }, kern.vnni512 ? int4_block_w4a8 : int4_block_w4a8_avx2);
  else
    run_w8_decode(a, 64 * steps, 16 * steps, [&](int8_t* q, float* sx, int64_t m0, int64_t m1) {
      w8a8_activations(x, ldx, K, reinterpret_cast<uint8_t*>(q), 64 * steps, sx, m0, m1);
    }, int8w_block_w8a8);
  return true;
#else
  (void)a;
  (void)x;
  (void)ldx;
  return false;
#endif
}

bool int8_gemm_x86(const QArgs& a) {
#if defined(NE_INT8_X86)
  const std::string k = int8_kernel();
  if (k == "isa") return false;
  const int64_t N = a.w->N, K = a.w->K;
  const int64_t row_grain = std::max<int64_t>(4, 16384 / std::max<int64_t>(1, K * a.M));  // W rows per thread, at least
  if ((k == "avxvnni" || k == "avx512vnni") && a.M >= 16) {  // prefill: packed panels (x + 128 as u8 once)
    const int64_t Kp = a.ldxq;  // zero-padded to a multiple of 64 by the entry point
    thread_local AlignedVec<uint8_t> xu;
    xu.resize(static_cast<size_t>(a.M * Kp));
    uint8_t* pu = xu.data();  // (thread_local: the workers must not name xu itself)
    for (int64_t i = 0; i < a.M * Kp; ++i) pu[i] = static_cast<uint8_t>(a.xq[i]) ^ 0x80u;
    if (k == "avxvnni")
      parallel_for((N + kPanel8 - 1) / kPanel8, 1,
                   [&](int64_t p0, int64_t p1, int) { int8_panels_avxvnni(a, pu, Kp, p0, p1); });
    else
      parallel_for((N + kPanel - 1) / kPanel, 1,
                   [&](int64_t p0, int64_t p1, int) { int8_panels_vnni512(a, pu, Kp, p0, p1); });
    return true;
  }
  if (k == "avxvnni") {
    parallel_for(N, row_grain,
                 [&](int64_t n0, int64_t n1, int) { int8_block_avxvnni(a, n0, n1); });
    return true;
  }
  // AMX for whole 32-row blocks of W when x has enough rows to fill the tiles and K is whole 64-byte
  // tile rows; the VNNI kernel for the rest (and for decode, which is bound by streaming W anyway).
  int64_t n_amx = 0;
  if (k == "amx" && a.M >= 8 && K % 64 == 0) n_amx = N / 32 * 32;
  if (n_amx > 0) {
    const int64_t MBp = (a.M + 15) / 16;
    thread_local AlignedVec<int8_t> bp;
    bp.resize(static_cast<size_t>(MBp * (K / 64) * 1024));
    pack_x_amx(a, MBp, bp.data());
    const int8_t* B = bp.data();
    parallel_for(n_amx / 32, 1, [&](int64_t b0, int64_t b1, int) { int8_amx_blocks(a, B, MBp, 32 * b0, 32 * b1); });
  }
  if (n_amx < N)
    parallel_for(N - n_amx, row_grain,
                 [&](int64_t n0, int64_t n1, int) { int8_block_vnni512(a, n_amx + n0, n_amx + n1); });
  return true;
#else
  (void)a;
  return false;
#endif
}

}  // namespace ne
