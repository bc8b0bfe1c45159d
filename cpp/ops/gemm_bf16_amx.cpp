// The dense linear layer with bfloat16 products on AMX tiles (Sapphire Rapids and later): the
// "medium" matmul precision of gemm_f32 (ops/gemm.h), taken only when a caller allows it and the
// CPU has AMX-BF16. For m < M, n < N:
//
//     x'[m, k] = (x[m, k] - mu_m) * s_m                 (the norm epilogue's statistics, if any)
//     y[m, n]  = sum_k bf16(x'[m, k]) * bf16(W[n, k])  + bias[n]  (+ y[m, n] if accumulate)
//
// bf16() rounds to nearest even; every product is exact in fp32 and the sums accumulate in fp32
// (TDPBF16PS). This is what torch.set_float32_matmul_precision("medium") allows oneDNN to do with an
// fp32 matmul, and what a bf16 checkpoint's products are anyway. Applying the norm statistics to x
// before rounding (instead of in the epilogue as the fp32 path does) keeps rows with a large mean
// exact: bf16(x) of a row at 1e4 + N(0, 1) would lose the N(0, 1) part before the mean came off.
//
// Layout, as in the int8 AMX kernel: the product is computed transposed, C^T[n, m] = W[n, :] . x'[m, :],
// so that W's rows are the A tiles (16 rows x 32 bf16), loaded in place when W is bf16 with K a multiple
// of 32, else from a per-thread 32-row panel converted once and reused for every row of x. x' goes
// once per call into the B tiles' VNNI order, B[kk][2 m + j] = x'[m, k0 + 2 kk + j], zero past M and K.
// Register blocking 2 x 2: tmm0-3 accumulate 32 n x 32 m, tmm4-5 hold W, tmm6-7 hold x'.
//
// Without AMX but with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake) the same contract runs on VDPBF16PS, which
// adds the two products of each of 16 bf16 pairs into a float lane: dot products of rows, as the GEMV does,
// y[m, n] = reduce(sum over 32-column steps of dpbf16(W'[n, k ..], x'[m, k ..])), a tile of 4 rows of x by 4 of
// W (16 accumulators, 8 loads and 16 VDPBF16PS a step: twice the products of an fp32 FMA a cycle). x' is
// rounded once a call (rows of bf16, zero past K), W' per thread 32 rows at a time (in place when W is bf16
// with K a multiple of 32), each block of W' meeting every row of x while it sits in the L2.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/aligned.h"
#include "core/amx.h"
#include "core/dispatch.h"
#include "core/half.h"
#include "core/parallel.h"
#include "ops/gemm.h"

#if defined(NE_HAVE_X86_ISAS) && defined(__GNUC__)
#define NE_GEMM_AMX 1
#include <immintrin.h>
#endif

namespace ne {

bool amx_bf16_available() {
#if defined(NE_GEMM_AMX)
  return active_isa() >= Isa::AVX512BF16 && amx_caps().bf16;
#else
  return false;
#endif
}

bool bf16_products_available() {
#if defined(NE_GEMM_AMX)
  return active_isa() >= Isa::AVX512BF16;
#else
  return false;
#endif
}

#if defined(NE_GEMM_AMX)
namespace {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,amx-tile,amx-bf16")

constexpr int64_t kTileK = 32;  // bf16 elements per 64-byte tile row

// 16 floats to 16 bf16 (round to nearest even; the instruction flushes subnormals to zero)
inline __m256i bf16x16(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }

// x'[k0 .. k0 + 32) of row xr, (x - mu) s rounded to 32 bf16 (16 pairs, "units"), zero past K (k0 < K)
inline __m512i bf16_units(const GemmArgs& a, const float* xr, __m512 mu, __m512 s, int64_t k0) {
  const int64_t left = std::min<int64_t>(kTileK, a.K - k0);
  const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left > 16 ? __mmask16((1u << (left - 16)) - 1) : 0;
  const __m512 lo = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m0, xr + k0), mu), s);
  const __m512 hi = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m1, xr + k0 + 16), mu), s);
  // masked-off lanes are (0 - mu) s: zero them after the arithmetic
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_maskz_mov_ps(m1, hi), _mm512_maskz_mov_ps(m0, lo)));
}

// x' rows [16 mb0, 16 mb1) into B tiles: Bp + (mb * KS + ks) * 512 is the tile of rows 16 mb .. 16 mb
// + 15 and k in [32 ks, 32 ks + 32); rows past M and k past K are zero.
void pack_x(const GemmArgs& a, int64_t KS, int64_t mb0, int64_t mb1, uint16_t* Bp) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(16));  // unit kk of a row goes to tile row kk
  for (int64_t mb = mb0; mb < mb1; ++mb) {
    std::memset(Bp + mb * KS * 512, 0, static_cast<size_t>(KS * 1024));
    for (int m = 0; m < 16; ++m) {
      const int64_t row = 16 * mb + m;
      if (row >= a.M) break;
      const float* xr = a.x + row * a.ldx;
      const __m512 s = _mm512_set1_ps(a.ep.row_scale ? a.ep.row_scale[row] : 1.0f);
      const __m512 mu = _mm512_set1_ps(a.ep.row_shift ? a.ep.row_shift[row] : 0.0f);
      for (int64_t ks = 0; ks < KS; ++ks) {
        const __m512i units = bf16_units(a, xr, mu, s, ks * kTileK);
        uint32_t* tile = reinterpret_cast<uint32_t*>(Bp + (mb * KS + ks) * 512);
        _mm512_i32scatter_epi32(tile + m, rows, units, 4);
      }
    }
  }
}

// Rows [n0, n0 + 32) of W as bf16, zero past N and K, into Wp (32 rows of KS * 32).
void pack_w(const GemmArgs& a, DType wdtype, int64_t n0, int64_t KS, uint16_t* Wp) {
  const int64_t Kp = KS * kTileK;
  for (int i = 0; i < 32; ++i) {
    uint16_t* dst = Wp + i * Kp;
    const int64_t n = n0 + i;
    if (n >= a.N) {
      std::memset(dst, 0, static_cast<size_t>(Kp) * 2);
      continue;
    }
    if (wdtype == DType::BF16) {
      std::memcpy(dst, static_cast<const uint16_t*>(a.w) + n * a.ldw, static_cast<size_t>(a.K) * 2);
    } else {  // F32
      const float* src = static_cast<const float*>(a.w) + n * a.ldw;
      int64_t k = 0;
      for (; k + 16 <= a.K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), bf16x16(_mm512_loadu_ps(src + k)));
      for (; k < a.K; ++k) dst[k] = f32_to_bf16(src[k]);
    }
    std::memset(dst + a.K, 0, static_cast<size_t>(Kp - a.K) * 2);
  }
}

// y rows [16 mb, 16 mb + 16) x columns [nbase, nbase + 16) from the transposed tile C[i][j] =
// dot(W row nbase + i, x' row 16 mb + j): a gather of column j is x row j's 16 outputs.
void store_tile(const GemmArgs& a, const float (*C)[16], int64_t nbase, int64_t mbase) {
  if (nbase >= a.N) return;
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
  const int64_t nleft = a.N - nbase;
  const __mmask16 mask = nleft >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nleft) - 1);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + nbase) : _mm512_setzero_ps();
  const int mcount = static_cast<int>(std::min<int64_t>(16, a.M - mbase));
  for (int j = 0; j < mcount; ++j) {
    __m512 v = _mm512_add_ps(_mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(j)), &C[0][0], 4), bias);
    float* yr = a.y + (mbase + j) * a.ldy + nbase;
    if (a.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, yr));
    _mm512_mask_storeu_ps(yr, mask, v);
  }
}

// Output columns [32 b0, 32 b1) against every row of x (B tiles Bp, MB blocks of 16 rows).
void amx_blocks(const GemmArgs& a, DType wdtype, const uint16_t* Bp, int64_t MB, int64_t KS, int64_t b0,
                int64_t b1) {
  const AmxTileConfig cfg;
  _tile_loadconfig(&cfg);
  const bool in_place = wdtype == DType::BF16 && a.K % kTileK == 0;
  thread_local AlignedVec<uint16_t> panel;  // this worker's converted W rows (grown, never shrunk)
  if (!in_place || a.N % 32) panel.resize(static_cast<size_t>(32 * KS * kTileK));
  alignas(64) float C[4][16][16];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = 32 * b;
    const uint16_t* w0;
    int64_t stride;  // bytes between W rows in the A tiles
    if (in_place && n0 + 32 <= a.N) {
      w0 = static_cast<const uint16_t*>(a.w) + n0 * a.ldw;
      stride = a.ldw * 2;
    } else {
      pack_w(a, wdtype, n0, KS, panel.data());
      w0 = panel.data();
      stride = KS * kTileK * 2;
    }
    const uint16_t* w1 = w0 + 16 * (stride / 2);
    // While the tiles work on this block, prefetch the next block's W rows (each is read from memory
    // once per call; without this pack_w of a float32 W waits on DRAM, ~25% of a prefill)
    const char* next = nullptr;
    int64_t next_lines = 0, per_step = 0, fetched = 0;
    const int64_t esize = wdtype == DType::F32 ? 4 : 2;
    if (b + 1 < b1) {
      next = static_cast<const char*>(a.w) + 32 * (b + 1) * a.ldw * esize;
      const int64_t rows = std::min<int64_t>(32, a.N - 32 * (b + 1));
      next_lines = (((rows - 1) * a.ldw + a.K) * esize + 63) / 64;
      per_step = (next_lines + (MB + 1) / 2 * KS - 1) / ((MB + 1) / 2 * KS);
    }
    for (int64_t mb = 0; mb < MB; mb += 2) {
      const bool two = mb + 1 < MB;  // a second 16-row block of x (else tiles 1 and 3 stay idle)
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* x0 = Bp + mb * KS * 512;
      const uint16_t* x1 = x0 + KS * 512;
      for (int64_t ks = 0; ks < KS; ++ks) {
        for (int64_t i = 0; i < per_step && fetched < next_lines; ++i, ++fetched)
          _mm_prefetch(next + 64 * fetched, _MM_HINT_T1);
        _tile_loadd(4, w0 + ks * kTileK, stride);  // W[n0 .. n0 + 15, 32 ks ..]
        _tile_loadd(5, w1 + ks * kTileK, stride);  // W[n0 + 16 .. n0 + 31, 32 ks ..]
        _tile_loadd(6, x0 + ks * 512, 64);         // x' rows 16 mb .., VNNI pairs
        _tile_dpbf16ps(0, 4, 6);                   // C^T[n0 .., 16 mb ..] += W x'^T
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
          _tile_loadd(7, x1 + ks * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, C[0], 64);
      _tile_stored(2, C[2], 64);
      store_tile(a, C[0], n0, 16 * mb);
      store_tile(a, C[2], n0 + 16, 16 * mb);
      if (two) {
        _tile_stored(1, C[1], 64);
        _tile_stored(3, C[3], 64);
        store_tile(a, C[1], n0, 16 * (mb + 1));
        store_tile(a, C[3], n0 + 16, 16 * (mb + 1));
      }
    }
  }
  _tile_release();
}

// ------------------------------------------------------------------ AVX512-BF16 dot products (no AMX)
constexpr int64_t kDotRows = 32;  // rows of W' a thread rounds at a time

// x' rows [m0, m1) rounded to bf16 into Xb (rows of Kp, zero past K): pack_x's arithmetic, row-major.
void dot_pack_x(const GemmArgs& a, int64_t Kp, int64_t m0, int64_t m1, uint16_t* Xb) {
  for (int64_t row = m0; row < m1; ++row) {
    const float* xr = a.x + row * a.ldx;
    const __m512 s = _mm512_set1_ps(a.ep.row_scale ? a.ep.row_scale[row] : 1.0f);
    const __m512 mu = _mm512_set1_ps(a.ep.row_shift ? a.ep.row_shift[row] : 0.0f);
    for (int64_t k0 = 0; k0 < Kp; k0 += kTileK)  // (Kp: K rounded up to 32, so k0 < K)
      _mm512_storeu_si512(Xb + row * Kp + k0, bf16_units(a, xr, mu, s, k0));
  }
}

// W rows [n0, n0 + rows) rounded to bf16 into Wb (rows of Kp, zero past K).
void dot_pack_w(const GemmArgs& a, DType wdtype, int64_t n0, int64_t rows, int64_t Kp, uint16_t* Wb) {
  for (int64_t i = 0; i < rows; ++i) {
    uint16_t* dst = Wb + i * Kp;
    if (wdtype == DType::BF16) {
      std::memcpy(dst, static_cast<const uint16_t*>(a.w) + (n0 + i) * a.ldw, static_cast<size_t>(a.K) * 2);
    } else {
      const float* src = static_cast<const float*>(a.w) + (n0 + i) * a.ldw;
      int64_t k = 0;
      for (; k + 16 <= a.K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), bf16x16(_mm512_loadu_ps(src + k)));
      for (; k < a.K; ++k) dst[k] = f32_to_bf16(src[k]);
    }
    std::memset(dst + a.K, 0, static_cast<size_t>(Kp - a.K) * 2);
  }
}

// y[m + r, n + c] for r < MR, c < NR: the dot products of x' rows and W' rows over Kp, + bias (+ y).
template <int MR, int NR>
void dot_tile(const GemmArgs& a, const uint16_t* X, int64_t Kp, const uint16_t* W, int64_t ldW, int64_t m,
              int64_t n) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 32) {
    __m512bh w[NR], x[MR];
    for (int c = 0; c < NR; ++c) w[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(W + c * ldW + k));
    for (int r = 0; r < MR; ++r) x[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(X + (m + r) * Kp + k));
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x[r], w[c]);
  }
  float sums[MR][NR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NR; ++c) sums[r][c] = _mm512_reduce_add_ps(acc[r][c]);
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      float v = sums[r][c] + (a.bias ? a.bias[n + c] : 0.0f);
      float& y = a.y[(m + r) * a.ldy + n + c];
      y = a.accumulate ? y + v : v;
    }
}

// Output columns [32 b0, 32 b1) against every row of x (Xb: x' rows of Kp).
void dot_blocks(const GemmArgs& a, DType wdtype, const uint16_t* Xb, int64_t Kp, int64_t b0, int64_t b1) {
  const bool in_place = wdtype == DType::BF16 && a.K == Kp;
  thread_local AlignedVec<uint16_t> panel;  // this worker's rounded W rows (grown, never shrunk)
  if (!in_place) panel.resize(static_cast<size_t>(kDotRows * Kp));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = kDotRows * b, rows = std::min(kDotRows, a.N - n0);
    const uint16_t* W = static_cast<const uint16_t*>(a.w) + n0 * a.ldw;
    int64_t ldW = a.ldw;
    if (!in_place) {
      dot_pack_w(a, wdtype, n0, rows, Kp, panel.data());
      W = panel.data();
      ldW = Kp;
    }
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) {
      int64_t c = 0;
      for (; c + 4 <= rows; c += 4) dot_tile<4, 4>(a, Xb, Kp, W + c * ldW, ldW, m, n0 + c);
      for (; c < rows; ++c) dot_tile<4, 1>(a, Xb, Kp, W + c * ldW, ldW, m, n0 + c);
    }
    for (; m < a.M; ++m) {
      int64_t c = 0;
      for (; c + 4 <= rows; c += 4) dot_tile<1, 4>(a, Xb, Kp, W + c * ldW, ldW, m, n0 + c);
      for (; c < rows; ++c) dot_tile<1, 1>(a, Xb, Kp, W + c * ldW, ldW, m, n0 + c);
    }
  }
}

bool gemm_bf16_dot(const GemmArgs& a, DType wdtype) {
  const int64_t Kp = (a.K + 31) / 32 * 32;
  thread_local AlignedVec<uint16_t> xb;  // x' as bf16 rows, reused across calls
  xb.resize(static_cast<size_t>(a.M * Kp));
  uint16_t* X = xb.data();  // (thread_local: the workers must not name xb itself)
  parallel_for(a.M, 4, [&](int64_t m0, int64_t m1, int) { dot_pack_x(a, Kp, m0, m1, X); });
  parallel_for((a.N + kDotRows - 1) / kDotRows, 1,
               [&](int64_t b0, int64_t b1, int) { dot_blocks(a, wdtype, X, Kp, b0, b1); });
  return true;
}

#pragma GCC pop_options

}  // namespace
#endif  // NE_GEMM_AMX

bool gemm_bf16(const GemmArgs& a, DType wdtype) {
#if defined(NE_GEMM_AMX)
  if (!bf16_products_available() || (wdtype != DType::F32 && wdtype != DType::BF16) || a.M < kAmxMinRows) return false;
  if (!amx_bf16_available()) return gemm_bf16_dot(a, wdtype);
  const int64_t KS = (a.K + kTileK - 1) / kTileK, MB = (a.M + 15) / 16;
  thread_local AlignedVec<uint16_t> bp;  // x' in B-tile order, reused across calls
  bp.resize(static_cast<size_t>(MB * KS * 512));
  uint16_t* B = bp.data();  // (thread_local: the workers must not name bp itself)
  parallel_for(MB, 2, [&](int64_t m0, int64_t m1, int) { pack_x(a, KS, m0, m1, B); });
  parallel_for((a.N + 31) / 32, 1, [&](int64_t b0, int64_t b1, int) { amx_blocks(a, wdtype, B, MB, KS, b0, b1); });
  return true;
#else
  (void)a;
  (void)wdtype;
  return false;
#endif
}

}  // namespace ne
