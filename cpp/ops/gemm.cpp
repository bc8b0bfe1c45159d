// Dense linear kernels (CPU): y = x W^T (+ bias) (+ y), W in torch.nn.Linear layout [N, K], stored as
// f32, bf16 or f16 and widened to f32 on the fly; x, y and all accumulation in f32.
//
// This file is compiled once per ISA (see CMakeLists.txt); the entry points at the bottom are
// compiled only in the generic build and pick the best ISA's kernel table at run time.
//
// Two paths, chosen by the number of rows M of x:
//   GEMV (gemv_rows(M, K): decode of one sequence or a batch): memory-bound. Every element of
//     W is used M times only, so the bound is the time to stream W from memory once; each thread
//     streams its own rows of W.
//   GEMM (larger M, prefill): compute-bound. W is packed panel by panel (transposed, widened to f32)
//     into a per-thread scratch block that stays in L2, and a register-blocked micro-kernel
//     computes MR x NR tiles of y as outer products: broadcast x[m, k], times NR packed weights.
#include "core/aligned.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "normengine/ops.h"
#include "ops/gemm.h"

namespace ne {
namespace NE_ISA_NS {

// ------------------------------------------------------------------------------------ blocking
// MR x NR tile of y held in MR * NV vector registers (NR = NV * lanes):
//   AVX-512: 8 x 48 = 24 zmm accumulators + 3 weight vectors + 1 broadcast (of 32 registers)
//   AVX2:    6 x 16 = 12 ymm accumulators + 2 + 1 (of 16)
//   generic: 4 x 8 floats, left to the auto-vectorizer
#if defined(NE_ISA_AVX512)
constexpr int kMR = 8, kNV = 3;
#elif defined(NE_ISA_AVX2)
constexpr int kMR = 6, kNV = 2;
#else
constexpr int kMR = 4, kNV = 1;
#endif
constexpr int kNR = kNV * VF::N;
// K is cut into blocks of at most kKC (balanced); a packed block of W is kKC x kNC floats
// (384 x 384 x 4 B = 576 KiB: it stays in the 1 MiB L2 while every row tile of x passes over it,
// and the x micro-panel, MR x kc floats = 12 KiB on AVX-512, stays in L1). Measured on Zen 4:
// 256 x 384 and 512 x 192 within a few percent.
constexpr int64_t kKC = 384;
constexpr int64_t kNC = kNR * (384 / kNR);
constexpr int64_t kPackFloats = kKC * kNC;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum of the lanes of v. AVX-512: shuffles within the register; the zero-masking forms (all lanes
// kept) because the plain ones, and VF::reduce's extract, trip a false GCC 12 -Wuninitialized here.
#if defined(NE_ISA_AVX512)
inline float hsum(__m512 v) {
  const __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0x4E));  // + the other 256-bit half
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0xB1));  // + the neighbouring 128 bits
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0xB1));
  return _mm512_cvtss_f32(v);
}
#else
inline float hsum(VF::R v) { return static_cast<float>(VF::reduce(v)); }
#endif

// ======================================================================================== GEMV
// For MM <= 8 rows of x and RR rows of W at a time, in U interleaved accumulators over k:
//   acc[m][r][u] += x[m, k:k+L] * W[n+r, k:k+L]      for the u-th vector of each group of U
//   y[m, n+r] = hsum(sum_u acc[m][r][u]) (+ bias[n+r]) (+ y[m, n+r])
// Memory traffic: W once (N * K * sizeof(T)), x M * K * 4 (L1/L2), y M * N * 4. The bound is W's
// stream: a thread reads its rows of W front to back (RR adjacent rows side by side), which the
// hardware prefetcher follows, and software prefetches kPrefetch bytes ahead, across the 4 KiB
// pages where the hardware prefetcher stops. For M > 1 the FMAs (M per L weights) and the loads of
// x start to count: the RR rows of W share each load of x, and each load of W serves MM rows of x.
// A batch's decode step (M up to kGemvMaxRows sequences) takes x in blocks of kGemvBlock rows:
// for each group of RR rows of W, every block in turn, so W is read from memory once (the later
// blocks find its RR rows in L1). Each output's arithmetic depends only on the block size it falls
// in (MM), not on the split of N over threads: results are bitwise identical for any thread count.
#if defined(NE_ISA_AVX512)
constexpr int kGemvBlock = 8;  // 8 x 2 accumulators + 2 weight vectors + 8 x vectors of 32 zmm
#else
constexpr int kGemvBlock = 4;  // AVX2: 4 x 2 accumulators + 2 + 4 of 16 ymm
#endif
template <class V, class T>
struct Gemv {
  using R = typename V::R;
  static constexpr int L = V::N;

  // accumulators per (row of x, row of W): 4 for one row, 2 for two, else 1 (and 2 up to 4 rows
  // where the 32 AVX-512 registers hold 4 x 2 x 2)
  template <int MM>
  static constexpr int unroll() {
#if defined(NE_ISA_AVX512)
    return MM == 1 ? 4 : MM <= 4 ? 2 : 1;
#else
    return MM == 1 ? 4 : MM == 2 ? 2 : 1;
#endif
  }

  // y rows 0 .. MM - 1, outputs n .. n + RR - 1; PF: this call is the first to read these rows of W,
  // and prefetches ahead of them (the other blocks of x find them in L1)
  template <int MM, int RR, bool PF = true>
  static void group(const GemmArgs& a, int64_t n) {
    constexpr int U = unroll<MM>();
    constexpr int kStepBytes = U * L * static_cast<int>(sizeof(T));
    // 4 KiB of W ahead whatever its dtype (16 steps of M = 1 for f32, 32 for 16-bit weights; at
    // 2 KiB the 16-bit GEMV read 22 GB/s cold against 27-28 GB/s at 4-8 KiB, 2 threads)
    constexpr int64_t kPrefetch = MM > 4 ? 8192 : 4096;
    const int64_t K = a.K;
    const T* w = static_cast<const T*>(a.w) + n * a.ldw;
    R acc[MM][RR][U];
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < RR; ++r)
        for (int u = 0; u < U; ++u) acc[m][r][u] = V::zero();
    int64_t k = 0;
    for (; k + U * L <= K; k += U * L) {
      R wv[RR][U];
      for (int r = 0; r < RR; ++r) {
        if constexpr (PF) {
          const char* pf = reinterpret_cast<const char*>(w + r * a.ldw + k) + kPrefetch;
          for (int b = 0; b < kStepBytes; b += 64) __builtin_prefetch(pf + b, 0, 2);  // into L2 (prefetcht1)
        }
        for (int u = 0; u < U; ++u) wv[r][u] = V::load(w + r * a.ldw + k + u * L);
      }
      R xv[MM][U];
      for (int m = 0; m < MM; ++m)
        for (int u = 0; u < U; ++u) xv[m][u] = V::load(a.x + m * a.ldx + k + u * L);
      for (int m = 0; m < MM; ++m)
        for (int u = 0; u < U; ++u)
          for (int r = 0; r < RR; ++r) acc[m][r][u] = V::fma(xv[m][u], wv[r][u], acc[m][r][u]);
    }
    for (int u = 0; k < K; k += L, ++u) {  // up to U - 1 whole vectors and a partial one
      const int t = static_cast<int>(min64(L, K - k));
      R wv[RR];
      for (int r = 0; r < RR; ++r) wv[r] = loadn<V>(w + r * a.ldw + k, t);
      for (int m = 0; m < MM; ++m) {
        const R xv = loadn<V>(a.x + m * a.ldx + k, t);
        for (int r = 0; r < RR; ++r) acc[m][r][u] = V::fma(xv, wv[r], acc[m][r][u]);
      }
    }
    const GemmEpilogue& ep = a.ep;
    for (int m = 0; m < MM; ++m) {
      for (int r = 0; r < RR; ++r) {
        R t = acc[m][r][0];
        if constexpr (U == 4)
          t = V::add(V::add(acc[m][r][0], acc[m][r][1]), V::add(acc[m][r][2], acc[m][r][3]));
        else if constexpr (U == 2)
          t = V::add(acc[m][r][0], acc[m][r][1]);
        float v = hsum(t);
        float* y = a.y + m * a.ldy + n + r;
        if (ep.row_scale) v *= ep.row_scale[m];
        if (ep.row_shift) v += -(ep.row_scale ? ep.row_scale[m] : 1.0f) * ep.row_shift[m] * ep.col_sum[n + r];
        if (a.bias) v += a.bias[n + r];
        if (a.accumulate) v += *y;
        *y = v;
      }
    }
  }

  template <int MM>
  static void rows(const GemmArgs& a, int64_t n0, int64_t n1) {
    constexpr int RR = MM == 1 && sizeof(T) == 2 ? 1 : 2;  // M = 1: two f32 rows (streams) at a time; 16-bit: one
    int64_t n = n0;
    for (; n + RR <= n1; n += RR) group<MM, RR>(a, n);
    if (n < n1) group<MM, 1>(a, n);
  }

  // one block of rows of x (b: a's x, y and row statistics from the block's first row on; b.M <=
  // kGemvBlock rows) against rows n .. n + RR - 1 of W
  template <int RR, bool PF>
  static void block(const GemmArgs& b, int64_t n) {
    switch (b.M) {
      case 1: group<1, RR, PF>(b, n); break;
      case 2: group<2, RR, PF>(b, n); break;
      case 3: group<3, RR, PF>(b, n); break;
      case 4: group<4, RR, PF>(b, n); break;
#if defined(NE_ISA_AVX512)
      case 5: group<5, RR, PF>(b, n); break;
      case 6: group<6, RR, PF>(b, n); break;
      case 7: group<7, RR, PF>(b, n); break;
      case 8: group<8, RR, PF>(b, n); break;
#endif
      default: break;
    }
  }

  // M > 4: for each pair of rows of W, every block of x
  static void batch_rows(const GemmArgs& a, int64_t n0, int64_t n1) {
    constexpr int kBlocks = (kGemvMaxRows + kGemvBlock - 1) / kGemvBlock;
    GemmArgs b[kBlocks];
    for (int i = 0; i * kGemvBlock < a.M; ++i) {
      const int64_t m0 = i * kGemvBlock;
      b[i] = a;
      b[i].M = min64(kGemvBlock, a.M - m0);
      b[i].x += m0 * a.ldx;
      b[i].y += m0 * a.ldy;
      if (a.ep.row_scale) b[i].ep.row_scale += m0;
      if (a.ep.row_shift) b[i].ep.row_shift += m0;
    }
    auto blocks = [&](auto rr, int64_t n) {
      constexpr int RR = decltype(rr)::value;
      block<RR, true>(b[0], n);
      for (int i = 1; i * kGemvBlock < a.M; ++i) block<RR, false>(b[i], n);
    };
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) blocks(std::integral_constant<int, 2>{}, n);
    if (n < n1) blocks(std::integral_constant<int, 1>{}, n);
  }

  static void run(const GemmArgs& a) {
    // a thread's share: at least 64 KiB of W, so that small layers stay on one thread
    const int64_t row_bytes = max64(1, a.K * static_cast<int64_t>(sizeof(T)));
    const int64_t grain = max64(2, cdiv(int64_t(64) << 10, row_bytes));
    parallel_for(a.N, grain, [&](int64_t b, int64_t e, int) {
      switch (a.M) {
        case 1: rows<1>(a, b, e); break;
        case 2: rows<2>(a, b, e); break;
        case 3: rows<3>(a, b, e); break;
        case 4: rows<4>(a, b, e); break;
        default: batch_rows(a, b, e); break;
      }
    });
  }
};
static_assert(kGemvMaxRows >= 4, "Gemv::run: rows 1-4 take rows<MM>, more take batch_rows");

// ======================================================================================== GEMM
// ---------------------------------------------------------------- packing W
// One panel: NR consecutive rows n of W, a block of kc columns k, stored transposed and widened:
//   bp[k * NR + j] = float(W[n0 + j, k0 + k])      j < NR (rows past the panel's end: 0)
// Traffic: each element of W is read once per call, and the panel (kc * NR * 4 B) written to L2.
// AVX-512 and AVX2 transpose 16 x 16 (8 x 8) blocks in registers; the generic build copies scalars.
#if defined(NE_ISA_AVX512)
// r[j] lane c -> r[c] lane j, in 64 shuffles.
inline void transpose_block(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // per 128-bit lane L, u[4g + c] holds rows 4g..4g+3 of column 4L + c
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    __m512d a0 = _mm512_castps_pd(t[4 * g]), a1 = _mm512_castps_pd(t[4 * g + 1]);
    __m512d a2 = _mm512_castps_pd(t[4 * g + 2]), a3 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  for (int c = 0; c < 4; ++c) {
    __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);       // g0 L0, g0 L2, g1 L0, g1 L2
    __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);       // g0 L1, g0 L3, g1 L1, g1 L3
    __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);  // g2 .., g3 ..
    __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);       // column c      (lane L0 of every group)
    r[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);   // column 8 + c  (L2)
    r[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);   // column 4 + c  (L1)
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);  // column 12 + c (L3)
  }
}
#define NE_GEMM_VECTOR_PACK 1
#elif defined(NE_ISA_AVX2)
inline void transpose_block(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3; s[4h + c] = column c (low lane) and c + 4 (high lane)
    s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
  }
}
#define NE_GEMM_VECTOR_PACK 1
#endif

// `next` (null: none) is the next panel's block, `next_rows` its rows: its lines are prefetched one
// panel ahead, since W's short row segments (kc elements) give the hardware prefetcher little to go on.
template <class V, class T>
void pack_panel(const T* w, int64_t ldw, int rows, int64_t kc, float* bp, const T* next, int next_rows) {
#if defined(NE_GEMM_VECTOR_PACK)
  using R = typename V::R;
  constexpr int L = V::N;
  for (int j0 = 0; j0 < kNR; j0 += L) {  // L rows of W at a time
    for (int64_t k0 = 0; k0 < kc; k0 += L) {
      const int kt = static_cast<int>(min64(L, kc - k0));
      if (next)
        for (int j = j0; j < j0 + L && j < next_rows; ++j) __builtin_prefetch(next + j * ldw + k0, 0, 2);
      R r[L];
      for (int j = 0; j < L; ++j)
        r[j] = j0 + j < rows ? loadn<V>(w + (j0 + j) * ldw + k0, kt) : V::zero();
      transpose_block(r);
      for (int c = 0; c < kt; ++c) V::store(bp + (k0 + c) * kNR + j0, r[c]);
    }
  }
#else
  for (int64_t k = 0; k < kc; ++k)
    for (int j = 0; j < kNR; ++j) bp[k * kNR + j] = j < rows ? to_f32(w[j * ldw + k]) : 0.0f;
#endif
}

// ---------------------------------------------------------------- micro-kernel
// Where a tile's results land: y[i, j] for i < rows, j < cols, and the epilogue's vectors at the
// tile's first row / column.
struct TileOut {
  float* y;
  int64_t ldy;
  int cols;
  bool load_y;          // add y's current value (a later K block, or accumulate)
  bool last;            // the last K block: apply the column terms below
  const float* bias;    // [cols] or null
  const float* scale;   // [rows] or null: multiplies this block's dot products
  const float* shift;   // [rows] or null: with csum, - scale * shift * csum
  const float* csum;    // [cols]
};

// One MR x NR tile of y over one block of kc columns:
//   acc[i][j] = sum_{k < kc} x[i, k] * bp[k, j*L : (j+1)*L]      (broadcast x, NV vector FMAs each)
//   y[i, :cols] = (y[i, :cols] if load_y) + scale_i * acc  (- scale_i shift_i csum + bias if last)
// Per k: NV aligned loads from the packed panel (L1/L2), MR broadcasts of x (L1), MR * NV FMAs.
// Each output's arithmetic is independent of MR, so any row tiling gives the same bits.
template <class V, int MR>
void tile(int64_t kc, const float* x, int64_t ldx, const float* bp, const TileOut& o) {
  using R = typename V::R;
  constexpr int L = V::N;
  R acc[MR][kNV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNV; ++j) acc[i][j] = V::zero();
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + i * ldx;
  // y's tile is read (or first written) after the k loop: fetch its lines now, so that their latency
  // (L3 or DRAM once y outgrows the L2) hides behind the loop
  for (int i = 0; i < MR; ++i) {
    const char* yi = reinterpret_cast<const char*>(o.y + i * o.ldy);
    for (int b = 0; b < o.cols * 4; b += 64) __builtin_prefetch(yi + b, 1, 3);
    __builtin_prefetch(yi + o.cols * 4 - 1, 1, 3);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    R b[kNV];
    for (int j = 0; j < kNV; ++j) b[j] = V::load(bp + k * kNR + j * L);
    for (int i = 0; i < MR; ++i) {
      const R xi = V::set1(xr[i][k]);
      for (int j = 0; j < kNV; ++j) acc[i][j] = V::fma(xi, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* yi = o.y + i * o.ldy;
    const float s = o.scale ? o.scale[i] : 1.0f;
    const R sv = V::set1(s);
    const R shv = V::set1(o.shift ? -s * o.shift[i] : 0.0f);
    for (int j = 0; j < kNV; ++j) {
      const int w = o.cols - j * L < L ? o.cols - j * L : L;
      if (w <= 0) break;
      R v = o.scale ? V::mul(acc[i][j], sv) : acc[i][j];
      if (o.load_y) v = V::add(loadn<V>(yi + j * L, w), v);
      if (o.last) {
        if (o.shift) v = V::fma(shv, loadn<V>(o.csum + j * L, w), v);
        if (o.bias) v = V::add(v, loadn<V>(o.bias + j * L, w));
      }
      storen<V>(yi + j * L, v, w);
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, const TileOut&);

template <class V, int... I>
struct TileTable {
  static constexpr TileFn fns[sizeof...(I)] = {tile<V, I + 1>...};
};

// tiles[mr - 1]: the kernel for a tile of mr <= MR rows
#if defined(NE_ISA_AVX512)
using Tiles = TileTable<VF, 0, 1, 2, 3, 4, 5, 6, 7>;
#elif defined(NE_ISA_AVX2)
using Tiles = TileTable<VF, 0, 1, 2, 3, 4, 5>;
#else
using Tiles = TileTable<VF, 0, 1, 2, 3>;
#endif
static_assert(sizeof(Tiles::fns) / sizeof(TileFn) == kMR, "one tile kernel per row count");

// ---------------------------------------------------------------- driver
// A thread's block of y: rows [m0, m1), columns of panels [p0, p1) (panel p = columns p*NR ...).
//   for each group of panels (kNC columns), for each K block (kc columns):
//     pack W[group, K block] into bp (L2);  for each row tile: for each panel: tile()
// Traffic: W read once; x read once per panel group (from L2/L3); y written once per K block and
// read back once per K block after the first.
template <class V, class T>
struct Gemm {
  static void block(const GemmArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* bp) {
    const T* W = static_cast<const T*>(a.w);
    const int64_t nkb = cdiv(a.K, kKC), kcb = cdiv(a.K, nkb);  // balanced K blocks
    constexpr int64_t kPanels = kNC / kNR;
    for (int64_t pc = p0; pc < p1; pc += kPanels) {
      const int64_t pe = min64(p1, pc + kPanels);
      for (int64_t k0 = 0; k0 < a.K; k0 += kcb) {
        const int64_t kc = min64(kcb, a.K - k0);
        for (int64_t p = pc; p < pe; ++p) {
          const int rows = static_cast<int>(min64(kNR, a.N - p * kNR));
          const bool more = p + 1 < pe;
          pack_panel<V, T>(W + p * kNR * a.ldw + k0, a.ldw, rows, kc, bp + (p - pc) * kc * kNR,
                           more ? W + (p + 1) * kNR * a.ldw + k0 : nullptr,
                           more ? static_cast<int>(min64(kNR, a.N - (p + 1) * kNR)) : 0);
        }
        TileOut o{};
        o.ldy = a.ldy;
        o.load_y = k0 > 0 || a.accumulate;
        o.last = k0 + kc >= a.K;
        for (int64_t m = m0; m < m1; m += kMR) {
          const TileFn fn = Tiles::fns[min64(kMR, m1 - m) - 1];
          const float* xm = a.x + m * a.ldx + k0;
          o.scale = a.ep.row_scale ? a.ep.row_scale + m : nullptr;
          o.shift = a.ep.row_shift ? a.ep.row_shift + m : nullptr;
          for (int64_t p = pc; p < pe; ++p) {
            const int64_t n = p * kNR;
            o.y = a.y + m * a.ldy + n;
            o.cols = static_cast<int>(min64(kNR, a.N - n));
            o.bias = a.bias ? a.bias + n : nullptr;
            o.csum = a.ep.col_sum ? a.ep.col_sum + n : nullptr;
            fn(kc, xm, a.ldx, bp + (p - pc) * kc * kNR, o);
          }
        }
      }
    }
  }

  // Threads split the panels of N; when there are fewer panels than threads, rows of M too
  // (tasks = row chunk x panel, consecutive tasks share a row chunk).
  static void run(const GemmArgs& a) {
    const int64_t panels = cdiv(a.N, kNR);
    const int threads = a.pack_threads;
    const int64_t mtiles = cdiv(a.M, kMR);
    const int64_t mchunks = panels >= threads ? 1 : min64(mtiles, cdiv(threads, panels));
    const int64_t chunk_rows = cdiv(mtiles, mchunks) * kMR;
    const int64_t tasks = mchunks * panels;
    // at least ~2^20 multiply-adds per thread
    const int64_t task_macs = max64(1, min64(a.M, chunk_rows) * a.K * kNR);
    const int64_t grain = max64(1, (int64_t(1) << 20) / task_macs);
    parallel_for_upto(tasks, grain, threads, [&](int64_t b, int64_t e, int tid) {
      float* bp = a.pack + tid * kPackFloats;
      for (int64_t t = b; t < e;) {
        const int64_t mc = t / panels, p0 = t % panels;
        const int64_t p1 = min64(panels, p0 + (e - t));
        const int64_t m0 = mc * chunk_rows, m1 = min64(a.M, m0 + chunk_rows);
        if (m0 < m1) block(a, m0, m1, p0, p1, bp);
        t += p1 - p0;
      }
    });
  }
};

const GemmTable* gemm_table() {
  static const GemmTable table = {
      {Gemv<VF, float>::run, Gemv<VF, f16>::run, Gemv<VF, bf16>::run},
      {Gemm<VF, float>::run, Gemm<VF, f16>::run, Gemm<VF, bf16>::run},
      kPackFloats,
  };
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne

#if defined(NE_ISA_GENERIC)
// ==================================================================================== entry points
#include <vector>

#include "ops/quant_gemm.h"  // cuda::bf16_linear

namespace ne {
namespace {

// Picked on every call (a few loads and compares), so that force_cpu_isa() takes effect at once.
const GemmTable& cpu_gemm() { return *NE_PICK_ISA(gemm_table); }

// Per-thread packed panels for the GEMM path (`threads` of them), reused across calls (grown, never shrunk).
float* pack_scratch(int64_t floats_per_thread, int threads) {
  thread_local AlignedVec<float> buf;
  const size_t need = static_cast<size_t>(floats_per_thread * threads);
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}

}  // namespace

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, DType wdtype,
              int64_t ldw, const float* bias, float* y, int64_t ldy, bool accumulate, const GemmEpilogue* ep,
              bool bf16_products) {
  if (wdtype != DType::F32 && wdtype != DType::BF16 && wdtype != DType::F16)
    throw DTypeError(std::string("weight: expected float32, bfloat16 or float16, got ") + dtype_name(wdtype));
  if (M <= 0 || N <= 0) return;
  const GemmEpilogue e = ep ? *ep : GemmEpilogue{};
  if (e.row_shift && !e.col_sum) throw ValueError("gemm_f32: the epilogue's row_shift needs col_sum");
  if (K <= 0) {  // empty sum: the epilogue's terms and the bias
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float v = e.row_shift ? -(e.row_scale ? e.row_scale[m] : 1.0f) * e.row_shift[m] * e.col_sum[n] : 0.0f;
        y[m * ldy + n] = (accumulate ? y[m * ldy + n] : 0.0f) + v + (bias ? bias[n] : 0.0f);
      }
    return;
  }
  const GemmTable& t = cpu_gemm();
  GemmArgs a{M, N, K, x, ldx, w, ldw, bias, y, ldy, accumulate, e, nullptr, 0};
  if (bf16_products && gemm_bf16(a, wdtype)) return;
  if (gemv_rows(M, K)) {
    t.gemv[gemm_wslot(wdtype)](a);
  } else {
    a.pack_threads = num_threads();
    a.pack = pack_scratch(t.pack_floats, a.pack_threads);
    t.gemm[gemm_wslot(wdtype)](a);
  }
}

void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y,
            const Ctx& ctx) {
  linear(x, w, bias, y, ctx, nullptr);
}

LinearShape check_linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y) {
  // weight: [N, K] f32 / bf16 / f16, unit stride along K
  if (w.ndim != 2)
    throw ShapeError(std::string(w.name) + ": expected a 2-D tensor [out_features, in_features], got shape " +
                     shape_str(w));
  if (w.dtype != DType::F32 && w.dtype != DType::BF16 && w.dtype != DType::F16)
    throw DTypeError(std::string(w.name) + ": expected float32, bfloat16 or float16, got " + dtype_name(w.dtype));
  check_dtype(x, DType::F32);
  check_same_device(x, w);
  check_same_device(x, y);
  if (bias) check_same_device(x, *bias);
  if (x.ndim == 0) throw ShapeError(std::string(x.name) + ": expected at least one dimension, got a scalar");
  const RowMatrix xr = as_rows(x);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (xr.cols != K)
    throw ShapeError(std::string(x.name) + ": last dimension " + std::to_string(xr.cols) + " does not match " +
                     w.name + "'s in_features " + std::to_string(K) + " (shape " + shape_str(w) + ")");
  if (K > 1 && w.strides[1] != 1)
    throw ShapeError(std::string(w.name) + ": rows must be contiguous (stride 1 along in_features), got stride " +
                     std::to_string(w.strides[1]));
  const int64_t ldw = N > 1 ? w.strides[0] : K;
  if (N > 1 && ldw < K)
    throw ShapeError(std::string(w.name) + ": rows overlap (row stride " + std::to_string(ldw) + " < " +
                     std::to_string(K) + ")");
  if (bias) {
    check_dtype(*bias, DType::F32);
    check_shape_1d(*bias, N);
    if (N > 1 && bias->strides[0] != 1) throw ShapeError(std::string(bias->name) + ": expected a contiguous tensor");
  }
  // out: x's shape with the last dimension N, float32
  check_dtype(y, DType::F32);
  bool shape_ok = y.ndim == x.ndim && y.shape[y.ndim - 1] == N;
  for (int i = 0; shape_ok && i < x.ndim - 1; ++i) shape_ok = y.shape[i] == x.shape[i];
  if (!shape_ok) {
    TensorView want = x;
    want.shape[want.ndim - 1] = N;
    throw ShapeError(std::string(y.name) + ": expected shape " + shape_str(want) + ", got " + shape_str(y));
  }
  return LinearShape{xr, as_rows(y), N, K, ldw};
}

#if defined(NE_WITH_CUDA)
cuda::DenseLinearArgs cuda::dense_args(const LinearShape& L, const TensorView& w, const TensorView* bias) {
  return dense_args(L.x.rows, L.N, L.K, static_cast<const float*>(L.x.data), L.x.ld, w.data, w.dtype, L.ldw,
                    bias ? static_cast<const float*>(bias->data) : nullptr, static_cast<float*>(L.y.data), L.y.ld);
}
#endif

void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y, const Ctx& ctx,
            const GemmEpilogue* ep, bool bf16_products) {
  const LinearShape L = check_linear(x, w, bias, y);
  if (x.device.type == DeviceType::CUDA) {
#if defined(NE_WITH_CUDA)
    // cuda/gemm.cu (fp32 FMA sums); "medium" with bfloat16 weights: the tensor cores (cuda/quant_gemm.cu)
    if (ep) throw Error("linear: GEMM epilogues on CUDA tensors go through norm_linear");
    const cuda::DenseLinearArgs a = cuda::dense_args(L, w, bias);
    if (bf16_products && w.dtype == DType::BF16 && L.x.rows > cuda::kDenseGemvMaxRows &&
        cuda::bf16_linear(a.M, a.N, a.K, a.x, a.ldx, a.w, a.ldw, a.bias, a.y, a.ldy, false, ctx.cuda_stream))
      return;
    return cuda::dense_linear(a, ctx.cuda_stream);
#else
    throw DeviceError(std::string(x.name) + ": normengine was built without CUDA");
#endif
  }
  gemm_f32(L.x.rows, L.N, L.K, static_cast<const float*>(L.x.data), L.x.ld, w.data, w.dtype, L.ldw,
           bias ? static_cast<const float*>(bias->data) : nullptr, static_cast<float*>(L.y.data), L.y.ld, false, ep,
           bf16_products);
}

}  // namespace ne
#endif  // NE_ISA_GENERIC
