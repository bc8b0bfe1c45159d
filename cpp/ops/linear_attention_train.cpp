// CPU training kernels of the linear-attention family (ops/linear_attention.h), compiled once per ISA
// (NE_KERNEL_SOURCES): the chunkwise-parallel form of flash-linear-attention, float32 accumulation.
//
// Per (batch, head), with f the feature map, fk1 = [f(k); 1], v1 = [v; 1], W = Dv + 1 and lambda the
// head's decay (1 without one), the state after token t is
//   S'_t = lambda S'_{t-1} + fk1_t v1_t^T                                   [Dk + 1, W]
// and o_t = readout(r_t, Sk_t), r_t = f(q_t)^T S'_t[:Dk], Sk_t = S'_t[Dk] (sum v, count).
// Causal, per chunk of L <= C tokens (i, j = 0..L-1 inside the chunk), P = the state before it:
//   A_ij  = lambda^(i-j) f(q_i) . f(k_j)            (j <= i, else 0)
//   r_i   = sum_j A_ij v1_j + lambda^(i+1) f(q_i)^T P[:Dk]
//   Sk_i  = lambda Sk_{i-1} + v1_i,  Sk_{-1} = P[Dk]
//   P'    = lambda^L P + sum_j lambda^(L-1-j) fk1_j v1_j^T
// Non-causal: S' = S'_0 + sum_j fk1_j v1_j^T over all tokens, then r_i = f(q_i)^T S'[:Dk], Sk_i = S'[Dk].
//
// Backward. With dr_i, dSk_i the gradients of the readout wrt r_i, Sk_i (readout_backward below),
// X the gradient wrt the state after the chunk (the final-state gradient for the last chunk),
//   B_ij  = lambda^(i-j) dr_i . v1_j                 (j <= i, else 0)
//   df(q_i) = sum_j B_ij f(k_j) + lambda^(i+1) P[:Dk] dr_i
//   df(k_j) = sum_i B_ij f(q_i) + lambda^(L-1-j) X[:Dk] v1_j
//   dv1_j   = sum_i A_ij dr_i + sum_{i>=j} lambda^(i-j) dSk_i + lambda^(L-1-j) X^T fk1_j
//   dP      = lambda^L X + [sum_i lambda^(i+1) f(q_i) dr_i^T ; sum_i lambda^(i+1) dSk_i]
// and dP is X for the chunk before; after chunk 0 it is the gradient of the initial state. The chunk
// states P are recomputed by a forward sweep (one [Dk+1, W] state kept per chunk). Non-causal: with
// G = dS'_final + sum_i ([f(q_i); 0] dr_i^T + e_Dk dSk_i^T): df(q_i) = S'[:Dk] dr_i, df(k_j) = G[:Dk] v1_j,
// dv1_j = G^T fk1_j, dS'_0 = G. Finally dq = f'(q) df(q), dk = f'(k) df(k).
//
// Every product goes through one small-matrix routine (mm: register tiles of GCC vector-extension
// values sized for the ISA this file is compiled for, plain loops at the edges); the other loops run
// over contiguous float rows with the innermost loop over columns, so they auto-vectorize. Every loop
// carries the formula it computes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/aligned.h"
#include "core/half.h"
#include "ops/linear_attention.h"
#include "ops/linear_attention_readout.h"

namespace ne {
namespace NE_ISA_NS {
namespace {

constexpr int kC = 64;  // tokens per chunk

// ------------------------------------------------------------------------------ small products
// One SIMD register of floats as a value (GCC vector extension), sized for the ISA this file is
// compiled for; loaded and stored with memcpy (any alignment).
#if defined(NE_ISA_AVX512)
constexpr int kLanes = 16, kR = 8, kV = 1;  // register tile: 8 rows x 16 columns (8 of the 32 zmm)
#elif defined(NE_ISA_AVX2)
constexpr int kLanes = 8, kR = 4, kV = 2;   // 4 rows x 16 columns (8 of the 16 ymm)
#else
constexpr int kLanes = 4, kR = 4, kV = 2;   // 4 rows x 8 columns (8 of the 16 xmm)
#endif
typedef float vecf __attribute__((vector_size(kLanes * sizeof(float))));
inline vecf loadv(const float* p) { vecf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storev(float* p, vecf v) { std::memcpy(p, &v, sizeof v); }

// C[i, n] (+)= sum_k A(i, k) B[k, n] with A(i, k) = A[i * sai + k * sak] (i < M, n < N, k < K; B and C
// row-major with leading dims ldb, ldc). Register tiles of kR rows x kN columns: the sums stay in
// registers across the k loop (per k: kV vector loads of B and kR broadcasts of A); edge rows and
// columns take the plain loop (whose inner loop over n vectorizes).
void mm(int M, int N, int K, const float* __restrict A, int64_t sai, int64_t sak, const float* __restrict B, int ldb,
        float* __restrict C, int ldc, bool acc) {
  constexpr int kN = kLanes * kV;
  const int Mt = M / kR * kR, Nt = N / kN * kN;  // the rows / columns covered by whole tiles
  for (int i0 = 0; i0 < Mt; i0 += kR) {
    const float* a0 = A + i0 * sai;
    float* c0 = C + static_cast<int64_t>(i0) * ldc;
    for (int n0 = 0; n0 < Nt; n0 += kN) {
      // t[r][u] = C[i0 + r, n0 + u lanes ...] (or 0) + sum_k A(i0 + r, k) B[k, n0 + u lanes ...]
      vecf t[kR][kV];
      for (int r = 0; r < kR; ++r)
        for (int u = 0; u < kV; ++u) t[r][u] = acc ? loadv(c0 + r * ldc + n0 + u * kLanes) : vecf{};
      for (int k = 0; k < K; ++k) {
        vecf b[kV];
        for (int u = 0; u < kV; ++u) b[u] = loadv(B + static_cast<int64_t>(k) * ldb + n0 + u * kLanes);
        const float* ak = a0 + k * sak;
        for (int r = 0; r < kR; ++r) {
          const float a = ak[r * sai];
          for (int u = 0; u < kV; ++u) t[r][u] += a * b[u];
        }
      }
      for (int r = 0; r < kR; ++r)
        for (int u = 0; u < kV; ++u) storev(c0 + r * ldc + n0 + u * kLanes, t[r][u]);
    }
  }
  // edges: C[i, n] (+)= sum_k A(i, k) B[k, n] for the rows past Mt (all columns) and the columns past Nt
  for (int i = 0; i < M; ++i) {
    const int n_begin = i < Mt ? Nt : 0;
    if (n_begin == N) continue;
    float* c = C + static_cast<int64_t>(i) * ldc;
    if (!acc)
      for (int n = n_begin; n < N; ++n) c[n] = 0.0f;
    for (int k = 0; k < K; ++k) {
      const float a = A[i * sai + k * sak];
      const float* b = B + static_cast<int64_t>(k) * ldb;
      for (int n = n_begin; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// C[i, n] (+)= sum_k A[i, k] B[k, n]         (i < M, n < N, k < K; row-major, leading dims lda, ldb, ldc)
inline void mm_nn(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool acc) {
  mm(M, N, K, A, lda, 1, B, ldb, C, ldc, acc);
}

// C[i, n] (+)= sum_k A[k, i] B[k, n]         (A read transposed: i < M columns of A, k < K rows)
inline void mm_tn(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool acc) {
  mm(M, N, K, A, 1, lda, B, ldb, C, ldc, acc);
}

// Out[n, m] = In[m, n]   (m < M, n < N)
void transpose(int M, int N, const float* In, int ldi, float* Out, int ldo) {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) Out[static_cast<int64_t>(n) * ldo + m] = In[static_cast<int64_t>(m) * ldi + n];
}

// ------------------------------------------------------------------------------ loads / stores
void load_row(DType dt, const void* base, int64_t off, int n, float* __restrict dst) {
  if (dt == DType::F32) {
    std::memcpy(dst, static_cast<const float*>(base) + off, sizeof(float) * n);
  } else if (dt == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

void store_row(DType dt, void* base, int64_t off, int n, const float* __restrict src) {
  if (dt == DType::F32) {
    std::memcpy(static_cast<float*>(base) + off, src, sizeof(float) * n);
  } else if (dt == DType::BF16) {
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    for (int i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    for (int i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
  }
}

inline int64_t at(const LinAttnTrainArgs::View& w, int64_t b, int64_t t, int64_t h) {
  return b * w.sb + t * w.st + h * w.sh;
}

FeatureMap fmap_of(const LinAttnParams& p) {
  return p.kind == LinAttnKind::Linear ? p.fmap : p.kind == LinAttnKind::Mala ? FeatureMap::Elu1 : FeatureMap::Identity;
}

// The feature maps, written with integer operations on the bit patterns where a float select would
// be (GCC does not if-convert float selects under the default trapping-math rules, which keeps these
// loops scalar without AVX-512's masks): every loop below vectorizes at every ISA.
inline float max0(float v) {  // max(v, 0): v, or +0 when the sign bit is set
  const uint32_t u = f32_bits(v);
  return bits_f32(u & ((u >> 31) - 1u));
}
inline float min0(float v) {  // min(v, 0): v when the sign bit is set, else +0
  const uint32_t u = f32_bits(v);
  return bits_f32(u & (0u - (u >> 31)));
}

// exp(x) for x <= 0 without a libm call: x = n ln2 + r (n = round(x / ln2), ln2 split in two so n ln2
// is exact), exp(r) by the Cephes expf polynomial (error ~1 ulp), times 2^n built in the exponent bits.
// x < -87 gives 0 (exp(x) < 2^-125 there). exp_nonpos(0) is exactly 1.
inline float exp_nonpos(float x) {
  // for x <= 0 the float order is the reverse of the unsigned order of the bit patterns
  const uint32_t u = f32_bits(x), lim = 0xC2AE0000u;  // bits of -87.0f
  const uint32_t under = u > lim ? ~0u : 0u;          // x < -87 (or -inf)
  const float xc = bits_f32(u < lim ? u : lim);       // max(x, -87)
  // n = round(xc / ln2): adding and subtracting 1.5 * 2^23 rounds to an integer
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;                           // exp(r)
  const int32_t e = static_cast<int32_t>(n) + 127;    // >= 1 for xc >= -87
  const float y = p * bits_f32(static_cast<uint32_t>(e) << 23);
  return bits_f32(f32_bits(y) & ~under);
}

// x <- f(x) over n values; elu(x) + 1 = max(x, 0) + exp(min(x, 0)) (exact in both branches: x + 1, or
// 0 + exp(x)); relu(x) = max(x, 0)
void feature(FeatureMap f, int n, float* __restrict x) {
  if (f == FeatureMap::Elu1) {
    for (int i = 0; i < n; ++i) x[i] = max0(x[i]) + exp_nonpos(min0(x[i]));
  } else if (f == FeatureMap::Relu) {
    for (int i = 0; i < n; ++i) x[i] = max0(x[i]);
  }
}

// g <- f'(x) g over n values: elu1' = exp(min(x, 0)) (1 for x >= 0); relu' = [x > 0]; identity' = 1
void feature_backward(FeatureMap f, int n, const float* __restrict x, float* __restrict g) {
  if (f == FeatureMap::Elu1) {
    for (int i = 0; i < n; ++i) g[i] *= exp_nonpos(min0(x[i]));
  } else if (f == FeatureMap::Relu) {
    for (int i = 0; i < n; ++i) {
      const uint32_t pos = static_cast<int32_t>(f32_bits(x[i])) > 0 ? ~0u : 0u;  // x > 0 (x not NaN)
      g[i] = bits_f32(f32_bits(g[i]) & pos);
    }
  }
}

// ------------------------------------------------------------------------------ readouts
// (ops/linear_attention_readout.h: the formulas, shared with the CUDA chunked kernels)
inline la_readout::Readout readout_of(const LinAttnParams& p, int Dk, int Dv) {
  return {static_cast<int>(p.kind), p.normalize, p.out_norm, p.eps, Dk, Dv};
}
void readout(const LinAttnParams& p, int Dk, int Dv, const float* r, const float* sk, float* o) {
  la_readout::forward(readout_of(p, Dk, Dv), r, sk, o);
}
void readout_backward(const LinAttnParams& p, int Dk, int Dv, const float* r, const float* sk, const float* g,
                      float* dr, float* dsk) {
  la_readout::backward(readout_of(p, Dk, Dv), r, sk, g, dr, dsk);
}

// ------------------------------------------------------------------------------ per-head work
// Buffers of one (batch, head) pair: a chunk of inputs and products, and the state.
struct Work {
  int Dk, Dv, W;  // W = Dv + 1
  Vec<float> q, fq, k, fk1, kT, v1, v1T, A, R, Sk, tmp, o;  // chunk rows
  Vec<float> go, dR, dRs, dSk, B, dq, dk, dv;               // backward chunk rows
  Vec<float> P, Pc, PT, X, XT, dP;                           // states [Dk+1, W] and transposes
  Vec<float> pw;                                             // lambda^i, i = 0..C
  Work(int nk, int nv, bool backward) : Dk(nk), Dv(nv), W(nv + 1) {
    const size_t C = kC, S = static_cast<size_t>(nk + 1) * W;
    q.resize(C * nk); fq.resize(C * nk); k.resize(C * nk); fk1.resize(C * (nk + 1)); kT.resize(nk * C);
    v1.resize(C * W); A.resize(C * C); R.resize(C * W); Sk.resize(C * W); o.resize(C * nv);
    tmp.resize(C * std::max(W, nk + 1));
    P.resize(S); Pc.resize(S); pw.resize(C + 1);
    if (backward) {
      v1T.resize(W * C); go.resize(C * nv); dR.resize(C * W); dRs.resize(C * W); dSk.resize(C * W);
      B.resize(C * C); dq.resize(C * nk); dk.resize(C * (nk + 1)); dv.resize(C * W);
      PT.resize(static_cast<size_t>(W) * nk); X.resize(S); XT.resize(static_cast<size_t>(W) * nk); dP.resize(S);
    }
  }
};

// Loads tokens [t0, t0 + L) of (b, h): raw q, k; fq = f(q), fk1 = [f(k); 1], kT = f(k)^T, v1 = [v; 1]
void load_chunk(const LinAttnTrainArgs& a, Work& w, FeatureMap f, int64_t b, int64_t h, int64_t t0, int L,
                bool need_q, bool need_k) {
  const int Dk = a.Dk, Dv = a.Dv, W = w.W;
  for (int i = 0; i < L; ++i) {
    if (need_q) {
      load_row(a.dtype, a.q.data, at(a.q, b, t0 + i, h), Dk, &w.q[i * Dk]);
      std::memcpy(&w.fq[i * Dk], &w.q[i * Dk], sizeof(float) * Dk);
      feature(f, Dk, &w.fq[i * Dk]);
    }
    if (need_k) {
      load_row(a.dtype, a.k.data, at(a.k, b, t0 + i, h), Dk, &w.k[i * Dk]);
      float* fk = &w.fk1[i * (Dk + 1)];
      std::memcpy(fk, &w.k[i * Dk], sizeof(float) * Dk);
      feature(f, Dk, fk);
      fk[Dk] = 1.0f;
      float* v = &w.v1[i * W];
      load_row(a.dtype, a.v.data, at(a.v, b, t0 + i, h), Dv, v);
      v[Dv] = 1.0f;
    }
  }
  if (need_k) transpose(L, Dk, w.fk1.data(), Dk + 1, w.kT.data(), kC);  // kT[d, j] = f(k_j)[d]
}

// The causal intra-chunk part and the readout inputs of one chunk (inputs loaded, P = state before it):
//   A_ij = lambda^(i-j) f(q_i) . f(k_j) (j <= i),  R_i = sum_j A_ij v1_j + lambda^(i+1) f(q_i)^T P[:Dk],
//   Sk_i = lambda Sk_{i-1} + v1_i with Sk_{-1} = P[Dk]
void chunk_readout_inputs(Work& w, int L, float lam) {
  const int Dk = w.Dk, W = w.W;
  const float* pw = w.pw.data();
  // A[i, j] = f(q_i) . f(k_j) = sum_d fq[i, d] kT[d, j]
  mm_nn(L, L, Dk, w.fq.data(), Dk, w.kT.data(), kC, w.A.data(), kC, false);
  // A[i, j] *= lambda^(i-j) for j <= i, 0 above the diagonal
  for (int i = 0; i < L; ++i) {
    float* Ai = &w.A[i * kC];
    for (int j = 0; j <= i; ++j) Ai[j] *= pw[i - j];
    for (int j = i + 1; j < L; ++j) Ai[j] = 0.0f;
  }
  // R[i, :] = sum_d fq[i, d] P[d, :]
  mm_nn(L, W, Dk, w.fq.data(), Dk, w.P.data(), W, w.R.data(), W, false);
  // R[i, :] *= lambda^(i+1)
  for (int i = 0; i < L; ++i)
    for (int n = 0; n < W; ++n) w.R[i * W + n] *= pw[i + 1];
  // R[i, :] += sum_j A[i, j] v1[j, :]   (A is 0 above the diagonal: the full product in register tiles
  // is faster than the triangle row by row)
  mm_nn(L, W, L, w.A.data(), kC, w.v1.data(), W, w.R.data(), W, true);
  // Sk[i, :] = lambda Sk[i-1, :] + v1[i, :],  Sk[-1, :] = P[Dk, :]
  const float* prev = &w.P[static_cast<size_t>(Dk) * W];
  for (int i = 0; i < L; ++i) {
    float* s = &w.Sk[i * W];
    const float* vi = &w.v1[i * W];
    for (int n = 0; n < W; ++n) s[n] = lam * prev[n] + vi[n];
    prev = s;
  }
}

// P <- lambda^L P + sum_j lambda^(L-1-j) fk1_j v1_j^T   (the state after the chunk; uses tmp, Pc).
// The chunk's sum is formed on its own (Pc) and then added: rounding grows with C + T / C, not T.
void chunk_state_update(Work& w, int L) {
  const int Dk = w.Dk, W = w.W;
  const float* pw = w.pw.data();
  const float sL = pw[L];
  // tmp[j, :] = lambda^(L-1-j) v1[j, :]
  for (int j = 0; j < L; ++j)
    for (int n = 0; n < W; ++n) w.tmp[j * W + n] = pw[L - 1 - j] * w.v1[j * W + n];
  // Pc[d, :] = sum_j fk1[j, d] tmp[j, :]
  mm_tn(Dk + 1, W, L, w.fk1.data(), Dk + 1, w.tmp.data(), W, w.Pc.data(), W, false);
  // P = lambda^L P + Pc
  for (size_t e = 0; e < w.P.size(); ++e) w.P[e] = sL * w.P[e] + w.Pc[e];
}

// P += sum_j fk1_j v1_j^T over one chunk (the non-causal sum; chunk sum first, as above)
void chunk_state_add(Work& w, int L) {
  mm_tn(w.Dk + 1, w.W, L, w.fk1.data(), w.Dk + 1, w.v1.data(), w.W, w.Pc.data(), w.W, false);
  for (size_t e = 0; e < w.P.size(); ++e) w.P[e] += w.Pc[e];
}

void set_powers(Work& w, float lam) {
  for (int i = 0; i <= kC; ++i) w.pw[i] = static_cast<float>(std::pow(static_cast<double>(lam), i));
}

void load_state(const LinAttnTrainArgs& a, int64_t bh, Vec<float>& S) {
  const size_t n = S.size();
  if (a.init) std::memcpy(S.data(), a.init + bh * static_cast<int64_t>(n), sizeof(float) * n);
  else std::fill(S.begin(), S.end(), 0.0f);
}

void forward_one(const LinAttnTrainArgs& a, Work& w, int64_t bh) {
  const int64_t b = bh / a.H, h = bh % a.H, T = a.T;
  const int Dk = a.Dk, Dv = a.Dv, W = w.W;
  const FeatureMap f = fmap_of(a.p);
  const float lam = a.decay ? a.decay[h] : 1.0f;
  set_powers(w, lam);
  load_state(a, bh, w.P);
  if (!a.p.causal) {
    // pass 1: S' += sum_j fk1_j v1_j^T over all tokens
    for (int64_t t0 = 0; t0 < T; t0 += kC) {
      const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
      load_chunk(a, w, f, b, h, t0, L, false, true);
      chunk_state_add(w, L);
    }
    // pass 2: r_i = f(q_i)^T S'[:Dk], Sk_i = S'[Dk], o_i = readout(r_i, Sk_i)
    const float* sk = &w.P[static_cast<size_t>(Dk) * W];
    for (int64_t t0 = 0; t0 < T; t0 += kC) {
      const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
      load_chunk(a, w, f, b, h, t0, L, true, false);
      mm_nn(L, W, Dk, w.fq.data(), Dk, w.P.data(), W, w.R.data(), W, false);
      for (int i = 0; i < L; ++i) {
        readout(a.p, Dk, Dv, &w.R[i * W], sk, &w.o[i * Dv]);
        store_row(a.dtype, a.o.data, at(a.o, b, t0 + i, h), Dv, &w.o[i * Dv]);
      }
    }
  } else {
    for (int64_t t0 = 0; t0 < T; t0 += kC) {
      const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
      load_chunk(a, w, f, b, h, t0, L, true, true);
      chunk_readout_inputs(w, L, lam);
      for (int i = 0; i < L; ++i) {
        readout(a.p, Dk, Dv, &w.R[i * W], &w.Sk[i * W], &w.o[i * Dv]);
        store_row(a.dtype, a.o.data, at(a.o, b, t0 + i, h), Dv, &w.o[i * Dv]);
      }
      chunk_state_update(w, L);
    }
  }
  if (a.fin) std::memcpy(a.fin + bh * static_cast<int64_t>(w.P.size()), w.P.data(), sizeof(float) * w.P.size());
}

// Stores df(q) / df(k) / dv1 rows of a chunk as gradients (through f')
void store_grads(const LinAttnTrainArgs& a, Work& w, FeatureMap f, int64_t b, int64_t h, int64_t t0, int L,
                 bool do_q, bool do_kv) {
  const int Dk = a.Dk, Dv = a.Dv, W = w.W;
  for (int i = 0; i < L; ++i) {
    if (do_q) {
      feature_backward(f, Dk, &w.q[i * Dk], &w.dq[i * Dk]);
      store_row(a.dtype, a.gq.data, at(a.gq, b, t0 + i, h), Dk, &w.dq[i * Dk]);
    }
    if (do_kv) {
      feature_backward(f, Dk, &w.k[i * Dk], &w.dk[i * (Dk + 1)]);
      store_row(a.dtype, a.gk.data, at(a.gk, b, t0 + i, h), Dk, &w.dk[i * (Dk + 1)]);
      store_row(a.dtype, a.gv.data, at(a.gv, b, t0 + i, h), Dv, &w.dv[i * W]);
    }
  }
}

void load_go(const LinAttnTrainArgs& a, Work& w, int64_t b, int64_t h, int64_t t0, int L) {
  for (int i = 0; i < L; ++i) load_row(a.dtype, a.go.data, at(a.go, b, t0 + i, h), a.Dv, &w.go[i * a.Dv]);
}

void backward_noncausal(const LinAttnTrainArgs& a, Work& w, int64_t bh) {
  const int64_t b = bh / a.H, h = bh % a.H, T = a.T;
  const int Dk = a.Dk, Dv = a.Dv, W = w.W;
  const FeatureMap f = fmap_of(a.p);
  load_state(a, bh, w.P);
  // S' = S'_0 + sum_j fk1_j v1_j^T
  for (int64_t t0 = 0; t0 < T; t0 += kC) {
    const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
    load_chunk(a, w, f, b, h, t0, L, false, true);
    chunk_state_add(w, L);
  }
  // G = dS'_final (X), PT = S'[:Dk]^T
  if (a.gfin) std::memcpy(w.X.data(), a.gfin + bh * static_cast<int64_t>(w.X.size()), sizeof(float) * w.X.size());
  else std::fill(w.X.begin(), w.X.end(), 0.0f);
  transpose(Dk, W, w.P.data(), W, w.PT.data(), Dk);
  const float* sk = &w.P[static_cast<size_t>(Dk) * W];
  for (int64_t t0 = 0; t0 < T; t0 += kC) {
    const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
    load_chunk(a, w, f, b, h, t0, L, true, false);
    load_go(a, w, b, h, t0, L);
    // R = f(q) S'[:Dk]; (dR_i, dSk_i) = readout gradients
    mm_nn(L, W, Dk, w.fq.data(), Dk, w.P.data(), W, w.R.data(), W, false);
    // dP[Dk, :] = sum_i dSk_i over the chunk
    float* dPk = &w.dP[static_cast<size_t>(Dk) * W];
    std::fill(dPk, dPk + W, 0.0f);
    for (int i = 0; i < L; ++i) {
      readout_backward(a.p, Dk, Dv, &w.R[i * W], sk, &w.go[i * Dv], &w.dR[i * W], &w.dSk[i * W]);
      for (int n = 0; n < W; ++n) dPk[n] += w.dSk[i * W + n];
    }
    // df(q_i) = S'[:Dk] dr_i = sum_n dR[i, n] PT[n, :]
    mm_nn(L, Dk, W, w.dR.data(), W, w.PT.data(), Dk, w.dq.data(), Dk, false);
    // dP[:Dk, :] = sum_i f(q_i) dr_i^T over the chunk;  G += dP (chunk sums first)
    mm_tn(Dk, W, L, w.fq.data(), Dk, w.dR.data(), W, w.dP.data(), W, false);
    for (size_t e = 0; e < w.X.size(); ++e) w.X[e] += w.dP[e];
    store_grads(a, w, f, b, h, t0, L, true, false);
  }
  // df(k_j) = G[:Dk] v1_j = sum_n v1[j, n] GT[n, :];  dv1_j = G^T fk1_j = sum_d fk1[j, d] G[d, :]
  transpose(Dk, W, w.X.data(), W, w.XT.data(), Dk);
  for (int64_t t0 = 0; t0 < T; t0 += kC) {
    const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
    load_chunk(a, w, f, b, h, t0, L, false, true);
    mm_nn(L, Dk, W, w.v1.data(), W, w.XT.data(), Dk, w.dk.data(), Dk + 1, false);
    mm_nn(L, W, Dk + 1, w.fk1.data(), Dk + 1, w.X.data(), W, w.dv.data(), W, false);
    store_grads(a, w, f, b, h, t0, L, false, true);
  }
  if (a.ginit) std::memcpy(a.ginit + bh * static_cast<int64_t>(w.X.size()), w.X.data(), sizeof(float) * w.X.size());
}

void backward_causal(const LinAttnTrainArgs& a, Work& w, Vec<float>& states, int64_t bh) {
  const int64_t b = bh / a.H, h = bh % a.H, T = a.T;
  const int Dk = a.Dk, Dv = a.Dv, W = w.W;
  const FeatureMap f = fmap_of(a.p);
  const float lam = a.decay ? a.decay[h] : 1.0f;
  const float* pw = w.pw.data();
  const int64_t nc = (T + kC - 1) / kC;
  const size_t S = w.P.size();
  // forward sweep: states[c] = the state before chunk c
  load_state(a, bh, w.P);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * kC;
    const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
    std::memcpy(&states[c * S], w.P.data(), sizeof(float) * S);
    if (c + 1 < nc) {
      load_chunk(a, w, f, b, h, t0, L, false, true);
      chunk_state_update(w, L);
    }
  }
  // reverse sweep carrying X = the gradient of the state after the chunk
  if (a.gfin) std::memcpy(w.X.data(), a.gfin + bh * static_cast<int64_t>(S), sizeof(float) * S);
  else std::fill(w.X.begin(), w.X.end(), 0.0f);
  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t t0 = c * kC;
    const int L = static_cast<int>(std::min<int64_t>(kC, T - t0));
    std::memcpy(w.P.data(), &states[c * S], sizeof(float) * S);
    load_chunk(a, w, f, b, h, t0, L, true, true);
    load_go(a, w, b, h, t0, L);
    chunk_readout_inputs(w, L, lam);
    for (int i = 0; i < L; ++i)
      readout_backward(a.p, Dk, Dv, &w.R[i * W], &w.Sk[i * W], &w.go[i * Dv], &w.dR[i * W], &w.dSk[i * W]);
    transpose(L, W, w.v1.data(), W, w.v1T.data(), kC);          // v1T[n, j] = v1[j, n]
    transpose(Dk, W, w.P.data(), W, w.PT.data(), Dk);           // PT[n, d] = P[d, n]
    transpose(Dk, W, w.X.data(), W, w.XT.data(), Dk);           // XT[n, d] = X[d, n]
    // B[i, j] = dr_i . v1_j = sum_n dR[i, n] v1T[n, j], then B[i, j] *= lambda^(i-j) (j <= i), 0 above
    mm_nn(L, L, W, w.dR.data(), W, w.v1T.data(), kC, w.B.data(), kC, false);
    for (int i = 0; i < L; ++i) {
      float* Bi = &w.B[i * kC];
      for (int j = 0; j <= i; ++j) Bi[j] *= pw[i - j];
      for (int j = i + 1; j < L; ++j) Bi[j] = 0.0f;
    }
    // dRs[i, :] = lambda^(i+1) dR[i, :]
    for (int i = 0; i < L; ++i)
      for (int n = 0; n < W; ++n) w.dRs[i * W + n] = pw[i + 1] * w.dR[i * W + n];
    // df(q_i) = lambda^(i+1) P[:Dk] dr_i + sum_j B[i, j] f(k_j)
    mm_nn(L, Dk, W, w.dRs.data(), W, w.PT.data(), Dk, w.dq.data(), Dk, false);
    mm_nn(L, Dk, L, w.B.data(), kC, w.fk1.data(), Dk + 1, w.dq.data(), Dk, true);
    // tmp[j, :] = lambda^(L-1-j) v1_j;  df(k_j) = sum_n tmp[j, n] XT[n, :] + sum_i B[i, j] f(q_i)
    for (int j = 0; j < L; ++j)
      for (int n = 0; n < W; ++n) w.tmp[j * W + n] = pw[L - 1 - j] * w.v1[j * W + n];
    mm_nn(L, Dk, W, w.tmp.data(), W, w.XT.data(), Dk, w.dk.data(), Dk + 1, false);
    mm_tn(L, Dk, L, w.B.data(), kC, w.fq.data(), Dk, w.dk.data(), Dk + 1, true);
    // dv1_j = sum_i A[i, j] dr_i  (A = 0 above the diagonal)
    mm_tn(L, W, L, w.A.data(), kC, w.dR.data(), W, w.dv.data(), W, false);
    // dv1_j += E_j, E_j = sum_{i >= j} lambda^(i-j) dSk_i = dSk_j + lambda E_{j+1}  (E kept in Sk rows)
    for (int j = L - 1; j >= 0; --j) {
      float* e = &w.Sk[j * W];
      const float* dsk = &w.dSk[j * W];
      if (j == L - 1) for (int n = 0; n < W; ++n) e[n] = dsk[n];
      else for (int n = 0; n < W; ++n) e[n] = dsk[n] + lam * e[W + n];
      for (int n = 0; n < W; ++n) w.dv[j * W + n] += e[n];
    }
    // dv1_j += lambda^(L-1-j) X^T fk1_j = sum_d (lambda^(L-1-j) fk1[j, d]) X[d, :]
    for (int j = 0; j < L; ++j)
      for (int d = 0; d <= Dk; ++d) w.tmp[j * (Dk + 1) + d] = pw[L - 1 - j] * w.fk1[j * (Dk + 1) + d];
    mm_nn(L, W, Dk + 1, w.tmp.data(), Dk + 1, w.X.data(), W, w.dv.data(), W, true);
    // dP[:Dk, :] = lambda^L X[:Dk, :] + sum_i f(q_i) dRs[i, :]^T;  dP[Dk, :] = lambda^L X[Dk, :] + sum_i lambda^(i+1) dSk_i
    for (size_t e = 0; e < S; ++e) w.dP[e] = pw[L] * w.X[e];
    mm_tn(Dk, W, L, w.fq.data(), Dk, w.dRs.data(), W, w.dP.data(), W, true);
    float* dPk = &w.dP[static_cast<size_t>(Dk) * W];
    for (int i = 0; i < L; ++i)
      for (int n = 0; n < W; ++n) dPk[n] += pw[i + 1] * w.dSk[i * W + n];
    std::swap(w.X, w.dP);
    store_grads(a, w, f, b, h, t0, L, true, true);
  }
  if (a.ginit) std::memcpy(a.ginit + bh * static_cast<int64_t>(S), w.X.data(), sizeof(float) * S);
}

void forward(const LinAttnTrainArgs& a, int64_t bh0, int64_t bh1) {
  Work w(a.Dk, a.Dv, false);
  for (int64_t bh = bh0; bh < bh1; ++bh) forward_one(a, w, bh);
}

void backward(const LinAttnTrainArgs& a, int64_t bh0, int64_t bh1) {
  Work w(a.Dk, a.Dv, true);
  Vec<float> states;
  if (a.p.causal) states.resize(static_cast<size_t>((a.T + kC - 1) / kC) * w.P.size());
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    if (a.p.causal) {
      set_powers(w, a.decay ? a.decay[bh % a.H] : 1.0f);
      backward_causal(a, w, states, bh);
    } else {
      backward_noncausal(a, w, bh);
    }
  }
}

}  // namespace

const LinAttnTrainTable* linear_attention_train_table() {
  static const LinAttnTrainTable table = {forward, backward};
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne
