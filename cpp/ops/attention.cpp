// Causal softmax attention over a KV cache, rotary position embedding and the MLP activations: the
// per-token kernels of the transformer runner (CPU), compiled once per ISA.
//
// Attention, for query row t of head h (kv head g = h / (n_heads / n_kv_heads), grouped-query):
//   s_j = scale * q_t . k_j            for j = 0..pos_t          (keys of t's own sequence)
//   p_j = exp(s_j - max s) / sum exp(s - max s)
//   o_t = sum_j p_j v_j
// computed with the running max / running sum of online softmax (Milakov & Gimelshein 2018, as
// flash attention): over blocks of keys, m' = max(m, max_j s_j), c = exp(m - m'), l = c l + sum_j
// exp(s_j - m'), o = c o + sum_j exp(s_j - m') v_j, and at the end o / l. Two schedules:
//   prefill (runs of consecutive tokens of one sequence): the lanes of a vector are up to N
//     queries of one head, so every step is lane-wise (no horizontal sums): s[j] = sum_d K[j][d]
//     Q[d] with Q transposed once per block, and O[d] += V[j][d] p[j], O transposed likewise;
//   decode (every query alone): the keys are split across the threads (each streams a contiguous
//     range of the cache, every head of it) and the partial (m, l, o) merged: reading the cache once
//     at the memory's pace, whatever the number of heads.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/aligned.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "normengine/ops.h"
#include "ops/attention.h"
#include "ops/gated.h"

namespace ne {
namespace NE_ISA_NS {

namespace {

using R = VF::R;
constexpr int N = VF::N;
constexpr int kBK = 64;  // keys per block (prefill: their scores, kBK x N floats, stay in the L1)

inline int width(int64_t n, int64_t i) { return n - i < N ? static_cast<int>(n - i) : N; }

// ---------------------------------------------------------------- prefill: lanes are queries
// Queries t0 .. t0 + n - 1 (n <= N, positions p0 .. p0 + n - 1, one sequence) of head h. Lane i of
// every vector belongs to query t0 + i; lanes past n hold zero queries and are dropped at the end.
// ws: (2 D + kBK) N + 2 kBK D floats of the calling thread. T: the cache's element type (float; bf16, or
// int8 times its row's scale: each block of K and V rows is widened once into ws, then read as float).
constexpr int kWidenAhead = 8;  // rows of a 16-bit / 8-bit cache prefetched ahead of their widening

template <class T>
void attend_block(const AttnArgs& a, const T* const* kc, const T* const* vc, int64_t t0, int n, int h, float* ws) {
  const int D = a.head_dim, g = h / (a.n_heads / a.n_kv_heads);
  const int64_t ldkv = static_cast<int64_t>(a.n_kv_heads) * D;
  const T* K = kc[t0] + static_cast<int64_t>(g) * D;
  const T* V = vc[t0] + static_cast<int64_t>(g) * D;
  const int64_t p0 = a.pos[t0], L = p0 + n;  // keys first_key(p0) .. p0 + n - 1
  // (with a window, lane i's first key is first_key(p0 + i) <= first_key(p0) + i: within the first
  // block, as its own key is when there is no window)
  float* Qt = ws;             // [D][N]: Qt[d][i] = scale * q_{t0+i}[d]
  float* Ot = Qt + D * N;     // [D][N]: the running sum of p v, per lane
  float* S = Ot + D * N;      // [kBK][N]: one block's scores, then its p
  float* Kf = S + kBK * N;    // [kBK][D], [kBK][D]: a bf16 cache's block, widened
  float* Vf = Kf + kBK * D;
  for (int d = 0; d < D; ++d)
    for (int i = 0; i < N; ++i)
      Qt[d * N + i] = i < n ? a.scale * a.q[(t0 + i) * a.ldq + static_cast<int64_t>(h) * D + d] : 0.0f;
  for (int i = 0; i < D * N; ++i) Ot[i] = 0.0f;
  R m = VF::set1(-__builtin_inff()), l = VF::zero();
  for (int64_t j0 = first_key(p0, a.window), nb = 0; j0 < L; j0 += nb) {
    // keys j0 .. j0 + bk - 1: at most kBK, and (a ring cache) none past the ring's end
    nb = contiguous_keys(j0, std::min<int64_t>(kBK, L - j0), a.ring);
    const int bk = static_cast<int>(nb);
    const int64_t r0 = key_row(j0, a.ring);  // their first cache row
    const float *Kb, *Vb;  // the block's rows, `ldb` floats apart
    int64_t ldb;
    if constexpr (std::is_same_v<T, float>) {
      Kb = K + r0 * ldkv, Vb = V + r0 * ldkv, ldb = ldkv;
    } else {
      for (int r = 0; r < bk; ++r) {
        if (r + kWidenAhead < bk) {  // (rows ldkv apart: a line or two of each, which the prefetcher misses)
          __builtin_prefetch(K + (r0 + r + kWidenAhead) * ldkv, 0, 3);
          __builtin_prefetch(V + (r0 + r + kWidenAhead) * ldkv, 0, 3);
        }
        R ks = VF::set1(1.f), vs = ks;  // int8: row r0 + r's scales for kv head g
        if constexpr (std::is_same_v<T, int8_t>) {
          ks = VF::set1(a.ks[t0][(r0 + r) * a.n_kv_heads + g]);
          vs = VF::set1(a.vs[t0][(r0 + r) * a.n_kv_heads + g]);
        }
        for (int d0 = 0; d0 < D; d0 += N) {
          const int k = width(D, d0);
          storen<VF>(Kf + r * D + d0, VF::mul(loadn<VF>(K + (r0 + r) * ldkv + d0, k), ks), k);
          storen<VF>(Vf + r * D + d0, VF::mul(loadn<VF>(V + (r0 + r) * ldkv + d0, k), vs), k);
        }
      }
      Kb = Kf, Vb = Vf, ldb = D;
    }
    // s[j] = K[j] . Q, eight keys at a time (each Q vector loaded once for the eight; eight
    // independent FMA chains keep both FMA ports busy through the FMA latency)
    int jj = 0;
    for (; jj + 8 <= bk; jj += 8) {
      const float* k0 = Kb + jj * ldb;
      R sk[8];
      for (int e = 0; e < 8; ++e) sk[e] = VF::zero();
      for (int d = 0; d < D; ++d) {
        const R qd = VF::load(Qt + d * N);
        for (int e = 0; e < 8; ++e) sk[e] = VF::fma(VF::set1(k0[e * ldb + d]), qd, sk[e]);
      }
      for (int e = 0; e < 8; ++e) VF::store(S + (jj + e) * N, sk[e]);
    }
    for (; jj < bk; ++jj) {
      const float* kj = Kb + jj * ldb;
      R sj = VF::zero();
      for (int d = 0; d < D; ++d) sj = VF::fma(VF::set1(kj[d]), VF::load(Qt + d * N), sj);
      VF::store(S + jj * N, sj);
    }
    softcap_scores(S, static_cast<int64_t>(bk) * N, a.softcap);
    // causal: key j is visible to lane i when j <= p0 + i (the block's keys only: a block of queries
    // that does not start at a multiple of kBK spans two key blocks)
    for (int64_t j = j0 + bk - 1; j > p0 && j >= j0; --j)
      for (int64_t i = 0; i < j - p0 && i < N; ++i) S[(j - j0) * N + i] = -__builtin_inff();
    // sliding window W: key j is out of lane i's window when j <= p0 + i - W, i.e. i >= j - p0 + W
    if (a.window > 0)
      for (int64_t j = j0; j < j0 + bk && j < p0 + N - a.window; ++j)
        for (int64_t i = std::max<int64_t>(j - p0 + a.window, 0); i < N; ++i) S[(j - j0) * N + i] = -__builtin_inff();
    // online softmax, lane by lane
    R mb = VF::load(S);
    for (jj = 1; jj < bk; ++jj) mb = VF::max(VF::load(S + jj * N), mb);
    // A lane may have no visible key yet (a window's first block cut short by a ring cache's end): mn
    // floored at -FLT_MAX keeps exp(m - mn) and its p at 0 instead of exp(-inf + inf) = NaN; a lane's
    // own key is always visible, so every lane ends with l > 0. (max(floor, mn) is mn where mn is NaN.)
    const R mn = VF::max(VF::set1(-3.4028235e38f), VF::max(mb, m));
    const R c = vexp(VF::sub(m, mn));
    m = mn;
    l = VF::mul(l, c);
    for (int d = 0; d < D; ++d) VF::store(Ot + d * N, VF::mul(VF::load(Ot + d * N), c));
    for (jj = 0; jj < bk; ++jj) {
      const R p = vexp(VF::sub(VF::load(S + jj * N), mn));
      VF::store(S + jj * N, p);
      l = VF::add(l, p);
    }
    // O[d] += V[j][d] p[j], eight output dimensions at a time in registers
    int d0 = 0;
    for (; d0 + 8 <= D; d0 += 8) {
      R o[8];
      for (int e = 0; e < 8; ++e) o[e] = VF::load(Ot + (d0 + e) * N);
      for (jj = 0; jj < bk; ++jj) {
        const float* vj = Vb + jj * ldb + d0;
        const R p = VF::load(S + jj * N);
        for (int e = 0; e < 8; ++e) o[e] = VF::fma(VF::set1(vj[e]), p, o[e]);
      }
      for (int e = 0; e < 8; ++e) VF::store(Ot + (d0 + e) * N, o[e]);
    }
    for (; d0 < D; ++d0) {
      R o = VF::load(Ot + d0 * N);
      for (jj = 0; jj < bk; ++jj) o = VF::fma(VF::set1(Vb[jj * ldb + d0]), VF::load(S + jj * N), o);
      VF::store(Ot + d0 * N, o);
    }
  }
  alignas(64) float lsum[N];
  VF::store(lsum, l);
  for (int i = 0; i < n; ++i) {
    float* o = a.out + (t0 + i) * a.ldo + static_cast<int64_t>(h) * D;
    const float inv = 1.0f / lsum[i];
    for (int d = 0; d < D; ++d) o[d] = Ot[d * N + i] * inv;
  }
}

// ---------------------------------------------------------------- decode: keys split across threads
template <class T>
inline float dot(const float* a, const T* b, int n) {
  R acc0 = VF::zero(), acc1 = VF::zero();
  int i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    acc0 = VF::fma(VF::load(a + i), VF::load(b + i), acc0);
    acc1 = VF::fma(VF::load(a + i + N), VF::load(b + i + N), acc1);
  }
  for (; i < n; i += N) {
    int k = width(n, i);
    acc0 = VF::fma(loadn<VF>(a + i, k), loadn<VF>(b + i, k), acc0);
  }
  return static_cast<float>(VF::reduce(VF::add(acc0, acc1)));
}

// While key row jj's scores are computed: the K row kAheadBytes further on (the cache holds one
// sequence's rows back to back, so that is a later key, in this block or the next) and V row jj (read
// by the p v stage right after this block's scores) are prefetched, the K stream ahead of the hardware
// prefetcher, which stops at 4 KiB pages.
constexpr int64_t kAheadBytes = 4096;
template <class T>
inline void prefetch_rows(const T* krow, const T* vrow, int64_t ld) {
  const char* kp = reinterpret_cast<const char*>(krow) + kAheadBytes;
  const char* vp = reinterpret_cast<const char*>(vrow);
  const int64_t bytes = ld * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(kp + b, 0, 2);
    __builtin_prefetch(vp + b, 0, 2);
  }
}

// s[h * kBK + jj] = scale * q_h . k[jj * ldk + g(h) D + 0 .. D) for the keys jj < bk of a block and
// every head h (kv head g(h) = h / group). Each kv head's key row is loaded once (DV = D / N vectors
// in registers) for the `group` query heads reading it; the products of vector c go to accumulator
// c % 2 and the two are summed once, as dot() does: the same sums either way.
template <int DV, class T>
void scores_regs(const float* q, const T* k, const T* v, int64_t ldk, int bk, int n_kv, int group, float scale,
                 float* s) {
  constexpr int D = DV * N;
  for (int jj = 0; jj < bk; ++jj) {
    const T* kr = k + jj * ldk;
    prefetch_rows(kr, v + jj * ldk, ldk);
    for (int g = 0, h = 0; g < n_kv; ++g) {
      R kv[DV];
      for (int c = 0; c < DV; ++c) kv[c] = VF::load(kr + g * D + c * N);
      for (int e = 0; e < group; ++e, ++h) {
        const float* qh = q + static_cast<int64_t>(h) * D;
        R acc[2] = {VF::zero(), VF::zero()};
        for (int c = 0; c < DV; ++c) acc[c % 2] = VF::fma(VF::load(qh + c * N), kv[c], acc[c % 2]);
        s[h * kBK + jj] = scale * static_cast<float>(VF::reduce(VF::add(acc[0], acc[1])));
      }
    }
  }
}

// f(std::integral_constant<int, DV>{}) for DV = D / N when that is 1, 2, 4 or 8 (a head_dim of whole
// vectors that fit in registers); false, and f not called, for any other D.
template <class F>
bool with_vectors(int D, F&& f) {
  if (D % N != 0) return false;
  switch (D / N) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

template <class T>
void scores(const float* q, const T* k, const T* v, int64_t ldk, int bk, int n_kv, int group, int D, float scale,
            float* s) {
  if (with_vectors(D, [&](auto dv) { scores_regs<decltype(dv)::value>(q, k, v, ldk, bk, n_kv, group, scale, s); }))
    return;
  for (int jj = 0; jj < bk; ++jj) {
    prefetch_rows(k + jj * ldk, v + jj * ldk, ldk);
    for (int g = 0, h = 0; g < n_kv; ++g)
      for (int e = 0; e < group; ++e, ++h)
        s[h * kBK + jj] = scale * dot(q + static_cast<int64_t>(h) * D, k + jj * ldk + static_cast<int64_t>(g) * D, D);
  }
}

// o[0 .. D) += sum_jj p[jj] v[jj * ldv + 0 .. D), jj = 0 .. bk - 1 in order. DV = D / N vectors of o
// stay in registers over the block (the generic form below loads and stores them per key); the
// same fused multiply-adds in the same order either way.
template <int DV, class T>
void pv_regs(const float* p, const T* v, int64_t ldv, int bk, float* o) {
  R acc[DV];
  for (int c = 0; c < DV; ++c) acc[c] = VF::load(o + c * N);
  for (int jj = 0; jj < bk; ++jj) {
    const R pj = VF::set1(p[jj]);
    const T* vr = v + jj * ldv;
    for (int c = 0; c < DV; ++c) acc[c] = VF::fma(pj, VF::load(vr + c * N), acc[c]);
  }
  for (int c = 0; c < DV; ++c) VF::store(o + c * N, acc[c]);
}

template <class T>
void pv(const float* p, const T* v, int64_t ldv, int bk, int D, float* o) {
  if (with_vectors(D, [&](auto dv) { pv_regs<decltype(dv)::value>(p, v, ldv, bk, o); })) return;
  for (int jj = 0; jj < bk; ++jj) {
    const R pj = VF::set1(p[jj]);
    const T* vr = v + jj * ldv;
    for (int d0 = 0; d0 < D; d0 += N) {
      const int k = width(D, d0);
      storen<VF>(o + d0, VF::fma(pj, loadn<VF>(vr + d0, k), loadn<VF>(o + d0, k)), k);
    }
  }
}

// An int8 cache's block: s[h * kBK + jj] *= scale[jj * n_kv + g(h)], each head's row times its kv head's scales.
inline void scale_by_row(float* s, const float* scale, int bk, int n_kv, int group) {
  for (int g = 0, h = 0; g < n_kv; ++g)
    for (int e = 0; e < group; ++e, ++h)
      for (int jj = 0; jj < bk; ++jj) s[h * kBK + jj] *= scale[jj * n_kv + g];
}

// Keys [j0, j1) of token t for every head, folded into this thread's partial state per head:
// part[h * (D + 2)] = m, then l, then o[0 .. D). Per block of kBK keys: the scores, reading the K
// rows in order (each holds every head; the next rows and the block's V rows prefetched meanwhile),
// then p v head by head over the block's V rows, now in the cache.
// s: n_heads * kBK floats.
template <class T>
void decode_range(const AttnArgs& a, const T* const* kc, const T* const* vc, int64_t t, int64_t j0, int64_t j1,
                  float* part, float* s) {
  const int D = a.head_dim, H = a.n_heads, group = a.n_heads / a.n_kv_heads;
  const int64_t ldkv = static_cast<int64_t>(a.n_kv_heads) * D;
  const float* q = a.q + t * a.ldq;
  for (int64_t b0 = j0, nb = 0; b0 < j1; b0 += nb) {
    nb = contiguous_keys(b0, std::min<int64_t>(kBK, j1 - b0), a.ring);  // (not past a ring cache's end)
    const int bk = static_cast<int>(nb);
    const int64_t r0 = key_row(b0, a.ring);
    // s[h][jj] = scale * q_h . K[b0 + jj][g(h)]
    scores(q, kc[t] + r0 * ldkv, vc[t] + r0 * ldkv, ldkv, bk, a.n_kv_heads, group, D, a.scale, s);
    const float *ks = nullptr, *vs = nullptr;  // int8: the block's rows' scales [bk][n_kv_heads]
    if constexpr (std::is_same_v<T, int8_t>) {
      ks = a.ks[t] + r0 * a.n_kv_heads, vs = a.vs[t] + r0 * a.n_kv_heads;
      scale_by_row(s, ks, bk, a.n_kv_heads, group);  // s = scale (q . k8) k_scale
    }
    if (a.softcap > 0)
      for (int h = 0; h < H; ++h) softcap_scores(s + h * kBK, bk, a.softcap);
    // per head: m' = max(m, max s), c = exp(m - m'), p = exp(s - m'), l = c l + sum p, o = c o
    for (int h = 0; h < H; ++h) {
      float* st = part + static_cast<int64_t>(h) * (D + 2);
      float* sh = s + h * kBK;
      float mx = st[0];
      for (int jj = 0; jj < bk; ++jj) mx = sh[jj] > mx ? sh[jj] : mx;
      const float c = std::exp(st[0] - mx);  // 0 on the first block (st[0] = -inf)
      st[0] = mx;
      R sum = VF::zero();
      const R mxv = VF::set1(mx);
      for (int jj = 0; jj < bk; jj += N) {
        const int k = width(bk, jj);
        const R e = VF::keep(vexp(VF::sub(loadn<VF>(sh + jj, k), mxv)), k);
        storen<VF>(sh + jj, e, k);
        sum = VF::add(sum, e);
      }
      st[1] = st[1] * c + static_cast<float>(VF::reduce(sum));
      float* o = st + 2;
      for (int d0 = 0; d0 < D; d0 += N) {
        const int k = width(D, d0);
        storen<VF>(o + d0, VF::mul(loadn<VF>(o + d0, k), VF::set1(c)), k);
      }
    }
    // o_h += p[h][jj] V[b0 + jj][g(h)], jj in order, head by head (int8: p times the V rows' scales, l kept)
    if constexpr (std::is_same_v<T, int8_t>) scale_by_row(s, vs, bk, a.n_kv_heads, group);
    const T* vb = vc[t] + r0 * ldkv;
    for (int g = 0, h = 0; g < a.n_kv_heads; ++g)
      for (int e = 0; e < group; ++e, ++h)
        pv(s + h * kBK, vb + static_cast<int64_t>(g) * D, ldkv, bk, D, part + static_cast<int64_t>(h) * (D + 2) + 2);
  }
}

// Partial states [n][H][D + 2] with m = -inf, l = 0, o = 0.
void init_parts(float* P, int n, int H, int D) {
  for (int64_t i = 0; i < static_cast<int64_t>(n) * H * (D + 2); ++i) P[i] = 0.0f;
  for (int64_t i = 0; i < static_cast<int64_t>(n) * H; ++i) P[i * (D + 2)] = -__builtin_inff();
}

// Token t's output from n partial states: o = sum_i exp(m_i - M) o_i / sum_i exp(m_i - M) l_i.
void merge_parts(const AttnArgs& a, int64_t t, const float* P, int n) {
  const int D = a.head_dim, H = a.n_heads;
  const int64_t stride = static_cast<int64_t>(H) * (D + 2);
  for (int h = 0; h < H; ++h) {
    float M = -__builtin_inff();
    for (int i = 0; i < n; ++i) {
      const float mi = P[i * stride + h * (D + 2)];
      M = mi > M ? mi : M;
    }
    float* o = a.out + t * a.ldo + static_cast<int64_t>(h) * D;
    for (int d = 0; d < D; ++d) o[d] = 0.0f;
    float lsum = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float* st = P + i * stride + h * (D + 2);
      if (st[0] == -__builtin_inff()) continue;  // a part that had no keys
      const float w = std::exp(st[0] - M);
      lsum += w * st[1];
      for (int d = 0; d < D; ++d) o[d] += w * st[2 + d];
    }
    const float inv = 1.0f / lsum;
    for (int d = 0; d < D; ++d) o[d] *= inv;
  }
}

// Blocks of kBK keys per thread, at least this many (short caches stay on one thread).
constexpr int64_t kDecodeGrain = 1;

// One token, its keys (first_key .. pos) split across the threads.
template <class T>
void decode_token(const AttnArgs& a, const T* const* kc, const T* const* vc, int64_t t) {
  const int D = a.head_dim, H = a.n_heads;
  const int64_t L = static_cast<int64_t>(a.pos[t]) + 1, J = first_key(a.pos[t], a.window);
  const int64_t stride = static_cast<int64_t>(H) * (D + 2);
  const int threads = num_threads();
  thread_local Vec<float> parts;
  parts.resize(static_cast<size_t>(threads * stride));
  float* P = parts.data();
  init_parts(P, threads, H, D);
  parallel_for_upto((L - J + kBK - 1) / kBK, kDecodeGrain, threads, [&](int64_t b0, int64_t b1, int tid) {
    thread_local Vec<float> s;
    s.resize(static_cast<size_t>(a.n_heads) * kBK);
    decode_range(a, kc, vc, t, J + b0 * kBK, J + b1 * kBK < L ? J + b1 * kBK : L, P + tid * stride, s.data());
  });
  merge_parts(a, t, P, threads);
}

// Several tokens (a batch of sequences at decode) whose caches are too short to split: the threads
// take whole tokens.
template <class T>
void decode_tokens(const AttnArgs& a, const T* const* kc, const T* const* vc) {
  parallel_for(a.n_tokens, 1, [&](int64_t t0, int64_t t1, int) {
    thread_local Vec<float> part, s;
    part.resize(static_cast<size_t>(a.n_heads) * (a.head_dim + 2));
    s.resize(static_cast<size_t>(a.n_heads) * kBK);
    for (int64_t t = t0; t < t1; ++t) {
      init_parts(part.data(), 1, a.n_heads, a.head_dim);
      decode_range(a, kc, vc, t, first_key(a.pos[t], a.window), static_cast<int64_t>(a.pos[t]) + 1, part.data(),
                   s.data());
      merge_parts(a, t, part.data(), 1);
    }
  });
}

template <class T>
void attention_t(const AttnArgs& a, const T* const* kc, const T* const* vc) {
  // runs of consecutive tokens of one sequence, at most N per block
  thread_local Vec<std::pair<int64_t, int>> blocks;
  blocks.clear();
  bool single = true;
  for (int64_t t = 0; t < a.n_tokens; ++t) {
    if (!blocks.empty()) {
      auto& b = blocks.back();
      const int64_t last = b.first + b.second - 1;
      if (b.second < N && kc[t] == kc[last] && vc[t] == vc[last] && a.pos[t] == a.pos[last] + 1) {
        ++b.second;
        single = false;
        continue;
      }
    }
    blocks.emplace_back(t, 1);
  }
  if (single) {  // decode: one query per sequence
    int64_t longest = 0;
    for (int64_t t = 0; t < a.n_tokens; ++t) {
      const int64_t keys = a.pos[t] + 1 - first_key(a.pos[t], a.window);
      longest = keys > longest ? keys : longest;
    }
    if (a.n_tokens > 1 && plan_threads((longest + kBK - 1) / kBK, kDecodeGrain) < 2) {
      decode_tokens(a, kc, vc);
    } else {
      for (int64_t t = 0; t < a.n_tokens; ++t) decode_token(a, kc, vc, t);
    }
    return;
  }
  // (block, head) items; blocks taken from both ends alternately, so that each thread's contiguous
  // range of items mixes short (early) and long (late) causal rows
  const int64_t nb = static_cast<int64_t>(blocks.size()), H = a.n_heads;
  const auto* bl = blocks.data();
  parallel_for(nb * H, 1, [&](int64_t w0, int64_t w1, int) {
    thread_local Vec<float> ws;
    ws.resize(static_cast<size_t>((2 * a.head_dim + kBK) * N + 2 * kBK * a.head_dim));
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t u = w / H, b = (u % 2 == 0) ? u / 2 : nb - 1 - u / 2;
      attend_block(a, kc, vc, bl[b].first, bl[b].second, static_cast<int>(w % H), ws.data());
    }
  });
}

void attention(const AttnArgs& a) {
  if (a.k8) attention_t<int8_t>(a, a.k8, a.v8);
  else if (a.k16) attention_t<bf16>(a, a.k16, a.v16);
  else attention_t<float>(a, a.k, a.v);
}

void rope(const RopeArgs& a) {
  const int half = (a.rot_dim > 0 ? a.rot_dim : a.head_dim) / 2;
  parallel_for(a.n_tokens, 16, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = a.cos + static_cast<int64_t>(a.pos[t]) * half;
      const float* s = a.sin + static_cast<int64_t>(a.pos[t]) * half;
      for (int h = 0; h < a.n_heads; ++h) {
        float* x = a.x + t * a.ldx + static_cast<int64_t>(h) * a.head_dim;
        if (a.norm_w) {  // x <- x / sqrt(mean(x^2) + eps) * g
          R ss = VF::zero();
          for (int i = 0; i < a.head_dim; i += N) {
            R v = loadn<VF>(x + i, width(a.head_dim, i));
            ss = VF::fma(v, v, ss);
          }
          const float r = static_cast<float>(1.0 / std::sqrt(VF::reduce(ss) / a.head_dim + a.norm_eps));
          for (int i = 0; i < a.head_dim; i += N) {
            int k = width(a.head_dim, i);
            storen<VF>(x + i, VF::mul(VF::mul(loadn<VF>(x + i, k), VF::set1(r)), loadn<VF>(a.norm_w + i, k)), k);
          }
        }
        for (int i = 0; i < half; i += N) {
          int k = width(half, i);
          R x1 = loadn<VF>(x + i, k), x2 = loadn<VF>(x + half + i, k);
          R cv = loadn<VF>(c + i, k), sv = loadn<VF>(s + i, k);
          storen<VF>(x + i, VF::sub(VF::mul(x1, cv), VF::mul(x2, sv)), k);
          storen<VF>(x + half + i, VF::fma(x1, sv, VF::mul(x2, cv)), k);
        }
      }
    }
  });
}

// The MLP activation of the runner: the gated-activation kernel of ops/gated.cpp (float32 rows, in place
// where out is a or b).
void activation(const ActArgs& a) {
  auto rows = [&](const float* p, int64_t ld) {
    RowMatrix m;
    if (!p) return m;  // (b absent: not gated)
    m.data = const_cast<float*>(p);
    m.dtype = DType::F32;
    m.rows = a.rows;
    m.cols = a.n;
    m.ld = ld;
    return m;
  };
  GatedArgs g{};
  g.act = static_cast<int>(a.act);
  g.a = rows(a.a, a.lda);
  g.b = rows(a.b, a.ldb);
  g.y = rows(a.out, a.ldo);
  gated_table()->forward[0](g);
}

// One head's row of K or V into an int8 KV cache (ModelSpec::kv_int8): s = max_d |x_d| / 127 and
// q_d = round(x_d / s) to nearest even (|x_d - s q_d| <= s / 2); returns s. A row of zeros: s = 0 and zeros;
// a row holding NaN or Inf: s = NaN (and zeros), so that attention over it yields NaN as from a float32 cache.
// Rounding without a conversion instruction: x_d / s + 1.5 * 2^23 is a float whose ulp is 1 (the addition
// rounds to nearest even), so its lowest 8 bits are round(x_d / s) mod 256, the int8 two's complement of the
// rounded value (|x_d / s| <= 127).
float quantize_row_int8(const float* x, int n, int8_t* q, float* t) {
  const R zero = VF::zero();
  R amax = zero, nonfinite = zero;  // x - x: 0, or NaN where x is NaN or Inf
  for (int i = 0; i < n; i += N) {
    const int k = width(n, i);
    const R v = loadn<VF>(x + i, k);
    amax = VF::max(amax, VF::max(v, VF::sub(zero, v)));
    nonfinite = VF::add(nonfinite, VF::sub(v, v));
  }
  alignas(64) float lanes[N];
  VF::store(lanes, amax);
  float m = 0.f;
  for (int i = 0; i < N; ++i) m = lanes[i] > m ? lanes[i] : m;
  const bool finite = VF::reduce(nonfinite) == 0.0;
  if (!finite || m == 0.f) {
    for (int i = 0; i < n; ++i) q[i] = 0;
    return finite ? 0.f : __builtin_nanf("");
  }
  const R inv = VF::set1(127.f / m), magic = VF::set1(12582912.f);
  for (int i = 0; i < n; i += N) VF::store(t + i, VF::add(VF::mul(loadn<VF>(x + i, width(n, i)), inv), magic));
  for (int i = 0; i < n; ++i) {
    uint32_t b;
    __builtin_memcpy(&b, t + i, 4);
    q[i] = static_cast<int8_t>(b & 0xffu);
  }
  return m / 127.f;
}

// Rows x[h * D .. (h + 1) D) of heads h < n_heads (one token's K or V) into q at the same offsets, their
// scales into scale[h].
void quantize_int8(const float* x, int n_heads, int D, int8_t* q, float* scale) {
  thread_local Vec<float> t;
  t.resize(static_cast<size_t>(D) + N);
  for (int h = 0; h < n_heads; ++h) {
    const int64_t at = static_cast<int64_t>(h) * D;
    scale[h] = quantize_row_int8(x + at, D, q + at, t.data());
  }
}

}  // namespace

const AttentionTable* attention_table() {
  static const AttentionTable table = {attention, rope, activation, quantize_int8};
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne
