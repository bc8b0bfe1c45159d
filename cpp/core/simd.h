// The vector abstraction the CPU kernels are written against. A kernel source file is compiled once
// per ISA (CMake adds -DNE_ISA_AVX512 / -DNE_ISA_AVX2 / -DNE_ISA_GENERIC with matching -m flags and
// -DNE_ISA_NS=<namespace>; the avx512bf16 build is the AVX-512 one with -mavx512bf16, which turns
// the float -> bf16 store into one instruction and a test for zeros); this header then defines, inside that
// namespace:
//
//   VF  float lanes (16 on AVX-512, 8 on AVX2, 8 plain floats in the generic build)
//   VD  one double "lane": the same kernels run in float64 for the float64 entry points (gradcheck)
//
// Each provides N, acc_t, zero(), set1(), load<T>(p) / load<T>(p, k) (the first k lanes, rest 0),
// store<T>(p, v) / store<T>(p, v, k), add, sub, mul, fma(a, b, c) = a*b + c, keep(v, k) (lanes >= k
// set to 0) and reduce (sum of lanes). T is the element type in memory (float, bf16, f16; double for VD); values are converted to
// acc_t on load and rounded to nearest-even on store. VF also loads int8_t (widened exactly: an int8 KV cache's
// values, before their scale), with no store.
//
// Everything here lives in the ISA's namespace and uses only intrinsics and builtins, so no inline
// function compiled with AVX-512 flags can be merged by the linker into code that runs on a lesser CPU.
#pragma once
#include <cstdint>
#include <type_traits>

#include "core/half.h"

#if defined(NE_ISA_AVX512) || defined(NE_ISA_AVX2)
#include <immintrin.h>
#endif

#ifndef NE_ISA_NS
#error "compile kernel files through CMake's per-ISA targets (NE_ISA_NS undefined)"
#endif

namespace ne {

// Whether an output of `bytes` at p should be written with store_stream: large (>= 8 MiB, it would
// evict everything else anyway) and already backed by resident pages (core/runtime.cpp, mincore).
// Into freshly mapped pages (glibc maps every allocation of 32 MB or more anew) streaming is slower
// than plain stores: each page fault zeroes the page through the cache, and those lines are written
// back before the streamed ones (LayerNorm backward f32 4096x4096 into a new dx: 24.7 ms streamed,
// 18.2 ms plain).
bool worth_streaming(const void* p, int64_t bytes);

namespace NE_ISA_NS {

// ------------------------------------------------------------------------------------ VD
struct VD {
  using acc_t = double;
  using R = double;
  static constexpr int N = 1;
  static R zero() { return 0.0; }
  static R set1(double a) { return a; }
  template <class T> static R load(const T* p) { return static_cast<double>(*p); }
  template <class T> static R load(const T* p, int k) { return k > 0 ? static_cast<double>(*p) : 0.0; }
  template <class T> static void store(T* p, R v) { *p = static_cast<T>(v); }
  template <class T> static void store(T* p, R v, int k) { if (k > 0) *p = static_cast<T>(v); }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R mul(R a, R b) { return a * b; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static double reduce(R a) { return a; }
  static R keep(R a, int k) { return k > 0 ? a : 0.0; }
};

#if defined(NE_ISA_AVX512)
// ------------------------------------------------------------------------------------ AVX-512
struct VF {
  using acc_t = float;
  using R = __m512;
  static constexpr int N = 16;
  static __mmask16 mask(int k) { return static_cast<__mmask16>((1u << k) - 1u); }
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float a) { return _mm512_set1_ps(a); }
  static R widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  // round to nearest even in integer arithmetic: (u + 0x7fff + lsb) >> 16, NaNs kept quiet NaNs
  static __m256i narrow_bf16_int(R v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
  }
#if defined(__AVX512BF16__)
  // (out of line and cold: the hot loops keep only the test and the branch)
  __attribute__((noinline, cold)) static __m256i narrow_bf16_rare(R v) { return narrow_bf16_int(v); }
#endif
  static __m256i narrow_bf16(R v) {
#if defined(__AVX512BF16__)
    // one instruction: round to nearest even, NaN stays NaN; but it reads float32 subnormals as zero, where a
    // bf16 subnormal is the answer. A result with a zero in any lane (a flushed subnormal, or a true zero) is
    // done again by the integer rounding: a test of the 256-bit result, cheaper than classifying v.
    const __m256i r = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    if (__builtin_expect(_mm256_testn_epi16_mask(r, _mm256_set1_epi16(0x7fff)) != 0, 0)) return narrow_bf16_rare(v);
    return r;
#else
    return narrow_bf16_int(v);
#endif
  }
  // full loads
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const bf16* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R load(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // partial loads
  static R load(const float* p, int k) { return _mm512_maskz_loadu_ps(mask(k), p); }
  static R load(const int8_t* p, int k) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(k), p)));
  }
  static R load(const bf16* p, int k) { return widen_bf16(_mm256_maskz_loadu_epi16(mask(k), p)); }
  static R load(const f16* p, int k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(k), p)); }
  // stores
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(bf16* p, R v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v)); }
  static void store(f16* p, R v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(float* p, R v, int k) { _mm512_mask_storeu_ps(p, mask(k), v); }
  static void store(bf16* p, R v, int k) { _mm256_mask_storeu_epi16(p, mask(k), narrow_bf16(v)); }
  static void store(f16* p, R v, int k) {
    _mm256_mask_storeu_epi16(p, mask(k), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }  // b where either is NaN
  static R keep(R a, int k) { return _mm512_maskz_mov_ps(mask(k), a); }
  static double reduce(R a) {  // pairwise in float, final adds in double
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    alignas(16) float t[4];
    _mm_store_ps(t, q);
    return (static_cast<double>(t[0]) + t[1]) + (static_cast<double>(t[2]) + t[3]);
  }
};

#elif defined(NE_ISA_AVX2)
// ------------------------------------------------------------------------------------ AVX2 + FMA + F16C
struct VF {
  using acc_t = float;
  using R = __m256;
  static constexpr int N = 8;
  static __m256i mask(int k) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float a) { return _mm256_set1_ps(a); }
  static R widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  // v rounded to bf16, nearest even: (u + 0x7fff + lsb) >> 16 of its bits u, in each 32-bit lane's low half.
  // Exact for every number; a NaN stays NaN unless its upper 16 mantissa bits are all set and the rest
  // carries (it would wrap to a zero) or it is signaling with only low bits set (it would become Inf).
  static __m256i round_bf16_nan_unsafe(R v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  }
  // the same, any NaN kept as its upper bits, quieted
  static __m256i round_bf16(R v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(round_bf16_nan_unsafe(v), qn, nan);
  }
  static __m128i narrow_bf16(R v) {
    __m256i r = round_bf16(v);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static __m128i load16(const void* p, int k) {  // first k of 8 16-bit values, rest zero
    alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    __builtin_memcpy(t, p, static_cast<unsigned>(k) * 2u);
    return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  }
  static void store16(void* p, __m128i v, int k) {
    alignas(16) uint16_t t[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(t), v);
    __builtin_memcpy(p, t, static_cast<unsigned>(k) * 2u);
  }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const bf16* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R load(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static R load(const float* p, int k) { return _mm256_maskload_ps(p, mask(k)); }
  static R load(const bf16* p, int k) { return widen_bf16(load16(p, k)); }
  static R load(const int8_t* p, int k) {  // first k of 8, rest zero
    long long t = 0;
    __builtin_memcpy(&t, p, static_cast<unsigned>(k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(t)));
  }
  static R load(const f16* p, int k) { return _mm256_cvtph_ps(load16(p, k)); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store(bf16* p, R v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow_bf16(v)); }
  static void store(f16* p, R v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(float* p, R v, int k) { _mm256_maskstore_ps(p, mask(k), v); }
  static void store(bf16* p, R v, int k) { store16(p, narrow_bf16(v), k); }
  static void store(f16* p, R v, int k) {
    store16(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), k);
  }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }  // b where either is NaN
  static R keep(R a, int k) { return _mm256_and_ps(a, _mm256_castsi256_ps(mask(k))); }
  static double reduce(R a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    alignas(16) float t[4];
    _mm_store_ps(t, q);
    return (static_cast<double>(t[0]) + t[1]) + (static_cast<double>(t[2]) + t[3]);
  }
};

// ------------------------------------------------------------------------------------ AVX2, bf16 rows
// VFB: 16 values as two float vectors in the order vpunpck{l,h}wd leaves them, lo = elements 0-3 and
// 8-11, hi = 4-7 and 12-15. bf16 -> float is then one unpack with zero per 8 values (VF: vpmovzxwd and a
// shift), and float -> bf16 one vpackusdw per 16 that also puts them back in order (VF: an extract and a
// pack per 8); float32 arrays (weights, partial sums) move in the same order by 128-bit halves. For
// kernels that only work lane by lane and reduce whole rows (the norms), the order is invisible.
// Its bf16 store rounds without a NaN test (VF::round_bf16_nan_unsafe; the test was a third of the
// rounding): a kernel using it stores only values computed from bf16 inputs and from float32 arrays
// whose NaNs are the default one (plain_nans below), whose NaN results can't carry (bf16 NaNs have
// zero low bits; arithmetic quiets). An AVX2-only AMD EPYC (Zen 1) ran bf16 LayerNorm forward at 35% of
// copy bandwidth with VF.
struct VFB {
  using acc_t = float;
  struct R { __m256 lo, hi; };
  static constexpr int N = 16;
  static R zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static R set1(float a) { __m256 v = _mm256_set1_ps(a); return {v, v}; }
  static R add(R a, R b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  static R sub(R a, R b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  static R mul(R a, R b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static R fma(R a, R b, R c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static R keep(R a, int k) {  // elements >= k to 0
    const __m256i kv = _mm256_set1_epi32(k);
    const __m256i ml = _mm256_cmpgt_epi32(kv, _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11));
    const __m256i mh = _mm256_cmpgt_epi32(kv, _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15));
    return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(ml)), _mm256_and_ps(a.hi, _mm256_castsi256_ps(mh))};
  }
  static double reduce(R a) { return VF::reduce(VF::add(a.lo, a.hi)); }
  static R widen(__m256i h) {
    const __m256i z = _mm256_setzero_si256();
    return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h))};
  }
  static __m256i narrow(R v) {
    return _mm256_packus_epi32(VF::round_bf16_nan_unsafe(v.lo), VF::round_bf16_nan_unsafe(v.hi));
  }
  static R load(const bf16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R load(const float* p) { return {_mm256_loadu2_m128(p + 8, p), _mm256_loadu2_m128(p + 12, p + 4)}; }
  static void store(bf16* p, R v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static void store(float* p, R v) {
    _mm256_storeu2_m128(p + 8, p, v.lo);
    _mm256_storeu2_m128(p + 12, p + 4, v.hi);
  }
  // the first k < 16 elements (the rest read as 0), through a zeroed buffer
  template <class T> static R load(const T* p, int k) {
    alignas(32) T t[16] = {};
    __builtin_memcpy(t, p, static_cast<unsigned>(k) * sizeof(T));
    return load(static_cast<const T*>(t));
  }
  template <class T> static void store(T* p, R v, int k) {
    alignas(32) T t[16];
    store(t, v);
    __builtin_memcpy(p, t, static_cast<unsigned>(k) * sizeof(T));
  }
};

#else
// ------------------------------------------------------------------------------------ portable
// Eight plain floats; the loops are simple enough for the compiler's auto-vectorizer (SSE2 on
// baseline x86-64, NEON on arm64).
struct VF {
  using acc_t = float;
  static constexpr int N = 8;
  struct R { float v[8]; };
  static R zero() { R r; for (int i = 0; i < N; ++i) r.v[i] = 0.f; return r; }
  static R set1(float a) { R r; for (int i = 0; i < N; ++i) r.v[i] = a; return r; }
  template <class T> static R load(const T* p) { R r; for (int i = 0; i < N; ++i) r.v[i] = to_f32(p[i]); return r; }
  template <class T> static R load(const T* p, int k) {
    R r; for (int i = 0; i < N; ++i) r.v[i] = i < k ? to_f32(p[i]) : 0.f; return r;
  }
  template <class T> static void store(T* p, R a) { for (int i = 0; i < N; ++i) p[i] = from_f32<T>(a.v[i]); }
  template <class T> static void store(T* p, R a, int k) { for (int i = 0; i < k; ++i) p[i] = from_f32<T>(a.v[i]); }
  static R add(R a, R b) { for (int i = 0; i < N; ++i) a.v[i] += b.v[i]; return a; }
  static R sub(R a, R b) { for (int i = 0; i < N; ++i) a.v[i] -= b.v[i]; return a; }
  static R mul(R a, R b) { for (int i = 0; i < N; ++i) a.v[i] *= b.v[i]; return a; }
  static R fma(R a, R b, R c) { for (int i = 0; i < N; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
  static R max(R a, R b) { for (int i = 0; i < N; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }  // b where either is NaN
  static R keep(R a, int k) { for (int i = k; i < N; ++i) a.v[i] = 0.f; return a; }
  static double reduce(R a) {
    double s = 0; for (int i = 0; i < N; ++i) s += a.v[i]; return s;
  }
};
#endif

// Whether V's bf16 store wants the float32 arrays a kernel multiplies in to hold no NaN but the default one
// (VFB: its rounding takes no NaN test)
template <class V> inline constexpr bool kNeedsPlainNaNs = false;
// Registers one V::R takes (VFB: two), for kernels sizing their accumulators to the register file
template <class V> inline constexpr int kRegsPerVec = 1;
#if defined(NE_ISA_AVX2)
template <> inline constexpr bool kNeedsPlainNaNs<VFB> = true;
template <> inline constexpr int kRegsPerVec<VFB> = 2;
#endif

// Store to memory that will not be read again soon (a large output): a non-temporal store where the
// ISA has one and p is aligned to the store's width, else a plain store. Streaming a large output
// skips the read-for-ownership of its cache lines (a third of the traffic of a norm's forward). A run
// of streamed stores ends with stream_fence() before other threads may read them.
template <class V, class T> inline void store_stream(T* p, typename V::R v) {
#if defined(NE_ISA_AVX512)
  if constexpr (std::is_same_v<V, VF> && std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<V, VF> && std::is_same_v<T, bf16>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0)
      return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), VF::narrow_bf16(v));
  }
#elif defined(NE_ISA_AVX2)
  if constexpr (std::is_same_v<V, VF> && std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<V, VF> && std::is_same_v<T, bf16>) {
    if ((reinterpret_cast<uintptr_t>(p) & 15) == 0)
      return _mm_stream_si128(reinterpret_cast<__m128i*>(p), VF::narrow_bf16(v));
  } else if constexpr (std::is_same_v<V, VFB> && std::is_same_v<T, bf16>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0)
      return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), VFB::narrow(v));
  }
#endif
  V::store(p, v);
}
inline void stream_fence() {
#if defined(NE_ISA_AVX512) || defined(NE_ISA_AVX2)
  _mm_sfence();
#endif
}

// Load/store the first k <= N elements: the full-width instruction when k == N.
template <class V, class T> inline typename V::R loadn(const T* p, int k) {
  return k == V::N ? V::load(p) : V::load(p, k);
}
template <class V, class T> inline void storen(T* p, typename V::R v, int k) {
  if (k == V::N) V::store(p, v); else V::store(p, v, k);
}

// The 2N elements at p as two vectors whose lanes hold them in an order of the ISA's choosing: only for sums that
// reduce every lane alike (row statistics). AVX-512 bf16: one 64-byte load, the even elements shifted into place
// and the odd ones masked, one instruction per 16 values (V::load takes two: vpmovzxwd and a shift).
template <class V, class T> inline void load_pair(const T* p, typename V::R& a, typename V::R& b) {
#if defined(NE_ISA_AVX512)
  if constexpr (std::is_same_v<V, VF> && std::is_same_v<T, bf16>) {
    const __m512i u = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return;
  }
#endif
  a = V::load(p);
  b = V::load(p + V::N);
}

// exp(x) for float lanes, to ~2 ulp over [-87, 88] (below: 0, above: +Inf, NaN stays NaN).
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in a
// high and a low part so r is exact), exp(r) by its degree-6 Taylor polynomial (Horner form).
inline VF::R vexp(VF::R x) {
  using R = VF::R;
  alignas(64) float t[VF::N], n_[VF::N];
  // The range reduction needs round() and an integer exponent add; lane-wise through memory keeps
  // this one routine the same for every ISA, and the compiler vectorizes the loops.
  VF::store(t, x);
  for (int i = 0; i < VF::N; ++i) {
    float v = t[i];
    v = v < -87.3f ? -87.3f : v;
    v = v > 88.7f ? 88.7f : v;
    n_[i] = __builtin_rintf(v * 1.44269504088896341f);
    t[i] = (v - n_[i] * 0.693359375f) + n_[i] * 2.12194440e-4f;  // v - n*ln2 (hi + lo)
  }
  R r = VF::load(static_cast<const float*>(t));
  R p = VF::set1(1.f / 720);
  p = VF::fma(p, r, VF::set1(1.f / 120));
  p = VF::fma(p, r, VF::set1(1.f / 24));
  p = VF::fma(p, r, VF::set1(1.f / 6));
  p = VF::fma(p, r, VF::set1(0.5f));
  p = VF::fma(p, r, VF::set1(1.f));
  p = VF::fma(p, r, VF::set1(1.f));
  alignas(64) float o[VF::N];
  VF::store(o, p);
  VF::store(t, x);
  for (int i = 0; i < VF::N; ++i) {
    uint32_t bits;
    __builtin_memcpy(&bits, &o[i], 4);
    bits += static_cast<uint32_t>(static_cast<int32_t>(n_[i])) << 23;  // times 2^n
    float e;
    __builtin_memcpy(&e, &bits, 4);
    if (t[i] < -87.3f) e = 0.f;
    if (t[i] > 88.7f) e = __builtin_inff();
    if (t[i] != t[i]) e = t[i];
    o[i] = e;
  }
  return VF::load(static_cast<const float*>(o));
}

}  // namespace NE_ISA_NS
}  // namespace ne
