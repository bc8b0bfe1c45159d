// L-Mul kernels (see ops/lmul.h for the definition and special values), compiled once per ISA.
//
// Every product is integer arithmetic on fp32 bit patterns. Operands are prepared once:
//   t(x) = (x is NaN ? 0x7fc00000 : bits(x)) & trunc          (canonical NaN, mantissa truncated)
// Checked product (any operands; 13 integer ops and 4 blends per vector):
//   A = t(x) & 0x7fffffff,  B = t(y) & 0x7fffffff,  s = (t(x) ^ t(y)) & 0x80000000
//   u = A + B (< 2^32, unsigned),  r = u - C
//   r -> 0 if u < C + 2^23 (exponent underflow),  -> Inf if r >= 0x7f800000 (overflow)
//   -> 0 if an operand is zero/subnormal, -> Inf if one is Inf, -> NaN if NaN, or Inf with zero;  | s
// Fast product, valid on a tile whose operands are all normal (x may also hold zeros / subnormals,
// whose products are skipped) and whose exponent ranges keep every
// product normal (e_x,min + e_w,min >= 128 and e_x,max + e_w,max <= 378, biased):
//   r = (t(x) - C) + t(w)       (one 32-bit add; the sign bits add mod 2 = XOR, the carry drops out)
// x is stored prepared as t(x) - C, so the fast inner loop is one integer add and one float add per
// product. GEMM: W panels of 2 vectors of columns, K blocks of kKc packed as [k][column] (t(w) bits),
// register tiles of 4 rows x 2 vectors, x broadcast; accumulation strictly in k order per output.
// Traffic: W read once per call (packed panel by panel; W stored [K, N] is packed for all of a thread's
// panels at once, each row read contiguously: gemm_kn, and gemv_kn at M = 1), x (prepared, M*K*4 bytes)
// re-read once per panel from cache; y written once.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "core/aligned.h"
#include "ops/lmul.h"
#include "ops/lmul_bits.h"

#if defined(NE_ISA_AVX512) || defined(NE_ISA_AVX2)
#include <immintrin.h>
#endif

namespace ne {
namespace NE_ISA_NS {
namespace {

using lmul_bits::kAbs, lmul_bits::kSign, lmul_bits::kInf, lmul_bits::kQNaN, lmul_bits::kMin;
using lmul_bits::prep1, lmul_bits::checked1;  // the scalar definition (ops/lmul_bits.h, shared with CUDA)

#if defined(NE_ISA_AVX512)
struct VI {
  using R = __m512i;
  using F = __m512;
  static constexpr int L = 16;
  static R load(const void* p) { return _mm512_loadu_si512(p); }
  static void store(void* p, R v) { _mm512_storeu_si512(p, v); }
  static R set1(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  static R add(R a, R b) { return _mm512_add_epi32(a, b); }
  static R sub(R a, R b) { return _mm512_sub_epi32(a, b); }
  static R and_(R a, R b) { return _mm512_and_si512(a, b); }
  static R or_(R a, R b) { return _mm512_or_si512(a, b); }
  static R xor_(R a, R b) { return _mm512_xor_si512(a, b); }
  static R eq(R a, R b) { return _mm512_movm_epi32(_mm512_cmpeq_epi32_mask(a, b)); }
  static R gt_s(R a, R b) { return _mm512_movm_epi32(_mm512_cmpgt_epi32_mask(a, b)); }
  static R lt_u(R a, R b) { return _mm512_movm_epi32(_mm512_cmplt_epu32_mask(a, b)); }
  static R blend(R m, R a, R b) { return _mm512_mask_blend_epi32(_mm512_movepi32_mask(m), a, b); }  // m ? b : a
  static R andnot(R m, R a) { return _mm512_andnot_si512(m, a); }                     // a & ~m
  static F fzero() { return _mm512_setzero_ps(); }
  static F fload(const float* p) { return _mm512_loadu_ps(p); }
  static void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fadd_bits(F acc, R bits) { return _mm512_add_ps(acc, _mm512_castsi512_ps(bits)); }
  static R expo(R t) { return _mm512_and_si512(_mm512_srli_epi32(t, 23), _mm512_set1_epi32(0xff)); }
  static R min_u(R a, R b) { return _mm512_min_epu32(a, b); }
  static R max_u(R a, R b) { return _mm512_max_epu32(a, b); }
  static R unpacklo32(R a, R b) { return _mm512_unpacklo_epi32(a, b); }
  static R unpackhi32(R a, R b) { return _mm512_unpackhi_epi32(a, b); }
  static R unpacklo64(R a, R b) { return _mm512_unpacklo_epi64(a, b); }
  static R unpackhi64(R a, R b) { return _mm512_unpackhi_epi64(a, b); }
  // the last step of transpose(): u[4G + e] holds, in its 128-bit lane b, column 4b + e of rows
  // 4G .. 4G + 3; a 4 x 4 transpose of 128-bit lanes gathers column 4b + e into r[4b + e]
  static void cross_lanes(const R* u, R* r) {
    for (int e = 0; e < 4; ++e) {
      const R s0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), s1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xee);
      const R s2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44), s3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xee);
      r[e] = _mm512_shuffle_i32x4(s0, s2, 0x88);
      r[4 + e] = _mm512_shuffle_i32x4(s0, s2, 0xdd);
      r[8 + e] = _mm512_shuffle_i32x4(s1, s3, 0x88);
      r[12 + e] = _mm512_shuffle_i32x4(s1, s3, 0xdd);
    }
  }
};
#elif defined(NE_ISA_AVX2)
struct VI {
  using R = __m256i;
  using F = __m256;
  static constexpr int L = 8;
  static R load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void store(void* p, R v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static R set1(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  static R add(R a, R b) { return _mm256_add_epi32(a, b); }
  static R sub(R a, R b) { return _mm256_sub_epi32(a, b); }
  static R and_(R a, R b) { return _mm256_and_si256(a, b); }
  static R or_(R a, R b) { return _mm256_or_si256(a, b); }
  static R xor_(R a, R b) { return _mm256_xor_si256(a, b); }
  static R eq(R a, R b) { return _mm256_cmpeq_epi32(a, b); }
  static R gt_s(R a, R b) { return _mm256_cmpgt_epi32(a, b); }
  static R lt_u(R a, R b) {  // unsigned a < b: flip the sign bits, compare signed
    const R s = set1(kSign);
    return _mm256_cmpgt_epi32(_mm256_xor_si256(b, s), _mm256_xor_si256(a, s));
  }
  static R blend(R m, R a, R b) { return _mm256_blendv_epi8(a, b, m); }
  static R andnot(R m, R a) { return _mm256_andnot_si256(m, a); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F fload(const float* p) { return _mm256_loadu_ps(p); }
  static void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fadd_bits(F acc, R bits) { return _mm256_add_ps(acc, _mm256_castsi256_ps(bits)); }
  static R expo(R t) { return _mm256_and_si256(_mm256_srli_epi32(t, 23), _mm256_set1_epi32(0xff)); }
  static R min_u(R a, R b) { return _mm256_min_epu32(a, b); }
  static R max_u(R a, R b) { return _mm256_max_epu32(a, b); }
  static R unpacklo32(R a, R b) { return _mm256_unpacklo_epi32(a, b); }
  static R unpackhi32(R a, R b) { return _mm256_unpackhi_epi32(a, b); }
  static R unpacklo64(R a, R b) { return _mm256_unpacklo_epi64(a, b); }
  static R unpackhi64(R a, R b) { return _mm256_unpackhi_epi64(a, b); }
  // the last step of transpose(): u[4G + e] holds, in its 128-bit half b, column 4b + e of rows
  // 4G .. 4G + 3; the halves of u[e] and u[4 + e] make columns e and 4 + e
  static void cross_lanes(const R* u, R* r) {
    for (int e = 0; e < 4; ++e) {
      r[e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x20);
      r[4 + e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x31);
    }
  }
};
#else
struct VI {  // portable: 8 lanes of plain integers (the compiler may vectorize the loops)
  struct R { uint32_t v[8]; };
  struct F { float v[8]; };
  static constexpr int L = 8;
#define NE_LANES(expr) R r; for (int i = 0; i < 8; ++i) r.v[i] = (expr); return r
  static R load(const void* p) { R r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static void store(void* p, R v) { std::memcpy(p, v.v, sizeof v.v); }
  static R set1(uint32_t a) { NE_LANES(a); }
  static R add(R a, R b) { NE_LANES(a.v[i] + b.v[i]); }
  static R sub(R a, R b) { NE_LANES(a.v[i] - b.v[i]); }
  static R and_(R a, R b) { NE_LANES(a.v[i] & b.v[i]); }
  static R or_(R a, R b) { NE_LANES(a.v[i] | b.v[i]); }
  static R xor_(R a, R b) { NE_LANES(a.v[i] ^ b.v[i]); }
  static R eq(R a, R b) { NE_LANES(a.v[i] == b.v[i] ? ~0u : 0u); }
  static R gt_s(R a, R b) { NE_LANES(static_cast<int32_t>(a.v[i]) > static_cast<int32_t>(b.v[i]) ? ~0u : 0u); }
  static R lt_u(R a, R b) { NE_LANES(a.v[i] < b.v[i] ? ~0u : 0u); }
  static R blend(R m, R a, R b) { NE_LANES((a.v[i] & ~m.v[i]) | (b.v[i] & m.v[i])); }
  static R andnot(R m, R a) { NE_LANES(a.v[i] & ~m.v[i]); }
#undef NE_LANES
  static F fzero() { F f{}; return f; }
  static F fload(const float* p) { F f; std::memcpy(f.v, p, sizeof f.v); return f; }
  static void fstore(float* p, F v) { std::memcpy(p, v.v, sizeof v.v); }
  static F fadd_bits(F acc, R bits) {
    for (int i = 0; i < 8; ++i) { float b; std::memcpy(&b, &bits.v[i], 4); acc.v[i] += b; }
    return acc;
  }
  static R expo(R t) { R r; for (int i = 0; i < 8; ++i) r.v[i] = (t.v[i] >> 23) & 0xff; return r; }
  static R min_u(R a, R b) { R r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i]; return r; }
  static R max_u(R a, R b) { R r; for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return r; }
};
#endif
using R = VI::R;
using F = VI::F;
constexpr int L = VI::L;
constexpr int NP = 2 * L;     // panel width (columns)
constexpr int MR = 4;         // register tile rows
constexpr int64_t kKc = 256;  // K block
// W rows read L at a time, each a stream of its own: prefetched this many floats ahead (the hardware
// prefetchers follow few such strided streams)
constexpr int64_t kPrefetch = 64;

// r[c] (lane i) = r[i] (lane c): the L x L words transposed. SIMD: 32-bit then 64-bit unpacks within
// 128-bit lanes leave u[4G + e] holding, in lane b, column 4b + e of rows 4G .. 4G + 3; cross_lanes
// moves the lanes into place.
inline void transpose(R* r) {
#if defined(NE_ISA_AVX512) || defined(NE_ISA_AVX2)
  R t[L], u[L];
  for (int i = 0; i < L; i += 2) {
    t[i] = VI::unpacklo32(r[i], r[i + 1]);
    t[i + 1] = VI::unpackhi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < L; i += 4) {
    u[i] = VI::unpacklo64(t[i], t[i + 2]);
    u[i + 1] = VI::unpackhi64(t[i], t[i + 2]);
    u[i + 2] = VI::unpacklo64(t[i + 1], t[i + 3]);
    u[i + 3] = VI::unpackhi64(t[i + 1], t[i + 3]);
  }
  VI::cross_lanes(u, r);
#else
  for (int i = 0; i < L; ++i)
    for (int j = i + 1; j < L; ++j) std::swap(r[i].v[j], r[j].v[i]);
#endif
}

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// The words at p, p + ld, ..., p + (L - 1) ld (one k-value of L rows) as one vector.
inline R column(const float* p, int64_t ld) {
  alignas(64) uint32_t col[L];
  for (int i = 0; i < L; ++i) col[i] = bits_of(p[i * ld]);
  return VI::load(col);
}

// x stored as t(x) - C: zero or subnormal (exponent bits 0); the fast products skip such entries.
inline bool zero_or_subnormal(uint32_t xk, uint32_t C) { return ((xk + C) & kInf) == 0; }

// t(x): canonical NaN, truncated mantissa
inline R prepv(R x, R trunc) {
  R nan = VI::gt_s(VI::and_(x, VI::set1(kAbs)), VI::set1(kInf));
  return VI::and_(VI::blend(nan, x, VI::set1(kQNaN)), trunc);
}

// checked product of prepared operands, lane by lane as lmul_bits::checked1 (the scalar definition)
inline R checkedv(R a, R b, R C) {
  const R abs = VI::set1(kAbs), inf = VI::set1(kInf), mn = VI::set1(kMin);
  const R A = VI::and_(a, abs), B = VI::and_(b, abs);
  const R s = VI::and_(VI::xor_(a, b), VI::set1(kSign));
  const R u = VI::add(A, B), r = VI::sub(u, C);
  R res = VI::blend(VI::lt_u(VI::set1(kInf - 1), r), r, inf);       // overflow -> Inf
  res = VI::andnot(VI::lt_u(u, VI::add(C, mn)), res);               // underflow -> 0
  const R zop = VI::or_(VI::gt_s(mn, A), VI::gt_s(mn, B));          // zero / subnormal operand
  const R iop = VI::or_(VI::eq(A, inf), VI::eq(B, inf));            // Inf operand
  res = VI::andnot(zop, res);
  res = VI::blend(iop, res, inf);
  res = VI::or_(res, s);
  const R nan = VI::or_(VI::or_(VI::gt_s(A, inf), VI::gt_s(B, inf)), VI::and_(iop, zop));
  return VI::blend(nan, res, VI::set1(kQNaN));
}

// ------------------------------------------------------------------------------------ GEMM
// acc[r][h] (+)= sum_k product(x[r, k], w[k, h*L .. h*L+L)) over one K block, k in order.
// MODE 0: checked products; 1: fast products; 2: fast products, skipping x entries that are zero or
// subnormal (their products are signed zeros, and adding a signed zero to an accumulator that started
// at +0 never changes its bits: a float sum is -0 only if both addends are -0).
template <int RR, int MODE>
void tile(const uint32_t* xp, int64_t K, const uint32_t* pack, int64_t kc, float* t, bool first, uint32_t C) {
  F acc[RR][2];
  for (int r = 0; r < RR; ++r)
    for (int h = 0; h < 2; ++h) acc[r][h] = first ? VI::fzero() : VI::fload(t + r * NP + h * L);
  const R Cv = VI::set1(C);
  for (int64_t k = 0; k < kc; ++k) {
    const R w0 = VI::load(pack + k * NP), w1 = VI::load(pack + k * NP + L);
    for (int r = 0; r < RR; ++r) {
      if (MODE == 2 && zero_or_subnormal(xp[r * K + k], C)) continue;
      if (MODE > 0) {
        const R xb = VI::set1(xp[r * K + k]);  // t(x) - C
        acc[r][0] = VI::fadd_bits(acc[r][0], VI::add(xb, w0));
        acc[r][1] = VI::fadd_bits(acc[r][1], VI::add(xb, w1));
      } else {
        const R xb = VI::set1(xp[r * K + k] + C);  // t(x)
        acc[r][0] = VI::fadd_bits(acc[r][0], checkedv(xb, w0, Cv));
        acc[r][1] = VI::fadd_bits(acc[r][1], checkedv(xb, w1, Cv));
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int h = 0; h < 2; ++h) VI::fstore(t + r * NP + h * L, acc[r][h]);
}

using TileFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, bool, uint32_t);
constexpr TileFn kTiles[3][MR] = {{tile<1, 0>, tile<2, 0>, tile<3, 0>, tile<4, 0>},
                                  {tile<1, 1>, tile<2, 1>, tile<3, 1>, tile<4, 1>},
                                  {tile<1, 2>, tile<2, 2>, tile<3, 2>, tile<4, 2>}};

// The smallest lane of vmin and the largest of vmax (exponent ranges tracked lane by lane).
inline void lane_range(R vmin, R vmax, int32_t& lo, int32_t& hi) {
  alignas(64) uint32_t a[L], b[L];
  VI::store(a, vmin);
  VI::store(b, vmax);
  lo = static_cast<int32_t>(*std::min_element(a, a + L));
  hi = static_cast<int32_t>(*std::max_element(b, b + L));
}

// fn(k, bits) for k = 0 .. kc - 1 in order, bits: the L words w[p0 + h L + lane, kb + k] (one k of half h
// of a full panel). W [N, K] is read L rows x L k-values at a time and transposed in registers (the last
// kc % L k-values gathered); W [K, N] (LmulArgs::w_kn) holds them as one vector already.
template <class Fn>
inline void panel_columns(const LmulArgs& a, int64_t p0, int h, int64_t kb, int64_t kc, Fn&& fn) {
  if (a.w_kn) {
    const float* w = a.w + kb * a.ldw + p0 + h * L;
    for (int64_t k = 0; k < kc; ++k) fn(k, VI::load(w + k * a.ldw));  // (prefetching here: no gain at M = 16)
    return;
  }
  const float* w = a.w + (p0 + h * L) * a.ldw + kb;
  int64_t k = 0;
  for (; k + L <= kc; k += L) {
    R r[L];
    for (int i = 0; i < L; ++i) {
      r[i] = VI::load(w + i * a.ldw + k);
      __builtin_prefetch(w + i * a.ldw + k + kPrefetch);
    }
    transpose(r);  // r[c]: w[p0 + h L + lane, kb + k + c]
    for (int c = 0; c < L; ++c) fn(k + c, r[c]);
  }
  for (; k < kc; ++k) fn(k, column(w + k, a.ldw));
}

// Pack t(w) of panel columns p0 .. p0 + nw - 1, k in [kb, kb + kc), as [k][column] (columns past nw
// zero); returns the panel block's exponent range over its valid columns in emin / emax.
void pack_block(const LmulArgs& a, int64_t p0, int nw, int64_t kb, int64_t kc, uint32_t trunc, uint32_t* pack,
                int32_t& emin_out, int32_t& emax_out) {
  if (nw == NP) {  // a full panel: one vector of L columns per k
    const R tr = VI::set1(trunc);
    R vmin = VI::set1(255), vmax = VI::set1(0);
    auto put = [&](uint32_t* dst, R wbits) {
      const R t = prepv(wbits, tr), e = VI::expo(t);
      vmin = VI::min_u(vmin, e);
      vmax = VI::max_u(vmax, e);
      VI::store(dst, t);
    };
    for (int h = 0; h < 2; ++h)
      panel_columns(a, p0, h, kb, kc, [&](int64_t k, R wbits) { put(pack + k * NP + h * L, wbits); });
    lane_range(vmin, vmax, emin_out, emax_out);
    return;
  }
  // a partial panel (the last nw < NP columns), element by element, columns past nw zero
  int32_t emin = 255, emax = 0;  // locals: the stores into pack (uint32_t) may alias an int32_t&
  for (int64_t k = 0; k < kc; ++k)
    for (int j = 0; j < NP; ++j) {
      if (j >= nw) {
        pack[k * NP + j] = 0;
        continue;
      }
      const float w = a.w_kn ? a.w[(kb + k) * a.ldw + p0 + j] : a.w[(p0 + j) * a.ldw + kb + k];
      const uint32_t t = prep1(bits_of(w), trunc);
      const int32_t e = static_cast<int32_t>((t >> 23) & 0xff);
      emin = std::min(emin, e);
      emax = std::max(emax, e);
      pack[k * NP + j] = t;
    }
  emin_out = emin;
  emax_out = emax;
}

// The fast products are valid for a tile when no operand is Inf / NaN, no w is zero / subnormal, and
// the exponent ranges keep every product normal.
inline int tile_mode(const LmulRowStat& s, int32_t emin, int32_t emax) {
  if (emin == 0 || emax == 255 || s.bad == 2 || s.emin + emin < 128 || s.emax + emax > 378) return 0;
  return s.bad == 1 ? 2 : 1;
}

// M = 1, a whole panel (NP rows of W [N, K]; W stored [K, N] goes to gemv_kn): y[p0 + j] = sum_k
// product(x[k], w[p0 + j, k]), k in order, without a packed copy of W. Each step reads L k-values of the
// panel's 2 L rows (one vector per row), transposes each half in registers (one vector per k and half,
// lane = output) and adds the fast products (t(x) - C) + (w & trunc) of both halves, two independent chains
// of float adds. The fast products need no canonical NaN: the K block's range of |w| bits, tracked as
// the rows are loaded (its exponents bound the block's), sends a block holding a NaN / Inf, a zero or
// subnormal, or exponents near the ends back: it is done again from the accumulators saved before it,
// packed and checked, the same sums, bit for bit, as packing every block first. x's own range is known:
// a row with Inf / NaN never comes here.
void gemv_panel(const LmulArgs& a, int64_t p0, const LmulConst& kc_, uint32_t* pack, float* tacc) {
  const LmulRowStat& xs = a.xstat[0];
  const int64_t K = a.K, ldw = a.ldw;
  const uint32_t* xp = a.xp;
  const R trunc = VI::set1(kc_.trunc), abs = VI::set1(kAbs);
  const bool skip = xs.bad == 1;  // x holds zeros / subnormals: their products are skipped
  F acc0 = VI::fzero(), acc1 = VI::fzero();
  R amin, amax;  // the K block's smallest / largest |w| bits so far, lane by lane
  // w bits as loaded: their |w| noted, their mantissas truncated
  auto prep = [&](R w) {
    const R m = VI::and_(w, abs);
    amin = VI::min_u(amin, m);
    amax = VI::max_u(amax, m);
    return VI::and_(w, trunc);
  };
  // one k: the fast products of both halves' truncated columns t0, t1, unless x is skipped
  auto step = [&](uint32_t xk, R t0, R t1) {
    if (skip && zero_or_subnormal(xk, kc_.c)) return;
    const R xb = VI::set1(xk);
    acc0 = VI::fadd_bits(acc0, VI::add(xb, t0));
    acc1 = VI::fadd_bits(acc1, VI::add(xb, t1));
  };
  for (int64_t kb = 0; kb < K; kb += kKc) {
    const int64_t kc = std::min(kKc, K - kb);
    VI::fstore(tacc, acc0);
    VI::fstore(tacc + L, acc1);
    amin = VI::set1(kAbs), amax = VI::set1(0);
    const float* w0 = a.w + p0 * ldw + kb;  // rows p0 .. p0 + L - 1
    const float* w1 = w0 + L * ldw;         // rows p0 + L .. p0 + 2 L - 1
    int64_t k = 0;
    for (; k + L <= kc; k += L) {
      R r0[L], r1[L];
      for (int i = 0; i < L; ++i) {
        r0[i] = prep(VI::load(w0 + i * ldw + k));
        __builtin_prefetch(w0 + i * ldw + k + kPrefetch);
      }
      transpose(r0);  // r0[c]: w[p0 + lane, kb + k + c]
      for (int i = 0; i < L; ++i) {
        r1[i] = prep(VI::load(w1 + i * ldw + k));
        __builtin_prefetch(w1 + i * ldw + k + kPrefetch);
      }
      transpose(r1);
      for (int c = 0; c < L; ++c) step(xp[kb + k + c], r0[c], r1[c]);
    }
    for (; k < kc; ++k) step(xp[kb + k], prep(column(w0 + k, ldw)), prep(column(w1 + k, ldw)));
    int32_t lo, hi;
    lane_range(amin, amax, lo, hi);
    if (tile_mode(xs, lo >> 23, hi >> 23) == 0) {  // redo the block with checked products
      int32_t pmin, pmax;
      pack_block(a, p0, NP, kb, kc, kc_.trunc, pack, pmin, pmax);
      kTiles[0][0](xp + kb, K, pack, kc, tacc, kb == 0, kc_.c);
      acc0 = VI::fload(tacc);
      acc1 = VI::fload(tacc + L);
    }
  }
  VI::fstore(tacc, acc0);
  VI::fstore(tacc + L, acc1);
}

// M = 1 with W stored [K, N] (LmulArgs::w_kn), the n columns from p0 (whole panels), k outer: each k
// streams its row's n contiguous columns once and adds their fast products into acc (in memory, n
// floats), where gemv_panel reads one panel's 2 vectors per row, rows 16 KB apart at N = 4096 (a new
// page per row and panel, which neither the TLB nor the hardware streamers follow). Every output still
// adds its products k in order: the sums are gemv_panel's, bit for bit. The |w| range is tracked over
// all n columns; a K block it rules out is checked panel by panel (pack_block gives each panel's own
// range), and the panels whose fast products are invalid are redone, packed and checked, from the sums
// saved before the block.
void gemv_kn(const LmulArgs& a, int64_t p0, int64_t n, const LmulConst& kc_, uint32_t* pack, float* acc,
             float* saved) {
  const LmulRowStat& xs = a.xstat[0];
  const int64_t K = a.K, ldw = a.ldw;
  const uint32_t* xp = a.xp;
  const R trunc = VI::set1(kc_.trunc), abs = VI::set1(kAbs);
  const bool skip = xs.bad == 1;  // x holds zeros / subnormals: their products are skipped
  std::fill(acc, acc + n, 0.0f);
  for (int64_t kb = 0; kb < K; kb += kKc) {
    const int64_t kc = std::min(kKc, K - kb);
    std::copy(acc, acc + n, saved);
    R amin0 = VI::set1(kAbs), amax0 = VI::set1(0), amin1 = amin0, amax1 = amax0;
    for (int64_t k = 0; k < kc; ++k) {
      const float* row = a.w + (kb + k) * ldw + p0;
      const uint32_t xk = xp[kb + k];
      const bool use = !(skip && zero_or_subnormal(xk, kc_.c));
      const R xb = VI::set1(xk);
      for (int64_t i = 0; i < n; i += NP) {
        const R w0 = VI::load(row + i), w1 = VI::load(row + i + L);
        const R m0 = VI::and_(w0, abs), m1 = VI::and_(w1, abs);
        amin0 = VI::min_u(amin0, m0);
        amax0 = VI::max_u(amax0, m0);
        amin1 = VI::min_u(amin1, m1);
        amax1 = VI::max_u(amax1, m1);
        if (use) {
          VI::fstore(acc + i, VI::fadd_bits(VI::fload(acc + i), VI::add(xb, VI::and_(w0, trunc))));
          VI::fstore(acc + i + L, VI::fadd_bits(VI::fload(acc + i + L), VI::add(xb, VI::and_(w1, trunc))));
        }
      }
    }
    int32_t lo, hi;
    lane_range(VI::min_u(amin0, amin1), VI::max_u(amax0, amax1), lo, hi);
    if (tile_mode(xs, lo >> 23, hi >> 23) != 0) continue;  // every panel's fast products were valid
    for (int64_t q = 0; q < n; q += NP) {  // find the panels that need checked products, redo them
      int32_t pmin, pmax;
      pack_block(a, p0 + q, NP, kb, kc, kc_.trunc, pack, pmin, pmax);
      if (tile_mode(xs, pmin, pmax) != 0) continue;
      std::copy(saved + q, saved + q + NP, acc + q);
      kTiles[0][0](xp + kb, K, pack, kc, acc + q, kb == 0, kc_.c);
    }
  }
}

// The M rows' products with one packed K block of a panel (t(w) as [k][column], exponent range emin ..
// emax over its valid columns) added into the panel's tacc (M x NP; initialised when kb = 0), MR rows
// per tile: checked if a row needs it, else fast, skipping zeros if a row has them.
void panel_tiles(const LmulArgs& a, const uint32_t* pack, int64_t kb, int64_t kc, int32_t emin, int32_t emax,
                 float* tacc, const LmulConst& kc_) {
  for (int64_t m0 = 0; m0 < a.M; m0 += MR) {
    const int rr = static_cast<int>(std::min<int64_t>(MR, a.M - m0));
    int mode = 1;
    for (int r = 0; r < rr && mode > 0; ++r) {
      const int m = tile_mode(a.xstat[m0 + r], emin, emax);
      mode = m == 0 ? 0 : std::max(mode, m);
    }
    kTiles[mode][rr - 1](a.xp + m0 * a.K + kb, a.K, pack, kc, tacc + m0 * NP, kb == 0, kc_.c);
  }
}

// M > 1 with W stored [K, N] (LmulArgs::w_kn): the n columns from p0 (whole panels) together, K block by
// K block. Each row of the block is read once, contiguous, into every panel's packed block (pack_block's
// layout and values), where packing panel by panel reads 2 vectors per row, rows 16 KB apart at N = 4096;
// then each panel's tiles run on its block as in gemm_cols' panel loop: the same sums, bit for bit.
// packs: n / NP blocks of kKc x NP words; taccs: n / NP panels' M x NP sums.
void gemm_kn(const LmulArgs& a, int64_t p0, int64_t n, const LmulConst& kc_, uint32_t* packs, float* taccs) {
  const int64_t np = n / NP;
  const R tr = VI::set1(kc_.trunc);
  for (int64_t kb = 0; kb < a.K; kb += kKc) {
    const int64_t kc = std::min(kKc, a.K - kb);
    for (int64_t k = 0; k < kc; ++k) {
      const float* row = a.w + (kb + k) * a.ldw + p0;
      for (int64_t q = 0; q < np; ++q)
        for (int h = 0; h < 2; ++h)
          VI::store(packs + q * kKc * NP + k * NP + h * L, prepv(VI::load(row + q * NP + h * L), tr));
    }
    for (int64_t q = 0; q < np; ++q) {
      const uint32_t* pack = packs + q * kKc * NP;
      R vmin = VI::set1(255), vmax = VI::set1(0);
      for (int64_t i = 0; i < kc * NP; i += L) {
        const R e = VI::expo(VI::load(pack + i));
        vmin = VI::min_u(vmin, e);
        vmax = VI::max_u(vmax, e);
      }
      int32_t emin, emax;
      lane_range(vmin, vmax, emin, emax);
      panel_tiles(a, pack, kb, kc, emin, emax, taccs + q * a.M * NP, kc_);
    }
  }
}

constexpr int64_t kKnRows = 64;  // gemm_kn for up to this many rows (its sums: M x the range's columns)

void gemm_cols(const LmulArgs& a, int64_t n0, int64_t n1) {
  const LmulConst kc_ = lmul_const(a.bits);
  const int64_t M = a.M, K = a.K;
  AlignedVec<uint32_t> pack(static_cast<size_t>(std::min(K, kKc) * NP + NP));
  // W [K, N]: the whole panels of the range at once (M = 1: gemv_kn, sums in tacc; 1 < M <= kKnRows:
  // gemm_kn, panel q's sums at tacc + q M NP); the rest (a last partial panel, or every panel for larger
  // M or a row with Inf / NaN at M = 1) panel by panel below
  const bool gemv = M == 1 && a.xstat[0].bad != 2;
  const int64_t kn_cols = a.w_kn && K > 0 && (gemv || (M > 1 && M <= kKnRows)) ? (n1 - n0) / NP * NP : 0;
  AlignedVec<float> tacc(static_cast<size_t>(std::max(M * NP, M * kn_cols)));
  if (kn_cols > 0 && gemv) {
    AlignedVec<float> saved(static_cast<size_t>(kn_cols));
    gemv_kn(a, n0, kn_cols, kc_, pack.data(), tacc.data(), saved.data());
  } else if (kn_cols > 0) {
    AlignedVec<uint32_t> packs(static_cast<size_t>(kn_cols * kKc));
    gemm_kn(a, n0, kn_cols, kc_, packs.data(), tacc.data());
  }
  // y[m, p0 + j] = t[m NP + j] (+ bias, + y) for the nw <= NP columns from p0
  auto emit = [&](int64_t p0, int64_t nw, const float* t) {
    for (int64_t m = 0; m < M; ++m) {
      float* yr = a.y + m * a.ldy + p0;
      for (int64_t j = 0; j < nw; ++j) {
        float v = t[m * NP + j];
        if (a.bias) v += a.bias[p0 + j];
        if (a.accumulate) v += yr[j];
        yr[j] = v;
      }
    }
  };
  for (int64_t q = 0; q < kn_cols / NP; ++q)  // (M = 1: gemv_kn's sums are panel after panel too)
    emit(n0 + q * NP, NP, tacc.data() + q * M * NP);
  for (int64_t p0 = n0 + kn_cols; p0 < n1; p0 += NP) {
    const int nw = static_cast<int>(std::min<int64_t>(NP, n1 - p0));
    if (M == 1 && nw == NP && K > 0 && a.xstat[0].bad != 2) {
      gemv_panel(a, p0, kc_, pack.data(), tacc.data());
    } else {
      if (K == 0) std::fill(tacc.begin(), tacc.end(), 0.0f);
      for (int64_t kb = 0; kb < K; kb += kKc) {
        const int64_t kc = std::min(kKc, K - kb);
        int32_t emin, emax;  // t(w) as [k][column]; stats of the valid columns
        pack_block(a, p0, nw, kb, kc, kc_.trunc, pack.data(), emin, emax);
        panel_tiles(a, pack.data(), kb, kc, emin, emax, tacc.data(), kc_);
      }
    }
    emit(p0, nw, tacc.data());
  }
}

// ------------------------------------------------------------------------------------ elementwise
void map(int64_t n, const float* a, const float* b, float* out, int bits) {
  const LmulConst k = lmul_const(bits);
  const R trunc = VI::set1(k.trunc), C = VI::set1(k.c);
  int64_t i = 0;
  for (; i + L <= n; i += L) VI::store(out + i, checkedv(prepv(VI::load(a + i), trunc), prepv(VI::load(b + i), trunc), C));
  for (; i < n; ++i)
    out[i] = float_of(checked1(prep1(bits_of(a[i]), k.trunc), prep1(bits_of(b[i]), k.trunc), k.c));
}

void axpy(int64_t n, float p, const float* v, float* out, int bits) {
  const LmulConst k = lmul_const(bits);
  const uint32_t ps = prep1(bits_of(p), k.trunc);
  const R trunc = VI::set1(k.trunc), C = VI::set1(k.c), pv = VI::set1(ps);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    VI::fstore(out + i, VI::fadd_bits(VI::fload(out + i), checkedv(pv, prepv(VI::load(v + i), trunc), C)));
  for (; i < n; ++i) out[i] += float_of(checked1(ps, prep1(bits_of(v[i]), k.trunc), k.c));
}

// L keys at a time: their rows' next L d-values transposed in registers (lane = key), so every lane
// adds its checked products in d order as the one-key-at-a-time loop does (the same bits); the last
// n % L keys one at a time.
void dots(int64_t n, int D, const float* q, const float* k, int64_t ldk, float* out, int bits) {
  const LmulConst kc = lmul_const(bits);
  const R trunc = VI::set1(kc.trunc), C = VI::set1(kc.c);
  thread_local AlignedVec<uint32_t> qp;
  qp.resize(static_cast<size_t>(D));
  for (int d = 0; d < D; ++d) qp[d] = prep1(bits_of(q[d]), kc.trunc);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F acc = VI::fzero();
    int d = 0;
    for (; d + L <= D; d += L) {
      R r[L];
      for (int i = 0; i < L; ++i) r[i] = VI::load(k + (j + i) * ldk + d);
      transpose(r);  // r[c]: k[(j + lane) ldk + d + c]
      for (int c = 0; c < L; ++c) acc = VI::fadd_bits(acc, checkedv(VI::set1(qp[d + c]), prepv(r[c], trunc), C));
    }
    for (; d < D; ++d)
      acc = VI::fadd_bits(acc, checkedv(VI::set1(qp[d]), prepv(column(k + j * ldk + d, ldk), trunc), C));
    VI::fstore(out + j, acc);
  }
  for (; j < n; ++j) {
    float acc = 0.0f;
    for (int d = 0; d < D; ++d) acc += float_of(checked1(qp[d], prep1(bits_of(k[j * ldk + d]), kc.trunc), kc.c));
    out[j] = acc;
  }
}

LmulRowStat prep_row(int64_t n, const float* x, uint32_t* xp, int bits) {
  const LmulConst k = lmul_const(bits);
  // exponent range over the normal entries; bad = 2 with an Inf / NaN, else 1 with a zero / subnormal
  LmulRowStat s{255, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t t = prep1(bits_of(x[i]), k.trunc);
    const int32_t e = static_cast<int32_t>((t >> 23) & 0xff);
    if (e == 255) s.bad = 2;
    else if (e == 0) s.bad = std::max(s.bad, 1);
    else { s.emin = std::min(s.emin, e); s.emax = std::max(s.emax, e); }
    xp[i] = t - k.c;
  }
  return s;
}

}  // namespace

const LmulTable* lmul_table() {
  static const LmulTable table = {gemm_cols, map, axpy, dots, prep_row};
  return &table;
}

#if defined(NE_ISA_GENERIC)
// The scalar definition (ops/lmul.h), shared by everything that needs one product.
float lmul_scalar_impl(float a, float b, int bits) {
  const LmulConst k = lmul_const(bits);
  return float_of(checked1(prep1(bits_of(a), k.trunc), prep1(bits_of(b), k.trunc), k.c));
}
#endif

}  // namespace NE_ISA_NS
}  // namespace ne
