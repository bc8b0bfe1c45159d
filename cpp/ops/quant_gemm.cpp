// Quantized GEMM kernels (CPU). Compiled once per ISA; entry points in the generic build. For every
// output y[m, n] = sum_k x[m, k] * W[n, k] with W packed (quant_gemm.h):
//   Int8 (W8A8)  y = sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k]            int32 sums
//   Int8Weight   y = sw[n] * sum_k x[m, k] * wq[n, k]                     fp32 sums
//                (grouped: y = sum_g sw[n, g] * sum_{k in g} x[m, k] * wq[n, k])
//   Int4         y = sum_g s[n, g] * (sum_{k in g} q[n, k] x[m, k] - z[n, g] * gsum[m, g])
//   FP8          y = sum_b sx[m, b] * sw(n, b) * sum_{k in b} xf[m, k] * e4m3(wq[n, k])
// then the norm epilogue y = r_m (y - mu_m c_n), + bias, (+ y). Each thread owns a range of W's
// rows and streams them once per row of x (GEMV order; x rows and their prepared forms stay in
// L1/L2), so the traffic is the packed weights once per call: 1 byte per weight (int8, fp8), 1/2
// (int4), plus the scales.
// AVX2 (and the AVX-512 builds, which use the same 256-bit code): int8 products with vpmaddubsw on
// (|w|, x * sign(w)) — |w| <= 127 and |x| <= 127 keep each pair sum <= 32258, below the int16
// saturation — then vpmaddwd with ones into int32; int4 nibbles turned into fp32 in registers (AVX-512: a
// 16-entry vpermps table lookup; AVX2: widen and convert) and FMA'd with x; int8 weights widened likewise. Generic: the same sums in scalar code.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/aligned.h"
#include "core/half.h"
#include "core/parallel.h"
#include "ops/quant_gemm.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ne {
namespace NE_ISA_NS {
namespace {

// E4M3 (fn) value of every byte (NaN for 0x7f / 0xff).
struct E4M3Table {
  float v[256];
  E4M3Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float f = (e == 15 && m == 7) ? NAN
              : e == 0              ? std::ldexp(static_cast<float>(m) / 8.0f, -6)
                                    : std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
      v[b] = (b & 0x80) ? -f : f;
    }
  }
};
const E4M3Table& e4m3() {
  static const E4M3Table t;
  return t;
}

#if defined(__AVX2__)
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ---------------------------------------------------------------- Int8 (W8A8): integer dot products
// Rows of x in groups of 4 share each 32-byte load of W and its |w| (the sign of w moves onto x):
// per 32 columns and row, vpsignb + vpmaddubsw + vpmaddwd + vpaddd.
void block_int8(const QArgs& a, int64_t n0, int64_t n1) {
  const QWeight& w = *a.w;
  const int64_t K = w.K;
  const int8_t* W = static_cast<const int8_t*>(w.data);
  int64_t m = 0;
#if defined(__AVX2__)
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t K32 = K / 32 * 32;
  for (; m + 4 <= a.M; m += 4) {
    const int8_t* x0 = a.xq + m * a.ldxq;
    const int64_t ld = a.ldxq;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = W + n * K;
      __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t k = 0; k < K32; k += 32) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        // |w| * (x signed like w), pairs summed to int16 then int32 (no lambda: GCC kept the
        // accumulators in memory through one in the VNNI kernel)
#define NE_I8_DOT(xr, acc)                                                                               \
  acc = _mm256_add_epi32(                                                                                \
      acc, _mm256_madd_epi16(                                                                            \
               _mm256_maddubs_epi16(                                                                     \
                   aw, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>((xr) + k)), wv)), \
               ones))
        NE_I8_DOT(x0, acc0);
        NE_I8_DOT(x0 + ld, acc1);
        NE_I8_DOT(x0 + 2 * ld, acc2);
        NE_I8_DOT(x0 + 3 * ld, acc3);
#undef NE_I8_DOT
      }
      int32_t d[4] = {hsum_i32(acc0), hsum_i32(acc1), hsum_i32(acc2), hsum_i32(acc3)};
      for (int64_t k = K32; k < K; ++k)
        for (int r = 0; r < 4; ++r) d[r] += static_cast<int32_t>(x0[r * ld + k]) * wr[k];
      for (int r = 0; r < 4; ++r) quant_store(a, m + r, n, static_cast<float>(d[r]) * a.sx[(m + r) * a.ldsx] * w.scale[n]);
    }
  }
#endif
  for (; m < a.M; ++m) {
    const int8_t* xq = a.xq + m * a.ldxq;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = W + n * K;
      int64_t k = 0;
      int32_t dot = 0;
#if defined(__AVX2__)
      __m256i acc = _mm256_setzero_si256();
      for (; k + 32 <= K; k += 32) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k) + 4096, _MM_HINT_T1);  // decode: W once
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
      }
      dot = hsum_i32(acc);
#endif
      for (; k < K; ++k) dot += static_cast<int32_t>(xq[k]) * wr[k];
      quant_store(a, m, n, static_cast<float>(dot) * a.sx[m * a.ldsx] * w.scale[n]);
    }
  }
}

// The scales of groups [g0, g1) of one row n of W, as the kernels read them (indexed from g0): pointers into w's
// arrays, or, for two-level scales (QWeight::sub), the products s = d sc (and offsets o = dmin m) expanded into
// buf (2 (g1 - g0) floats), a super-block's scale loaded once: the same float32 products as quant_elem.
struct RowScales {
  const float* s;  // each group's scale
  const float* z;  // zero points in quantized units, w = (q - z) s, or null
  const float* o;  // two-level offsets in weight units, w = q s - o, or null
  float zc;        // neither: every group's zero point (int4's QWeight::zero_point; 0 for int8-weight)
};
inline RowScales row_scales(const QWeight& w, int64_t n, int64_t g0, int64_t g1, float* buf) {
  const int64_t G = w.K / w.group, len = g1 - g0;
  const float zc = w.format == QFormat::Int4 && !w.sub_zero ? w.zero_point : 0.0f;
  if (!w.sub) return {w.scale + n * G + g0, w.zero ? w.zero + n * G + g0 : nullptr, nullptr, zc};
  const int64_t S = w.super, first = (n * G + g0) / S;  // (one division a row: a 64-bit idiv costs tens of cycles)
  auto expand = [&](const float* top, const int8_t* sub, float* out) {
    sub += n * G;
    const float* d_at = top + first;
    for (int64_t g = g0, next = (g0 / S + 1) * S; g < g1; next += S) {
      const float d = *d_at++;
      const int64_t end = std::min(g1, next);
#if defined(__AVX2__)
      const __m256 vd = _mm256_set1_ps(d);  // 8 sub-scales a step: int8 -> float, times d
      for (; g + 8 <= end; g += 8) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub + g));
        _mm256_storeu_ps(out + (g - g0), _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))));
      }
#endif
      for (; g < end; ++g) out[g - g0] = d * static_cast<float>(sub[g]);
    }
  };
  expand(w.scale, w.sub, buf);
  if (!w.sub_zero) return {buf, nullptr, nullptr, zc};
  expand(w.zero, w.sub_zero, buf + len);
  return {buf, nullptr, buf + len, 0.0f};
}

// Per-thread room for the expanded two-level scales of `rows` rows of W (row_scales' buf, 2 G floats each).
inline float* scale_room(const QWeight& w, int rows) {
  thread_local Vec<float> room;
  const size_t need = w.sub ? static_cast<size_t>(2 * rows * (w.K / w.group)) : 0;
  if (room.size() < need) room.resize(need);
  return room.data();
}

// sum_g (s_g z_g or o_g) gsum_g over G groups (gsum from the rows' first group): a zero-pointed weight row's
// offset term (z null: zc for every group)
inline float zero_term(const RowScales& r, const float* gsum, int64_t G) {
  int64_t g = 0;
  float t = 0.0f;
  const float *s = r.s, *z = r.z, *o = r.o;
  const float zc = r.zc;
#if defined(__AVX512F__)
  __m512 v = _mm512_setzero_ps();
  for (; g + 16 <= G; g += 16) {
    const __m512 zg = z ? _mm512_loadu_ps(z + g) : _mm512_set1_ps(zc);
    const __m512 f = o ? _mm512_loadu_ps(o + g) : _mm512_mul_ps(_mm512_loadu_ps(s + g), zg);
    v = _mm512_fmadd_ps(f, _mm512_loadu_ps(gsum + g), v);
  }
  t = _mm512_reduce_add_ps(v);
#elif defined(__AVX2__)
  __m256 v = _mm256_setzero_ps();
  for (; g + 8 <= G; g += 8) {
    const __m256 zg = z ? _mm256_loadu_ps(z + g) : _mm256_set1_ps(zc);
    const __m256 f = o ? _mm256_loadu_ps(o + g) : _mm256_mul_ps(_mm256_loadu_ps(s + g), zg);
    v = _mm256_fmadd_ps(f, _mm256_loadu_ps(gsum + g), v);
  }
  t = hsum_ps(v);
#endif
  for (; g < G; ++g) t += (o ? o[g] : s[g] * (z ? z[g] : zc)) * gsum[g];
  return t;
}

// A tile's operands: rows n .. n + NR of W (codes, the scales of their G groups) and rows m .. m + MR of x.
template <int MR, int NR>
struct Int8wTile {
  const int8_t* w[NR];
  RowScales s[NR];
  const float* x[MR];
  Int8wTile(const QArgs& a, int64_t m, int64_t n, int64_t G, float* room) {
    const QWeight& q = *a.w;
    for (int c = 0; c < NR; ++c) {
      w[c] = static_cast<const int8_t*>(q.data) + (n + c) * q.K;
      s[c] = q.group > 0 ? row_scales(q, n + c, 0, G, room + 2 * c * G)
                         : RowScales{q.scale + n + c, nullptr, nullptr, 0.0f};
    }
    for (int r = 0; r < MR; ++r) x[r] = a.x + (m + r) * a.ldx;
  }
};

// ---------------------------------------------------------------- Int8Weight: fp32 x, int8 W
// y = sum_g s_g sum_{k in g} q_k x_k over groups of g columns, each with its own scale (llama.cpp's Q8_0 is
// g = 32; per-row scales are one group of K): each group's vector sum is scaled once into the running
// total (one FMA per vector per group) and reduced once. With zero points (ZP: w = (q - z_g) s_g, GGUF's
// Q5_1 / Q5_K / Q2_K blocks) y takes - sum_g s_g z_g gsum_g at the end, gsum the sums of x over each group (made
// once per call by the entry point). A tile of MR rows of x and NR rows of W: NR streams of W from memory in flight,
// each load of x serving NR rows and each widened vector of W MR rows (one row of W at a time streamed W at
// 29 GB/s here, four at 40; a batch of rows of x shares each decode of W). With AVX2 or AVX-512 it takes the
// per-row scales only; grouped ones go to int8w_scaled_tile there.
template <int MR, int NR, bool ZP>
void int8w_tile(const QArgs& a, int64_t m, int64_t n, float* room) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, g = w.group > 0 ? w.group : K, G = K / g;
  const Int8wTile<MR, NR> p(a, m, n, G, room);
  const int8_t* const* wr = p.w;
  const RowScales* sr = p.s;
  const float* const* x = p.x;
  float y[MR][NR], tail[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) y[r][c] = 0.0f;
#if defined(__AVX512F__)
  constexpr int64_t kStep = 32;  // one 32-byte load of W widened to two vectors of 16 floats
  __m512 t[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) t[r][c] = _mm512_setzero_ps();
#elif defined(__AVX2__)
  constexpr int64_t kStep = 16;
  __m256 t[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) t[r][c] = _mm256_setzero_ps();
#else
  constexpr int64_t kStep = 1 << 30;  // (no vectors: every column goes through the scalar loop)
#endif
  const int64_t kv = g / kStep * kStep;  // the columns of a group that whole vectors cover
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t k1 = (gi + 1) * g;
    [[maybe_unused]] const int64_t kv1 = gi * g + kv;
    int64_t k = gi * g;
#if defined(__AVX512F__)
    __m512 acc[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
    for (; k < kv1; k += kStep) {
      __m512 w0[NR], w1[NR];
      for (int c = 0; c < NR; ++c) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr[c] + k) + 4096, _MM_HINT_T1);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[c] + k));
        w0[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        w1[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      }
      for (int r = 0; r < MR; ++r) {
        const __m512 x0 = _mm512_loadu_ps(x[r] + k), x1 = _mm512_loadu_ps(x[r] + k + 16);
        for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_fmadd_ps(w1[c], x1, _mm512_fmadd_ps(w0[c], x0, acc[r][c]));
      }
    }
    for (int c = 0; c < NR; ++c) {
      const __m512 sg = _mm512_set1_ps(sr[c].s[gi]);
      for (int r = 0; r < MR; ++r) t[r][c] = _mm512_fmadd_ps(acc[r][c], sg, t[r][c]);
    }
#elif defined(__AVX2__)
    __m256 acc[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_setzero_ps();
    for (; k < kv1; k += kStep) {
      __m256 w0[NR], w1[NR];
      for (int c = 0; c < NR; ++c) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr[c] + k) + 4096, _MM_HINT_T1);
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[c] + k));
        w0[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        w1[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 x0 = _mm256_loadu_ps(x[r] + k), x1 = _mm256_loadu_ps(x[r] + k + 8);
        for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_fmadd_ps(w1[c], x1, _mm256_fmadd_ps(w0[c], x0, acc[r][c]));
      }
    }
    for (int c = 0; c < NR; ++c) {
      const __m256 sg = _mm256_set1_ps(sr[c].s[gi]);
      for (int r = 0; r < MR; ++r) t[r][c] = _mm256_fmadd_ps(acc[r][c], sg, t[r][c]);
    }
#endif
    // columns past the last whole vector (per-row scales with K not a multiple of it; every column in
    // the portable build)
    if (k < k1) {
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NR; ++c) tail[r][c] = 0.0f;
      for (; k < k1; ++k)
        for (int r = 0; r < MR; ++r)
          for (int c = 0; c < NR; ++c) tail[r][c] += x[r][k] * static_cast<float>(wr[c][k]);
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NR; ++c) y[r][c] += tail[r][c] * sr[c].s[gi];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
#if defined(__AVX512F__)
      y[r][c] += _mm512_reduce_add_ps(t[r][c]);
#elif defined(__AVX2__)
      y[r][c] += hsum_ps(t[r][c]);
#endif
      if constexpr (ZP) y[r][c] -= zero_term(sr[c], a.gsum + (m + r) * G, G);
      quant_store(a, m + r, n + c, y[r][c]);
    }
}

#if defined(__AVX2__)
// Grouped scales (groups of 16, a GGUF Q6_K / Q3_K / Q2_K sub-block, to 128): each widened vector of codes (one
// group or part of one) is scaled, q s_g, before the FMAs: one multiply per vector of W, shared by the MR rows
// of x, and one accumulator per output (a running sum per group and a total, as int8w_tile keeps, took 32
// registers at AVX-512's 4 x 4 and spilled: 1.05-1.15 ms at M = 4, K = N = 4096, g32; this 0.79). Zero points
// as int8w_tile. AVX-512: 32 columns a step (two groups of 16, or part of one), K % 32 == 16 one last vector;
// AVX2: 16 a step.
template <int MR, int NR, bool ZP>
void int8w_scaled_tile(const QArgs& a, int64_t m, int64_t n, float* room) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, g = w.group, G = K / g;
  const int gshift = __builtin_ctzll(static_cast<unsigned long long>(g));  // (groups are powers of two)
  const Int8wTile<MR, NR> p(a, m, n, G, room);
  const int8_t* const* wr = p.w;
  const RowScales* sr = p.s;
  const float* const* x = p.x;
#if defined(__AVX512F__)
  // q s of the 16 codes at column k of W row c
  auto values = [&](__m128i codes, int c, int64_t k) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), _mm512_set1_ps(sr[c].s[k >> gshift]));
  };
  __m512 t[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) t[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 w0[NR], w1[NR];
    for (int c = 0; c < NR; ++c) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr[c] + k) + 4096, _MM_HINT_T1);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[c] + k));
      w0[c] = values(_mm256_castsi256_si128(b), c, k);
      w1[c] = values(_mm256_extracti128_si256(b, 1), c, k + 16);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 x0 = _mm512_loadu_ps(x[r] + k), x1 = _mm512_loadu_ps(x[r] + k + 16);
      for (int c = 0; c < NR; ++c) t[r][c] = _mm512_fmadd_ps(w1[c], x1, _mm512_fmadd_ps(w0[c], x0, t[r][c]));
    }
  }
  if (k < K) {  // the last 16 columns
    for (int c = 0; c < NR; ++c) {
      const __m512 wv = values(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[c] + k)), c, k);
      for (int r = 0; r < MR; ++r) t[r][c] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[r] + k), t[r][c]);
    }
  }
#else
  __m256 t[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) t[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {  // (16 columns: one group or part of one)
    __m256 w0[NR], w1[NR];
    for (int c = 0; c < NR; ++c) {
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr[c] + k) + 4096, _MM_HINT_T1);
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[c] + k));
      const __m256 sg = _mm256_set1_ps(sr[c].s[k >> gshift]);
      w0[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sg);
      w1[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), sg);
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 x0 = _mm256_loadu_ps(x[r] + k), x1 = _mm256_loadu_ps(x[r] + k + 8);
      for (int c = 0; c < NR; ++c) t[r][c] = _mm256_fmadd_ps(w1[c], x1, _mm256_fmadd_ps(w0[c], x0, t[r][c]));
    }
  }
#endif
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
#if defined(__AVX512F__)
      float y = _mm512_reduce_add_ps(t[r][c]);
#else
      float y = hsum_ps(t[r][c]);
#endif
      if constexpr (ZP) y -= zero_term(sr[c], a.gsum + (m + r) * G, G);
      quant_store(a, m + r, n + c, y);
    }
}
#endif

// Rows [m, m + MR) of x against rows [n0, n1) of W, NR rows of W at a time (then single rows).
template <int MR, int NR, bool ZP>
void int8w_rows_zp(const QArgs& a, int64_t m, int64_t n0, int64_t n1) {
  int64_t n = n0;
  float* room = scale_room(*a.w, NR);  // (once a call: a thread_local's address costs a call in a shared library)
#if defined(__AVX2__)
  if (a.w->group > 0) {
    for (; n + NR <= n1; n += NR) int8w_scaled_tile<MR, NR, ZP>(a, m, n, room);
    for (; n < n1; ++n) int8w_scaled_tile<MR, 1, ZP>(a, m, n, room);
    return;
  }
#endif
  for (; n + NR <= n1; n += NR) int8w_tile<MR, NR, ZP>(a, m, n, room);
  for (; n < n1; ++n) int8w_tile<MR, 1, ZP>(a, m, n, room);
}

template <int MR, int NR>
void int8w_rows(const QArgs& a, int64_t m, int64_t n0, int64_t n1) {
  if (a.w->zero) int8w_rows_zp<MR, NR, true>(a, m, n0, n1);
  else int8w_rows_zp<MR, NR, false>(a, m, n0, n1);
}

// Tiles that fit the register file (accumulators, totals, widened W, x): AVX-512's 32 registers take 4 x 4;
// AVX2's 16 take 2 x 2 and 1 x 3 (1 x 4 spilled: 0.61 ms against 0.44 at M = 1, K = N = 4096).
void block_int8w(const QArgs& a, int64_t n0, int64_t n1) {
  int64_t m = 0;
#if defined(__AVX512F__)
  for (; m + 4 <= a.M; m += 4) int8w_rows<4, 4>(a, m, n0, n1);
  if (m + 2 <= a.M) {
    int8w_rows<2, 4>(a, m, n0, n1);
    m += 2;
  }
  for (; m < a.M; ++m) int8w_rows<1, 4>(a, m, n0, n1);
#else
  for (; m + 2 <= a.M; m += 2) int8w_rows<2, 2>(a, m, n0, n1);
  for (; m < a.M; ++m) int8w_rows<1, 3>(a, m, n0, n1);
#endif
}

// ---------------------------------------------------------------- Int4: nibbles, groups along K
// y = sum_g s_g (sum_{k in g} q_k x_k) - sum_g s_g z_g gsum_g. The entry point stores x de-interleaved
// per D columns (AVX2: D = 16, the 8 even columns then the 8 odd ones; AVX-512: D = 32), so 8 bytes of W (16 nibbles) widen
// to two vectors of 8 floats (low nibbles = even k, high = odd k) that meet x with plain loads. AVX2 scales each
// group's vector sum once (one FMA per group), AVX-512 decodes to q s directly (int4_tile512); the output is
// reduced once.
#if defined(__AVX512F__)
// y[m .. m + MR, n .. n + NR): sum_k q_k s_g x_k for every (row, column) pair, then the zero-point term from
// each row's group sums of x. A nibble becomes its value q s_g by table lookup: vpermps reads only the low 4
// bits of each 32-bit index, so the zero-extended byte b indexes the group's table {0, s, 2 s, ..., 15 s} (one
// multiply per group and row of W) by its low nibble as it is, and b >> 4 by its high one (no mask, no
// int->float convert, no scaling of sums: 3 shuffles and 1 shift per 32 weights, one accumulator per output).
// Each decoded column meets MR rows of x, so small batches (MR = 4) decode W once for four rows. Groups
// [g0, g1) only; the sums (zero-point term included) are added to part[r * ldp + c].
// (G16: groups of 16, its own instance: with both loops in one function GCC kept the sums in memory)
template <int MR, int NR, bool G16>
void int4_tile512(const QArgs& a, int64_t m, int64_t n, int64_t g0, int64_t g1, float* part, int64_t ldp,
                  float* room) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, g = w.group, G = K / g;
  const __m512 nibble = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* wr[NR];
  for (int c = 0; c < NR; ++c) wr[c] = static_cast<const uint8_t*>(w.data) + (n + c) * (K / 2);
  RowScales rs[NR];
  for (int c = 0; c < NR; ++c) rs[c] = row_scales(w, n + c, g0, g1, room + 2 * c * (g1 - g0));
  __m512 total[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) total[r][c] = _mm512_setzero_ps();
  if constexpr (G16) {  // (two-level scales: a GGUF Q3_K / Q2_K) two groups a 32-column step, two tables
    // lanes 0-7 of both halves (columns 2j and 2j + 1, j < 8) are the first group's: index bit 4 picks the table
    const __m512i lo4 = _mm512_set1_epi32(15);
    const __m512i second = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
    for (int64_t gi = g0; gi < g1; gi += 2) {
      __m512 ta[NR], tb[NR];
      for (int c = 0; c < NR; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[c]) + gi * 8 + 4096, _MM_HINT_T1);
        ta[c] = _mm512_mul_ps(nibble, _mm512_set1_ps(rs[c].s[gi - g0]));
        tb[c] = _mm512_mul_ps(nibble, _mm512_set1_ps(rs[c].s[gi + 1 - g0]));
      }
      const int64_t k = gi * 16;
      __m512 xe[MR], xo[MR];
      for (int r = 0; r < MR; ++r) {
        xe[r] = _mm512_loadu_ps(a.xf + (m + r) * K + k);
        xo[r] = _mm512_loadu_ps(a.xf + (m + r) * K + k + 16);
      }
      for (int c = 0; c < NR; ++c) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[c] + k / 2)));
        const __m512 qe = _mm512_permutex2var_ps(ta[c], _mm512_or_si512(_mm512_and_si512(b, lo4), second), tb[c]);
        const __m512 qo = _mm512_permutex2var_ps(ta[c], _mm512_or_si512(_mm512_srli_epi32(b, 4), second), tb[c]);
        for (int r = 0; r < MR; ++r)
          total[r][c] = _mm512_fmadd_ps(qo, xo[r], _mm512_fmadd_ps(qe, xe[r], total[r][c]));
      }
    }
  }
  // one flat loop over the columns, the tables made anew at each group's first step: with a loop per group nested
  // in one over the groups, GCC stored the accumulators to the stack at every step
  const float* xf = a.xf + m * K;
  __m512 table[NR];
  for (int64_t k = G16 ? 0 : g0 * g; k < (G16 ? 0 : g1 * g); k += 32) {
    if ((k & (g - 1)) == 0) {
      const int64_t gi = k >> __builtin_ctzll(g);  // k / g (g a power of two: a division here cost an idiv)
      // decode reads W from memory once: each row's bytes 4 KB ahead are requested (as the int8 GEMV)
      for (int c = 0; c < NR; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[c]) + k / 2 + 4096, _MM_HINT_T1);
        table[c] = _mm512_mul_ps(nibble, _mm512_set1_ps(rs[c].s[gi - g0]));
      }
    }
    __m512 xe[MR], xo[MR];  // x de-interleaved per 32 columns: 16 even k, then 16 odd k
    for (int r = 0; r < MR; ++r) {
      xe[r] = _mm512_loadu_ps(xf + r * K + k);
      xo[r] = _mm512_loadu_ps(xf + r * K + k + 16);
    }
    for (int c = 0; c < NR; ++c) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[c] + k / 2)));
      const __m512 qe = _mm512_permutexvar_ps(b, table[c]);                       // low nibbles: even k
      const __m512 qo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table[c]);  // high nibbles: odd k
      for (int r = 0; r < MR; ++r)
        total[r][c] = _mm512_fmadd_ps(qo, xo[r], _mm512_fmadd_ps(qe, xe[r], total[r][c]));
    }
  }
  // the sums reduced in unrolled loops first: a rolled loop over `total` made GCC keep it in memory, storing the
  // accumulators to the stack at every step of the loops above
  float sums[MR][NR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NR; ++c) sums[r][c] = _mm512_reduce_add_ps(total[r][c]);
  for (int r = 0; r < MR; ++r) {
    const float* gs = a.gsum + (m + r) * G + g0;
    for (int c = 0; c < NR; ++c)  // minus sum_g s_g z_g gsum_g (or o_g gsum_g)
      part[r * ldp + c] += sums[r][c] - zero_term(rs[c], gs, g1 - g0);
  }
}
#endif

#if defined(__AVX512F__)
// Rows [m, m + MR) of x against rows [n0, n1) of W: tiles of NR rows of W (then single rows), over K
// blocks of GB groups, the sums gathered in `part` and stored once.
template <int MR, int NR>
void int4_rows512(const QArgs& a, int64_t m, int64_t n0, int64_t n1, int64_t GB) {
  const int64_t G = a.w->K / a.w->group, ldp = n1 - n0;
  thread_local Vec<float> part;
  part.assign(static_cast<size_t>(MR * ldp), 0.0f);
  float* room = scale_room(*a.w, NR);
  for (int64_t gb = 0; gb < G; gb += GB) {
    const int64_t ge = std::min(G, gb + GB);
    int64_t n = n0;
    if (a.w->group == 16) {
      for (; n + NR <= n1; n += NR) int4_tile512<MR, NR, true>(a, m, n, gb, ge, part.data() + (n - n0), ldp, room);
      for (; n < n1; ++n) int4_tile512<MR, 1, true>(a, m, n, gb, ge, part.data() + (n - n0), ldp, room);
    } else {
      for (; n + NR <= n1; n += NR) int4_tile512<MR, NR, false>(a, m, n, gb, ge, part.data() + (n - n0), ldp, room);
      for (; n < n1; ++n) int4_tile512<MR, 1, false>(a, m, n, gb, ge, part.data() + (n - n0), ldp, room);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int64_t n = n0; n < n1; ++n) quant_store(a, m + r, n, part[r * ldp + (n - n0)]);
}
#endif

void block_int4(const QArgs& a, int64_t n0, int64_t n1) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, g = w.group, G = K / g;
  const uint8_t* W = static_cast<const uint8_t*>(w.data);
  [[maybe_unused]] float* room = scale_room(w, 1);  // (AVX-512: the tiles take their own)
  int64_t m0 = 0;
#if defined(__AVX512F__)
  // x de-interleaved per 32 columns here (16 even, then 16 odd): 16 bytes of W widen to two vectors of
  // 16 floats. One row of x (16 KB at K = 4096: it stays in the L1): four rows of W at a time, all
  // of K (four FMA chains, the loads of x shared). Four rows of x: four rows of W (16 chains, each
  // decoded W vector used four times; with two rows of W, 1.17-1.21 ms against 0.98-1.05 at M = 4, g128),
  // over K blocks of 1024 columns, so that the four rows' block of x (16 KB) stays in the L1 while the
  // thread's rows of W pass; partial sums in `part`.
  const int64_t GB = std::max<int64_t>(1, 1024 / g);
  for (; m0 + 4 <= a.M; m0 += 4) int4_rows512<4, 4>(a, m0, n0, n1, GB);
  if (m0 + 2 <= a.M) {  // two rows left: four rows of W at a time
    int4_rows512<2, 4>(a, m0, n0, n1, G);
    m0 += 2;
  }
  for (; m0 < a.M; ++m0) int4_rows512<1, 4>(a, m0, n0, n1, G);
  return;
#elif defined(__AVX2__)
  // Rows of x in groups of 4 share each decode of 16 nibbles (2 x 8 floats), then 2 FMAs per row.
  const __m256i lo4 = _mm256_set1_epi32(15);
  for (; m0 + 4 <= a.M; m0 += 4) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = W + n * (K / 2);
      const RowScales rs = row_scales(w, n, 0, G, room);
      const float* sc = rs.s;
      __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t gi = 0; gi < G; ++gi) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t k = gi * g; k < (gi + 1) * g; k += 16) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k / 2)));
          const __m256 qlo = _mm256_cvtepi32_ps(_mm256_and_si256(b, lo4));
          const __m256 qhi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
          for (int r = 0; r < 4; ++r) {
            const float* xd = a.xf + (m0 + r) * K + k;
            acc[r] = _mm256_fmadd_ps(qlo, _mm256_loadu_ps(xd), acc[r]);
            acc[r] = _mm256_fmadd_ps(qhi, _mm256_loadu_ps(xd + 8), acc[r]);
          }
        }
        const __m256 s = _mm256_set1_ps(sc[gi]);
        for (int r = 0; r < 4; ++r) total[r] = _mm256_fmadd_ps(acc[r], s, total[r]);
      }
      for (int r = 0; r < 4; ++r)
        quant_store(a, m0 + r, n, hsum_ps(total[r]) - zero_term(rs, a.gsum + (m0 + r) * G, G));
    }
  }
#endif
  for (int64_t m = m0; m < a.M; ++m) {
    const float* x = a.x + m * a.ldx;
    const float* xd = a.xf + m * K;  // de-interleaved x
    const float* gs = a.gsum + m * G;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = W + n * (K / 2);
      const RowScales rs = row_scales(w, n, 0, G, room);
      const float* sc = rs.s;
      const float zterm = zero_term(rs, gs, G);  // sum_g s_g z_g gsum_g (or o_g gsum_g)
#if defined(__AVX2__)
      const __m256i lo_mask = _mm256_set1_epi32(15);
      __m256 total = _mm256_setzero_ps();
      for (int64_t gi = 0; gi < G; ++gi) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t k = gi * g; k < (gi + 1) * g; k += 16) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k / 2)));
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, lo_mask)), _mm256_loadu_ps(xd + k), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), _mm256_loadu_ps(xd + k + 8), acc1);
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(sc[gi]), total);
      }
      quant_store(a, m, n, hsum_ps(total) - zterm);
      (void)x;
#else
      float y = 0.0f;
      for (int64_t gi = 0; gi < G; ++gi) {
        float dot = 0.0f;
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
          const int q = (k & 1) ? (wr[k / 2] >> 4) : (wr[k / 2] & 15);
          dot += static_cast<float>(q) * x[k];
        }
        y += sc[gi] * dot;
      }
      quant_store(a, m, n, y - zterm);
      (void)xd;
#endif
    }
  }
}

// ---------------------------------------------------------------- FP8: E4M3 x E4M3, fp32 products
#if defined(__AVX512F__)
// 16 E4M3 bytes to their values, exactly: for e > 0 the bits (b & 0x7f) << 20 plus a bias of 120 in
// the exponent are the float 2^(e-7) (1 + m/8); for e = 0 the same bits give 2^-7 (1 + m/8), and
// 2 f - 2^-6 = m 2^-9 is the subnormal's value (exact: no denormal floats involved, so DAZ / FTZ
// cannot bite). Sign bit 7 -> 31; 0x7f / 0xff -> NaN.
inline __m512 e4m3_decode16(__m128i bytes) {
  const __m512i b = _mm512_cvtepu8_epi32(bytes);
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  __m512 f = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
  const __mmask16 sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
  f = _mm512_mask_fmsub_ps(f, sub, _mm512_set1_ps(2.0f), _mm512_set1_ps(0.015625f));
  f = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24)));
  return _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)), f, _mm512_set1_ps(NAN));
}
#endif

void block_fp8(const QArgs& a, int64_t n0, int64_t n1) {
  const QWeight& w = *a.w;
  const int64_t K = w.K, KB = (K + 127) / 128;
  const uint8_t* W = static_cast<const uint8_t*>(w.data);
  const float* lut = e4m3().v;
#if defined(__AVX512F__)
  // per 128-column block: 8 x 16 products (exact) summed in two vectors, then scaled once
  if (K % 16 == 0) {
    for (int64_t m = 0; m < a.M; ++m) {
      const float* xf = a.xf + m * K;
      const float* sx = a.sx + m * a.ldsx;
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = W + n * K;
        __m512 y = _mm512_setzero_ps();
        for (int64_t b = 0; b < KB; ++b) {
          const int64_t k1 = std::min(K, b * 128 + 128);
          __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
          int64_t k = b * 128;
          _mm_prefetch(reinterpret_cast<const char*>(wr + k) + 4096, _MM_HINT_T1);  // W once from memory
          _mm_prefetch(reinterpret_cast<const char*>(wr + k) + 4096 + 64, _MM_HINT_T1);
          for (; k + 32 <= k1; k += 32) {
            p0 = _mm512_fmadd_ps(_mm512_loadu_ps(xf + k), e4m3_decode16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))), p0);
            p1 = _mm512_fmadd_ps(_mm512_loadu_ps(xf + k + 16),
                                 e4m3_decode16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k + 16))), p1);
          }
          if (k < k1)
            p0 = _mm512_fmadd_ps(_mm512_loadu_ps(xf + k), e4m3_decode16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))), p0);
          const float sw = w.group == 0 ? w.scale[0] : w.scale[(n / 128) * KB + b];
          y = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), _mm512_set1_ps(sx[b] * sw), y);
        }
        quant_store(a, m, n, _mm512_reduce_add_ps(y));
      }
    }
    return;
  }
#endif
  for (int64_t m = 0; m < a.M; ++m) {
    const float* xf = a.xf + m * K;
    const float* sx = a.sx + m * a.ldsx;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = W + n * K;
      float y = 0.0f;
      for (int64_t b = 0; b < KB; ++b) {
        const int64_t k1 = b * 128 + 128 < K ? b * 128 + 128 : K;
        float part = 0.0f;  // e4m3 x e4m3 products are exact in fp32
        for (int64_t k = b * 128; k < k1; ++k) part += xf[k] * lut[wr[k]];
        const float sw = w.group == 0 ? w.scale[0] : w.scale[(n / 128) * KB + b];
        y += sx[b] * sw * part;
      }
      quant_store(a, m, n, y);
    }
  }
}

// ---------------------------------------------------------------- dequantized panels (prefill)
// out[n - n0, k] = the weight's value in fp32 for rows [n0, n1): Int8Weight q sw[n] (grouped: (q - z) s per
// group); Int4 (q - z) s per group; FP8 e4m3(q) sw(n, b) (the block scale folded in). The int8 and int4 runs
// are vectorized by hand (the int4 one interleaves the nibbles back to column order), FP8 a plain loop.
// o[0 .. cnt) = (q - z) s - off for int8 codes q (z = 0: none; off: a two-level offset, else 0), vectors then a
// scalar tail: the same three roundings throughout (the last exact when off = 0), so the values are the ones
// quant_elem gives.
inline void dequant_int8_run(const int8_t* q, int64_t cnt, float s, float z, float off, float* o) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), vo = _mm512_set1_ps(off);
  for (; k + 16 <= cnt; k += 16) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
    _mm512_storeu_ps(o + k, _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(v, vz), vs), vo));
  }
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vo = _mm256_set1_ps(off);
  for (; k + 8 <= cnt; k += 8) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k))));
    _mm256_storeu_ps(o + k, _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(v, vz), vs), vo));
  }
#endif
  for (; k < cnt; ++k) o[k] = (static_cast<float>(q[k]) - z) * s - off;
}

// o[0 .. 2 nb) = (nibble - z) s - off for the nb bytes at q (byte j: k = 2j low nibble, 2j + 1 high), as the
// scalar loop rounds them.
inline void dequant_int4_run(const uint8_t* q, int64_t nb, float s, float z, float off, float* o) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), vo = _mm512_set1_ps(off);
  const __m512i lo4 = _mm512_set1_epi32(15);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (; j + 16 <= nb; j += 16) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
    const __m512 lo =
        _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, lo4)), vz), vs), vo);
    const __m512 hi =
        _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), vz), vs), vo);
    _mm512_storeu_ps(o + 2 * j, _mm512_permutex2var_ps(lo, first, hi));  // lo0 hi0 lo1 hi1 ...
    _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
#endif
#if defined(__AVX2__)  // (AVX-512 too: a group of 16, 8 bytes)
  const __m256 vs8 = _mm256_set1_ps(s), vz8 = _mm256_set1_ps(z), vo8 = _mm256_set1_ps(off);
  const __m256i low8 = _mm256_set1_epi32(15);
  for (; j + 8 <= nb; j += 8) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
    const __m256 lo =
        _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low8)), vz8), vs8), vo8);
    const __m256 hi =
        _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), vz8), vs8), vo8);
    const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi);  // (lo0 hi0 lo1 hi1 | lo4 ..)
    _mm256_storeu_ps(o + 2 * j, _mm256_permute2f128_ps(a, c, 0x20));
    _mm256_storeu_ps(o + 2 * j + 8, _mm256_permute2f128_ps(a, c, 0x31));
  }
#endif
  for (; j < nb; ++j) {
    o[2 * j] = (static_cast<float>(q[j] & 15) - z) * s - off;
    o[2 * j + 1] = (static_cast<float>(q[j] >> 4) - z) * s - off;
  }
}

void dequant_rows(const QWeight& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K;
  float* room = scale_room(w, 1);
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * K;
    if ((w.format == QFormat::Int8Weight || w.format == QFormat::Int8) && w.group == 0) {
      dequant_int8_run(static_cast<const int8_t*>(w.data) + n * K, K, w.scale[n], 0.0f, 0.0f, o);
    } else if (w.format == QFormat::Int8Weight || w.format == QFormat::Int4) {
      // grouped scales (and zero points: (q - z) s; two-level offsets: q s - o)
      const int64_t G = K / w.group;
      const RowScales rs = row_scales(w, n, 0, G, room);
      for (int64_t g = 0; g < G; ++g) {
        const float z = rs.z ? rs.z[g] : rs.zc, off = rs.o ? rs.o[g] : 0.0f;
        if (w.format == QFormat::Int8Weight)
          dequant_int8_run(static_cast<const int8_t*>(w.data) + n * K + g * w.group, w.group, rs.s[g], z, off,
                           o + g * w.group);
        else
          dequant_int4_run(static_cast<const uint8_t*>(w.data) + n * (K / 2) + g * w.group / 2, w.group / 2, rs.s[g],
                           z, off, o + g * w.group);
      }
    } else {
      const uint8_t* q = static_cast<const uint8_t*>(w.data) + n * K;
      const float* lut = e4m3().v;
      const int64_t KB = (K + 127) / 128;
      for (int64_t b = 0; b < KB; ++b) {
        const float s = w.group == 0 ? w.scale[0] : w.scale[(n / 128) * KB + b];
        const int64_t k1 = std::min<int64_t>(K, b * 128 + 128);
        for (int64_t k = b * 128; k < k1; ++k) o[k] = lut[q[k]] * s;
      }
    }
  }
}

// ---------------------------------------------------------------- FP8 activations, per token and block
// E4M3 round-to-nearest-even of v, saturating at +-448, NaN kept: in the normal range (|v| >= 2^-6)
// the float's mantissa is rounded to 3 bits in the integer domain (add 0x7ffff plus the kept lsb,
// clear the low 20 bits); below it the step is 2^-9 (subnormals). Branch-free: it vectorizes.
inline float e4m3_round(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t sign = u & 0x80000000u, au = u & 0x7fffffffu;
  float a;
  std::memcpy(&a, &au, 4);
  uint32_t r = (au + 0x7ffffu + ((au >> 20) & 1u)) & 0xfff00000u;
  float rn;
  std::memcpy(&rn, &r, 4);
  const float rs = std::nearbyint(a * 512.0f) * (1.0f / 512.0f);
  float out = a < 0.015625f ? rs : rn;
  out = out > 448.0f ? 448.0f : out;  // (NaN compares false: stays NaN)
  uint32_t o;
  std::memcpy(&o, &out, 4);
  o |= sign;
  std::memcpy(&out, &o, 4);
  return out;
}

// rows [m0, m1): s[m, b] = max_{k in b} |x[m, k]| / 448 over 128-column blocks, xf = e4m3(x / s)
// (times s when fold: the panel path's x' = e4m3(x / s) s), 0 where s = 0.
void quantize_fp8_rows(const float* x, int64_t ldx, int64_t K, float* xf, float* sx, int64_t m0, int64_t m1,
                       bool fold) {
  const int64_t KB = (K + 127) / 128;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t b = 0; b < KB; ++b) {
      const float* r = x + m * ldx;
      const int64_t k0 = b * 128, k1 = std::min(K, k0 + 128);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(r[k]));
      const float s = amax / 448.0f;
      if (sx) sx[m * KB + b] = s;
      float* o = xf + m * K;
      if (!(s > 0.0f)) {
        for (int64_t k = k0; k < k1; ++k) o[k] = 0.0f;
      } else if (fold) {
        for (int64_t k = k0; k < k1; ++k) o[k] = e4m3_round(r[k] / s) * s;
      } else {
        for (int64_t k = k0; k < k1; ++k) o[k] = e4m3_round(r[k] / s);
      }
    }
}

// Rows [n0, n1) of W dequantized and rounded to bf16 (nearest even), [n1 - n0, K]: each row through a
// K-float row buffer that stays in the L1. The AVX512-BF16 build rounds with the instruction the AMX
// kernel uses on fp32 weights (vcvtneps2bf16, which also flushes subnormals), so a bf16 panel gives
// the products an fp32 panel would.
void dequant_rows_bf16(const QWeight& w, int64_t n0, int64_t n1, uint16_t* out) {
  thread_local Vec<float> row;
  row.resize(static_cast<size_t>(w.K));
  for (int64_t n = n0; n < n1; ++n) {
    dequant_rows(w, n, n + 1, row.data());
    uint16_t* o = out + (n - n0) * w.K;
    int64_t k = 0;
#if defined(__AVX512BF16__)
    for (; k + 16 <= w.K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(row.data() + k))));
    if (k < w.K) {
      const __mmask16 m = static_cast<__mmask16>((1u << (w.K - k)) - 1);
      _mm256_mask_storeu_epi16(o + k, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row.data() + k))));
      k = w.K;
    }
#endif
    for (; k < w.K; ++k) o[k] = f32_to_bf16(row[k]);
  }
}

// ---------------------------------------------------------------- W8A8 activations, per token
// rows [m0, m1): s = max_k |x[m, k]| / 127, xq = round-to-nearest-even(x / s) clamped to [-127, 127],
// zero past K up to Kp. Plain loops: vectorized for each ISA build (vroundps, no libm calls).
void quantize_int8_rows(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* xq, float* sx, int64_t m0,
                        int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* r = x + m * ldx;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(r[k]));
    const float s = amax / 127.0f;
    sx[m] = s;
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    int8_t* q = xq + m * Kp;
    for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(r[k] * inv))));
    for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  }
}

}  // namespace

const QuantTable* quant_table() {
#if defined(__AVX512F__)
  constexpr int kInt4Deinterleave = 32, kInt4GemvRows = 15;
#elif defined(__AVX2__)
  constexpr int kInt4Deinterleave = 16, kInt4GemvRows = 12;
#else
  constexpr int kInt4Deinterleave = 16, kInt4GemvRows = static_cast<int>(kQuantPanelMinRows);
#endif
  static const QuantTable t{{&block_int8, &block_int8w, &block_int4, &block_fp8}, &dequant_rows, &dequant_rows_bf16,
                            &quantize_int8_rows, kInt4Deinterleave, kInt4GemvRows, &quantize_fp8_rows};
  return &t;
}

}  // namespace NE_ISA_NS
}  // namespace ne

#if defined(NE_ISA_GENERIC)
// ==================================================================================== entry points
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "normengine/errors.h"

namespace ne {
namespace {

// gs[m, g] = the sum of row m of x over group g of w's columns (the zero points' term of int4 / int8-weight)
void group_sums(const float* x, int64_t ldx, int64_t M, const QWeight& w, std::vector<float>& gs) {
  const int64_t G = w.K / w.group;
  gs.resize(static_cast<size_t>(M * G));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) s += x[m * ldx + k];
      gs[m * G + g] = s;
    }
}

// Prefill of the weight-dequantizing formats: W dequantized to fp32 a panel of rows at a time
// (about 4 MB, never W-sized) and multiplied by the engine's register-blocked
// fp32 GEMM. FP8 first rounds x to E4M3 per 128-block exactly as the GEMV path does and folds the
// activation scale in (x' = e4m3(x / s) s), so y = sum_k x'[m, k] w'[n, k] is the same sum.
void quant_gemm_panels(int64_t M, const float* x, int64_t ldx, const QWeight& w, const float* bias, float* y,
                       int64_t ldy, bool accumulate, const GemmEpilogue* ep, bool bf16_products) {
  const int64_t N = w.N, K = w.K;
  thread_local std::vector<float> panel, xs;
  const float* xu = x;
  int64_t ldxu = ldx;
  if (w.format == QFormat::FP8) {
    xs.resize(static_cast<size_t>(M * K));
    float* xsd = xs.data();  // (thread_local: the workers must not name xs itself)
    const QuantTable& t = *NE_PICK_ISA(quant_table);
    parallel_for(M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1, int) {
      t.quantize_fp8(x, ldx, K, xsd, nullptr, m0, m1, true);
    });
    xu = xs.data();
    ldxu = K;
  }
  // rows per panel: about 4 MB of fp32, a multiple of 16 (1 MB panels: each GEMM call had too few
  // columns to keep both threads busy; int4 at M = 128, K = N = 4096: 22.2 ms, with 4 MB 16.4 ms).
  // When the GEMM will take its AMX-BF16 path ("medium", enough rows) the panel holds bf16 (half the
  // bytes, read by the tiles in place) instead of fp32 that the kernel would convert again.
  const bool bf16_panel = bf16_products && M >= kAmxMinRows && bf16_products_available();
  const int64_t P = std::min(N, std::max<int64_t>(16, (1048576 / K) / 16 * 16));
  panel.resize(static_cast<size_t>(bf16_panel ? (P * K + 1) / 2 : P * K));
  const QuantTable& t = *NE_PICK_ISA(quant_table);
  for (int64_t n0 = 0; n0 < N; n0 += P) {
    const int64_t n1 = std::min(N, n0 + P);
    float* pd = panel.data();
    uint16_t* ph = reinterpret_cast<uint16_t*>(pd);
    parallel_for(n1 - n0, 4, [&](int64_t r0, int64_t r1, int) {
      if (bf16_panel)
        t.dequant_bf16(w, n0 + r0, n0 + r1, ph + r0 * K);
      else
        t.dequant(w, n0 + r0, n0 + r1, pd + r0 * K);
    });
    GemmEpilogue e = ep ? *ep : GemmEpilogue{};
    if (e.col_sum) e.col_sum += n0;
    gemm_f32(M, n1 - n0, K, xu, ldxu, bf16_panel ? static_cast<const void*>(ph) : pd,
             bf16_panel ? DType::BF16 : DType::F32, K, bias ? bias + n0 : nullptr, y + n0, ldy, accumulate, &e,
             bf16_products);
  }
}

}  // namespace

void check_qweight(const QWeight& w) {
  if (w.N < 1 || w.K < 1 || !w.data || !w.scale) throw ValueError("qweight: empty or missing data / scale");
  switch (w.format) {
    case QFormat::Int8:
      if (w.group != 0) throw ValueError("qweight: int8 (W8A8) takes no group size");
      if (w.zero) throw ValueError("qweight.zero: only int4 and grouped int8-weight take zero points");
      break;
    case QFormat::Int8Weight:
      if (w.group != 0 && w.group != 16 && w.group != 32 && w.group != 64 && w.group != 128)
        throw ValueError("qweight: int8-weight group size must be 0 (per row), 16, 32, 64 or 128, got " +
                         std::to_string(w.group));
      if (w.group && w.K % w.group)
        throw ShapeError("qweight: in_features " + std::to_string(w.K) + " is not a multiple of the group size " +
                         std::to_string(w.group));
      if (w.zero && !w.group) throw ValueError("qweight.zero: only int4 and grouped int8-weight take zero points");
      break;
    case QFormat::Int4:
      if (w.group != 32 && w.group != 64 && w.group != 128 && !(w.group == 16 && w.sub))
        throw ValueError("qweight: int4 group size must be 32, 64 or 128 (16 with two-level scales), got " +
                         std::to_string(w.group));
      if (w.K % 32) throw ShapeError("qweight: int4 in_features must be a multiple of 32, got " + std::to_string(w.K));
      if (w.K % w.group)
        throw ShapeError("qweight: in_features " + std::to_string(w.K) + " is not a multiple of the group size " +
                         std::to_string(w.group));
      break;
    case QFormat::FP8:
      if (w.group != 0 && w.group != 128) throw ValueError("qweight: fp8 scales are per tensor (0) or 128 blocks");
      if (w.zero) throw ValueError("qweight.zero: only int4 and grouped int8-weight take zero points");
      break;
    default:
      throw ValueError("qweight: unknown format");
  }
  if (w.sub || w.sub_zero) {  // two-level scales
    if (!w.sub) throw ValueError("qweight.sub_zero: two-level offsets need the sub-scales (sub) too");
    if (!(w.format == QFormat::Int4 || (w.format == QFormat::Int8Weight && w.group > 0)))
      throw ValueError("qweight.sub: two-level scales are for int4 and grouped int8-weight");
    if (w.super < 1 || (w.K / w.group) % w.super)
      throw ShapeError("qweight.super: " + std::to_string(w.super) + " groups a super-block do not divide the " +
                       std::to_string(w.K / w.group) + " groups of a row");
    if (!w.sub_zero != !w.zero)
      throw ValueError("qweight: two-level offsets need both sub_zero and zero (the super-blocks' offsets)");
  }
}

std::map<std::string, int64_t> int8_decode_rows() {
  std::map<std::string, int64_t> out;
  const int64_t gemv = NE_PICK_ISA(quant_table)->max_gemv_rows;  // more rows: the panels, never the decode kernels
  for (const std::string& f : int8_decode_formats())
    out[f] = f == "int4" ? gemv : std::min(kInt8WeightDecodeRows, gemv);
  return out;
}

void quant_gemm_f32(int64_t M, const float* x, int64_t ldx, const QWeight& w, const float* bias, float* y, int64_t ldy,
                    bool accumulate, const GemmEpilogue* ep, bool bf16_products) {
  check_qweight(w);
  if (M <= 0) return;
  const int64_t K = w.K;
  const int64_t gemv_rows = w.format == QFormat::Int4 || w.format == QFormat::Int8Weight
                                ? NE_PICK_ISA(quant_table)->max_gemv_rows : kQuantPanelMinRows;
  if (w.format != QFormat::Int8 && M > gemv_rows) {
    quant_gemm_panels(M, x, ldx, w, bias, y, ldy, accumulate, ep, bf16_products);
    return;
  }
  QArgs a{};
  a.M = M;
  a.x = x;
  a.ldx = ldx;
  a.w = &w;
  a.bias = bias;
  a.y = y;
  a.ldy = ldy;
  a.accumulate = accumulate;
  if (ep) a.ep = *ep;
  if (a.ep.row_shift && !a.ep.col_sum) throw ValueError("quant_gemm_f32: the epilogue's row_shift needs col_sum");
  // prepared activations: per calling thread, grown and reused
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xf, sx, gs;
  if (w.format == QFormat::Int8) {
    // per row: s = max|x| / 127, q = round-to-nearest-even(x / s) in [-127, 127] (the ISA's kernel)
    const int64_t Kp = (K + 63) / 64 * 64;
    xq.resize(static_cast<size_t>(M * Kp));
    sx.resize(M);
    int8_t* q = xq.data();  // (thread_local: the workers must not name xq / sx themselves)
    float* s = sx.data();
    const QuantTable& t = *NE_PICK_ISA(quant_table);
    parallel_for(M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1, int) {
      t.quantize_int8(x, ldx, K, Kp, q, s, m0, m1);
    });
    a.xq = xq.data();
    a.ldxq = Kp;
    a.sx = sx.data();
    a.ldsx = 1;
  } else if (w.format == QFormat::FP8) {
    // per row and 128-channel block: s = max|x| / 448, x_q = e4m3(x / s) (the ISA's kernel)
    const int64_t KB = (K + 127) / 128;
    xf.resize(static_cast<size_t>(M * K));
    sx.resize(static_cast<size_t>(M * KB));
    float* pf = xf.data();  // (thread_local: the workers must not name xf / sx themselves)
    float* ps = sx.data();
    const QuantTable& t = *NE_PICK_ISA(quant_table);
    parallel_for(M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1, int) {
      t.quantize_fp8(x, ldx, K, pf, ps, m0, m1, false);
    });
    a.xf = xf.data();
    a.sx = sx.data();
    a.ldsx = KB;
  } else if (w.format == QFormat::Int4) {
    // per row: the sums of x over each group (zero points), and x de-interleaved per 16 or 32 columns (the ISA table says)
    group_sums(x, ldx, M, w, gs);
    a.gsum = gs.data();
    // matmul precision "medium": x rounded to int8 per 32 columns and integer products (AVX-512 VNNI or AVX2)
    if (bf16_products && int8_activations_decode_x86(a, x, ldx)) return;
    xf.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) {
      const float* r = x + m * ldx;
      const int D = NE_PICK_ISA(quant_table)->int4_deinterleave, H = D / 2;
      for (int64_t k0 = 0; k0 < K; k0 += D)
        for (int j = 0; j < H; ++j) {
          xf[m * K + k0 + j] = r[k0 + 2 * j];
          xf[m * K + k0 + H + j] = r[k0 + 2 * j + 1];
        }
    }
    a.gsum = gs.data();
    a.xf = xf.data();
  } else if (w.format == QFormat::Int8Weight) {
    if (w.zero) {  // the sums of x over each group (zero points)
      group_sums(x, ldx, M, w, gs);
      a.gsum = gs.data();
    }
    // matmul precision "medium": x rounded to int8 per 32 columns and integer products, where the CPU has VNNI
    if (bf16_products && int8_activations_decode_x86(a, x, ldx)) return;
  }
  // W8A8 with VNNI / AMX where the CPU has them (quant_int8_x86.cpp), else the ISA family's kernel
  if (w.format == QFormat::Int8 && int8_gemm_x86(a)) return;
  const QuantTable& t = *NE_PICK_ISA(quant_table);
  auto* fn = t.block[static_cast<int>(w.format)];
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * M));
  parallel_for(w.N, grain, [&](int64_t n0, int64_t n1, int) { fn(a, n0, n1); });
}

}  // namespace ne
#endif  // NE_ISA_GENERIC
