// Version 2 of the CUDA linear-attention family: the chunkwise-parallel form (flash-linear-attention),
// written once as __host__ __device__ code so that the SAME arithmetic runs in the CUDA kernels
// (cuda/linear_attention_chunk.cu) and, threads emulated by plain loops, in a host harness that CI
// runs without a GPU (tests/linear_attention_chunk_host.cu, tests/test_linear_attention_chunk_host.py).
//
// Math (the CPU kernels of cpp/ops/linear_attention_train.cpp, whose per-chunk formulas this mirrors).
// Per (batch b, head h), f the feature map, fk1 = [f(k); 1], v1 = [v; 1], W = Dv + 1, K1 = Dk + 1,
// lambda the head's decay (1 without one), pw[i] = lambda^i:
//   S'_t = lambda S'_{t-1} + fk1_t v1_t^T                                         [K1, W] float32
//   o_t = readout(r_t, Sk_t),  r_t = f(q_t)^T S'_t[:Dk],  Sk_t = S'_t[Dk] (sum v, count)
// Causal, per chunk of L <= C tokens (i, j = 0..L-1 inside it), P = the state before the chunk:
//   A_ij = lambda^(i-j) f(q_i) . f(k_j)  (j <= i, else 0)
//   r_i  = sum_{j<=i} A_ij v1_j + lambda^(i+1) f(q_i)^T P[:Dk]
//   Sk_i = sum_{j<=i} lambda^(i-j) v1_j + lambda^(i+1) P[Dk]
//   P'   = lambda^L P + sum_j lambda^(L-1-j) fk1_j v1_j^T                (the state after the chunk)
// Non-causal: S' = S'_0 + sum_j fk1_j v1_j^T over all tokens, r_i = f(q_i)^T S'[:Dk], Sk_i = S'[Dk].
// Backward, with dr_i, dSk_i the readout's gradients wrt r_i, Sk_i and X the gradient wrt the state
// after the chunk (the final-state gradient for the last chunk):
//   B_ij    = lambda^(i-j) dr_i . v1_j  (j <= i, else 0)
//   df(q_i) = sum_{j<=i} B_ij f(k_j) + lambda^(i+1) P[:Dk] dr_i
//   df(k_j) = sum_{i>=j} B_ij f(q_i) + lambda^(L-1-j) X[:Dk] v1_j
//   dv1_j   = sum_{i>=j} A_ij dr_i + E_j + lambda^(L-1-j) X^T fk1_j,   E_j = sum_{i>=j} lambda^(i-j) dSk_i
//   dP      = lambda^L X + [sum_i lambda^(i+1) f(q_i) dr_i^T ; lambda E_0]   (X of the chunk before)
// Non-causal: G = dS'_final + sum_i ([f(q_i); 0] dr_i^T + e_Dk dSk_i^T); df(q_i) = S'[:Dk] dr_i,
// df(k_j) = G[:Dk] v1_j, dv1_j = G^T fk1_j, dS'_0 = G. Then dq = f'(q) df(q), dk = f'(k) df(k), where
// f' is read off f itself: elu1' = min(f, 1) (f = exp(x) <= 1 for x <= 0, x + 1 > 1 above), relu' =
// [f > 0], identity' = 1 (exact: no raw q, k kept).
//
// Execution model. A kernel body is a sequence of PHASES: each phase is a loop over output elements
// `for (e = tid; e < n; e += nthr)` in which every element is written by exactly one thread and no
// thread reads what another thread writes in the same phase; consecutive phases are separated by a
// block barrier. The bodies take an executor `ex` whose ex.phase(fn) runs fn(tid, nthr) and then
// __syncthreads() on the device (DeviceExec, linear_attention_chunk.cu), or fn(0..nthr-1) one after
// the other on the host (the harness; run forwards and backwards, any hazard inside a phase shows up
// as a difference). Control flow between phases depends only on block-uniform values, so every
// thread meets every barrier. No reductions across threads: a token's readout is one thread's loop
// over Dv (<= 256 values) and every product element is one thread's dot product.
//
// Kernels (one thread block of kThreads each; grids and shared memory in the .cu):
//   states:  one block per (b, h, tile of 32 state columns) walks the chunks in order and writes the
//            state before every chunk (and after the last) to a global scratch `states`
//            [B*H, nc + 1, K1, W] fp32 (non-causal: one entry, the total state). The running state
//            sits in shared memory when it fits, else it is updated from states[c] into states[c + 1].
// Shared-memory reuse inside a body (a buffer written in a phase is read only in later phases; a
// buffer is overwritten only after the barrier that ends the last phase reading it) is spelled out
// at each phase; sizes: smem_floats below.
//   output:  one block per (b, h, chunk): every chunk is independent once its state is known, so the
//            prefill's readouts run B*H*nc blocks wide.
//   backward: the states kernel, then backward_local (block per (b, h, chunk): dr, dq and the chunk's
//            term of the state gradient), backward_sweep (one thread per state element: the scan
//            X_{c-1} = lambda^L X_c + D_c over the chunks) and backward_kv (block per (b, h, chunk):
//            dk, dv); see "backward: three parallel steps" below.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "ops/linear_attention_readout.h"

namespace ne {
namespace cuda {
namespace la2 {

#define NE_LA_HD __host__ __device__ inline

constexpr int kMaxChunk = 64;

// ---------------------------------------------------------------------------- element conversion
NE_LA_HD float to_f(float x) { return x; }
NE_LA_HD float to_f(__half x) { return __half2float(x); }
NE_LA_HD float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> NE_LA_HD T from_f(float x);
template <> NE_LA_HD float from_f<float>(float x) { return x; }
template <> NE_LA_HD __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> NE_LA_HD __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A [B, T, H, D] tensor with unit last stride (strides in elements).
template <class T>
struct Tok {
  T* p = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  NE_LA_HD T* at(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};

struct ChunkShape {
  int B = 0, H = 0, Dk = 0, Dv = 0;
  int64_t T = 0;
  int kind = 0;      // 0 linear, 1 MALA, 2 norm
  int fmap = 0;      // 0 elu+1, 1 relu, 2 identity (already resolved per kind)
  int out_norm = 0;  // norm: 0 rms, 1 layer
  bool causal = true, normalize = true;
  float eps = 1e-6f;
  int C = kMaxChunk;  // tokens per chunk (16, 32 or 64; see plan_*)
  NE_LA_HD int K1() const { return Dk + 1; }
  NE_LA_HD int W() const { return Dv + 1; }
  NE_LA_HD int M() const { return (Dk > Dv ? Dk : Dv) + 1; }  // row length of the generic chunk buffers
  NE_LA_HD int64_t S() const { return (int64_t)(Dk + 1) * (Dv + 1); }
  NE_LA_HD int64_t nc() const { return (T + C - 1) / C; }
  NE_LA_HD int64_t nst() const { return causal ? nc() + 1 : 1; }  // states per (b, h) in `states`
};

template <class T>
struct ChunkArgs {
  ChunkShape s;
  Tok<const T> q, k, v, go;
  Tok<T> o, gq, gk, gv;
  const float* decay = nullptr;  // [H] or null
  const float* init = nullptr;   // [B*H, K1, W] or null (zeros)
  float* fin = nullptr;          // [B*H, K1, W] or null
  const float* gfin = nullptr;   // backward: [B*H, K1, W] or null (zeros)
  float* ginit = nullptr;        // backward: [B*H, K1, W] or null
  float* states = nullptr;       // [B*H, nst, K1, W] scratch (see the kernels above)
  float* xbuf = nullptr;         // backward: [B*H, max(nc, 1), K1, W] scratch: D_c, then X_c (see below)
  float* drbuf = nullptr;        // backward, causal: [B*H, T, W] scratch: dr per token
  float* ebuf = nullptr;         // backward, causal: [B*H, T, W] scratch: E per token
  bool state_smem = true;        // the running state (states kernel), P (output, backward_local) or X
                                 // (backward_kv) in shared memory
};

// ---------------------------------------------------------------------------- shared-memory plans
// Floats of shared memory per block (all buffers fp32; M = max(Dk, Dv) + 1, S = (Dk+1)(Dv+1)):
//   states:   pw[C+1] + fk1, v1 [C*M each]                              + S (running state) if smem
//   output:   pw[C+1] + fq, fk1, v1, R, Sk [C*M each] + A [C*C]         + S (P) if smem
//   backward: pw[C+1] + fq, fk1, v1, R, Sk, G, dR, dSk [C*M each] + A, Bm [C*C] + S (P or X) if smem
//             (backward_local and backward_kv; kv uses fq, fk1, v1, R, Sk, dR, dSk, A, Bm)
// e.g. Dk = Dv = 64, C = 64: states 49.3 KB, output 114.0 KB, backward 178.8 KB (H100 opt-in: 227 KB).
enum class KernelKind { States = 0, Output = 1, Backward = 2 };
NE_LA_HD int64_t smem_floats(KernelKind kk, int Dk, int Dv, int C, bool state_smem) {
  const int64_t M = (Dk > Dv ? Dk : Dv) + 1, S = (int64_t)(Dk + 1) * (Dv + 1), CM = (int64_t)C * M;
  const int64_t pw = C + 1;
  if (kk == KernelKind::States) return pw + 2 * CM + (state_smem ? S : 0);
  if (kk == KernelKind::Output) return pw + 5 * CM + (int64_t)C * C + (state_smem ? S : 0);
  return pw + 8 * CM + 2 * (int64_t)C * C + (state_smem ? S : 0);
}

// The chunk size and where the states live: the largest C in {64, 32, 16} whose buffers fit in
// `max_bytes`, with the states in shared memory if they fit too. Returns false if nothing fits (the
// caller then runs the recurrent kernels).
NE_LA_HD bool plan(KernelKind kk, int Dk, int Dv, int64_t max_bytes, int* C, bool* state_smem) {
  for (int c = kMaxChunk; c >= 16; c /= 2) {
    if (smem_floats(kk, Dk, Dv, c, true) * 4 <= max_bytes) {
      *C = c;
      *state_smem = true;
      return true;
    }
    if (smem_floats(kk, Dk, Dv, c, false) * 4 <= max_bytes) {
      *C = c;
      *state_smem = false;
      return true;
    }
  }
  return false;
}

// The buffers carved from one block's shared memory, in the order of smem_floats.
struct Bufs {
  float *pw, *fq, *fk1, *v1, *R, *Sk, *G, *dR, *dSk, *A, *Bm, *P;
};
NE_LA_HD Bufs carve(KernelKind kk, const ChunkShape& s, bool state_smem, float* base) {
  const int64_t CM = (int64_t)s.C * s.M(), CC = (int64_t)s.C * s.C;
  Bufs u{};
  u.pw = base;
  base += s.C + 1;
  u.fk1 = base;
  base += CM;
  u.v1 = base;
  base += CM;
  if (kk != KernelKind::States) {
    u.fq = base;
    base += CM;
    u.R = base;
    base += CM;
    u.Sk = base;
    base += CM;
    u.A = base;
    base += CC;
    if (kk == KernelKind::Backward) {
      u.G = base;
      base += CM;
      u.dR = base;
      base += CM;
      u.dSk = base;
      base += CM;
      u.Bm = base;
      base += CC;
    }
  }
  if (state_smem) u.P = base;  // (S floats)
  return u;
}

// ---------------------------------------------------------------------------- per-token math
// phi (0 elu+1, 1 relu, 2 identity), and its derivative read off phi's value (see the top).
NE_LA_HD float fmap_f(int m, float x) {
  if (m == 0) return x > 0.f ? x + 1.f : expf(x);
  if (m == 1) return x > 0.f ? x : 0.f;
  return x;
}
NE_LA_HD float fmap_d_from_f(int m, float fx) {
  if (m == 0) return fx < 1.f ? fx : 1.f;
  if (m == 1) return fx > 0.f ? 1.f : 0.f;
  return 1.f;
}

// The readout of one token and its gradient: ops/linear_attention_readout.h (the CPU kernels' own).
NE_LA_HD la_readout::Readout readout_of(const ChunkShape& s) { return {s.kind, s.normalize, s.out_norm, s.eps, s.Dk, s.Dv}; }
// o = readout(r, sk) (r, sk: W values; o: Dv values, o may alias r)
NE_LA_HD void readout_row(const ChunkShape& s, const float* r, const float* sk, float* o) {
  la_readout::forward(readout_of(s), r, sk, o);
}
// dr = d<g, o>/dr, dsk = d<g, o>/dsk for one token (g: Dv values; dr, dsk: W values; no aliasing)
NE_LA_HD void readout_backward_row(const ChunkShape& s, const float* r, const float* sk, const float* g, float* dr,
                                   float* dsk) {
  la_readout::backward(readout_of(s), r, sk, g, dr, dsk);
}

// ---------------------------------------------------------------------------- phase helpers
// (every helper is the body of ONE phase, or part of one: a loop over its outputs by thread)

// pw[i] = lambda^i, i = 0..C (in double, as the CPU kernels: pw[0] = 1 exactly)
NE_LA_HD void powers(int tid, int nthr, const ChunkShape& s, float lam, float* pw) {
  for (int i = tid; i <= s.C; i += nthr) pw[i] = (float)pow((double)lam, (double)i);
}

// dst[e] = src[e] (or 0 when src is null), e < n
NE_LA_HD void copy_or_zero(int tid, int nthr, int64_t n, const float* src, float* dst) {
  for (int64_t e = tid; e < n; e += nthr) dst[e] = src ? src[e] : 0.0f;
}

// Loads tokens t0 .. t0+L-1 of (b, h): fq[i, d] = f(q_i)[d] (row length M), fk1[j, :] = [f(k_j); 1],
// v1[j, :] = [v_j; 1], G[i, n] = grad_o_i[n] (those requested: null pointers are skipped).
template <class T>
NE_LA_HD void load_chunk(int tid, int nthr, const ChunkArgs<T>& a, int64_t b, int64_t h, int64_t t0, int L, float* fq,
                         float* fk1, float* v1, float* G) {
  const ChunkShape& s = a.s;
  const int Dk = s.Dk, Dv = s.Dv, M = s.M();
  if (fq)
    for (int e = tid; e < L * Dk; e += nthr) {
      const int i = e / Dk, d = e % Dk;
      fq[i * M + d] = fmap_f(s.fmap, to_f(a.q.at(b, t0 + i, h)[d]));
    }
  if (fk1)
    for (int e = tid; e < L * (Dk + 1); e += nthr) {
      const int j = e / (Dk + 1), d = e % (Dk + 1);
      fk1[j * M + d] = d < Dk ? fmap_f(s.fmap, to_f(a.k.at(b, t0 + j, h)[d])) : 1.0f;
    }
  if (v1)
    for (int e = tid; e < L * (Dv + 1); e += nthr) {
      const int j = e / (Dv + 1), n = e % (Dv + 1);
      v1[j * M + n] = n < Dv ? to_f(a.v.at(b, t0 + j, h)[n]) : 1.0f;
    }
  if (G)
    for (int e = tid; e < L * Dv; e += nthr) {
      const int i = e / Dv, n = e % Dv;
      G[i * M + n] = to_f(a.go.at(b, t0 + i, h)[n]);
    }
}

// ---------------------------------------------------------------------------- kernel bodies
// The states kernel, block (b, h) = bh and column tile `tile`: state columns n0 <= n < n1 of W, with
// n0 = tile * kStateTile (a state column depends only on the same column of the v1 rows, so the tiles
// are independent blocks). smem: see smem_floats(States) (the smem state keeps the full [K1, W]
// layout; a block touches its own columns only).
constexpr int kStateTile = 32;
NE_LA_HD int state_tiles(const ChunkShape& s) { return (s.W() + kStateTile - 1) / kStateTile; }

template <class T, class Exec>
NE_LA_HD void states_body(Exec& ex, const ChunkArgs<T>& a, int64_t bh, int tile, float* smem) {
  const ChunkShape& s = a.s;
  const Bufs u = carve(KernelKind::States, s, a.state_smem, smem);
  const int64_t b = bh / s.H, h = bh % s.H, S = s.S(), nc = s.nc(), nst = s.nst();
  const int K1 = s.K1(), W = s.W(), M = s.M();
  const int n0 = tile * kStateTile, tw = (W - n0) < kStateTile ? (W - n0) : kStateTile;
  const int64_t ne = (int64_t)K1 * tw;  // elements of the tile; element e is state index at(e)
  auto at = [&](int64_t e) -> int64_t { return (e / tw) * W + n0 + e % tw; };
  float* st = a.states + bh * nst * S;  // states[bh, 0]
  const float lam = a.decay ? a.decay[h] : 1.0f;
  // phase: pw = lambda^i; the running state = the initial state (in smem, or states[bh, 0])
  float* P0 = a.state_smem ? u.P : st;
  ex.phase([&](int tid, int nthr) {
    powers(tid, nthr, s, lam, u.pw);
    for (int64_t e = tid; e < ne; e += nthr) P0[at(e)] = a.init ? a.init[bh * S + at(e)] : 0.0f;
  });
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * s.C;
    const int L = (int)((s.T - t0) < s.C ? (s.T - t0) : s.C);
    // the state before chunk c is read from Pc and the one after it written to Pn (the same buffer
    // in smem: an in-place update, each element read and written by one thread)
    const float* Pc = a.state_smem ? u.P : (s.causal ? st + c * S : st);
    float* Pn = a.state_smem ? u.P : (s.causal ? st + (c + 1) * S : st);
    // phase: fk1, v1 of the chunk; (smem, causal) states[bh, c] = P (P itself is only read here)
    ex.phase([&](int tid, int nthr) {
      load_chunk<T>(tid, nthr, a, b, h, t0, L, nullptr, u.fk1, u.v1, nullptr);
      if (a.state_smem && s.causal)
        for (int64_t e = tid; e < ne; e += nthr) st[c * S + at(e)] = u.P[at(e)];
    });
    // phase: causal   Pn[d, n] = lambda^L Pc[d, n] + sum_j lambda^(L-1-j) fk1[j, d] v1[j, n]
    //        non-causal Pn[d, n] = Pc[d, n] + sum_j fk1[j, d] v1[j, n]
    // (the chunk's sum first, then added: rounding grows with C + T / C, not T)
    ex.phase([&](int tid, int nthr) {
      const float sL = s.causal ? u.pw[L] : 1.0f;
      for (int64_t e = tid; e < ne; e += nthr) {
        const int d = (int)(e / tw), n = n0 + (int)(e % tw);
        float acc = 0.0f;
        for (int j = 0; j < L; ++j) {
          const float w = s.causal ? u.pw[L - 1 - j] : 1.0f;
          acc = fmaf(w * u.fk1[j * M + d], u.v1[j * M + n], acc);
        }
        const int64_t x = (int64_t)d * W + n;
        Pn[x] = fmaf(sL, Pc[x], acc);
      }
    });
  }
  // phase: states[bh, nst - 1] (the state after the last chunk; non-causal: the total) and fin
  const float* Pend = a.state_smem ? u.P : (s.causal ? st + nc * S : st);
  ex.phase([&](int tid, int nthr) {
    for (int64_t e = tid; e < ne; e += nthr) {
      const int64_t x = at(e);
      const float v = Pend[x];
      if (a.state_smem) st[(nst - 1) * S + x] = v;
      if (a.fin) a.fin[bh * S + x] = v;
    }
  });
}

// One phase's share of a decayed causal Gram matrix, elements e = tid, tid + nthr, ... of L x L:
//   out[i, j] = lambda^(i-j) sum_{d < D} a[i, d] b[j, d]  for j <= i,  0 for j > i
// (rows of a and b M apart, rows of out C apart, pw[t] = lambda^t). A = f(Q) f(K)^T in the forward,
// Bm = dR V1^T in the backward.
NE_LA_HD void causal_gram(int tid, int nthr, int L, int D, const float* a, const float* b, int M, const float* pw,
                          float* out, int C) {
  for (int e = tid; e < L * L; e += nthr) {
    const int i = e / L, j = e % L;
    float acc = 0.0f;
    if (j <= i) {
      for (int d = 0; d < D; ++d) acc = fmaf(a[i * M + d], b[j * M + d], acc);
      acc *= pw[i - j];
    }
    out[i * C + j] = acc;
  }
}

// The chunk's reads of the state, shared by output_body and backward_local_body (which recomputes them):
//   causal:     A[i, j] = lambda^(i-j) f(q_i) . f(k_j) for j <= i, 0 for i < j   (i, j < L)
//               R[i, n] = lambda^(i+1) sum_d fq[i, d] P[d, n] + sum_{j<=i} A[i, j] v1[j, n]
//               Sk[i, n] = lambda^(i+1) P[Dk, n] + sum_{j<=i} lambda^(i-j) v1[j, n]
//   non-causal: R[i, n] = sum_d fq[i, d] S'[d, n]   (Sk_i = S'[Dk] for every token)
// Needs u.fq, u.fk1, u.v1 (causal) and u.pw loaded (a phase before); P the state before the chunk.
template <class Exec>
NE_LA_HD void chunk_reads(Exec& ex, const ChunkShape& s, const Bufs& u, const float* P, int L) {
  const int Dk = s.Dk, W = s.W(), M = s.M(), C = s.C;
  if (s.causal) {
    // phase: A
    ex.phase([&](int tid, int nthr) { causal_gram(tid, nthr, L, Dk, u.fq, u.fk1, M, u.pw, u.A, C); });
    // phase: R, Sk
    ex.phase([&](int tid, int nthr) {
      for (int e = tid; e < L * W; e += nthr) {
        const int i = e / W, n = e % W;
        float inter = 0.0f;
        for (int d = 0; d < Dk; ++d) inter = fmaf(u.fq[i * M + d], P[(int64_t)d * W + n], inter);
        float intra = 0.0f, sk = 0.0f;
        for (int j = 0; j <= i; ++j) {
          intra = fmaf(u.A[i * C + j], u.v1[j * M + n], intra);
          sk = fmaf(u.pw[i - j], u.v1[j * M + n], sk);
        }
        u.R[i * M + n] = fmaf(u.pw[i + 1], inter, intra);
        u.Sk[i * M + n] = fmaf(u.pw[i + 1], P[(int64_t)Dk * W + n], sk);
      }
    });
  } else {
    // phase: R
    ex.phase([&](int tid, int nthr) {
      for (int e = tid; e < L * W; e += nthr) {
        const int i = e / W, n = e % W;
        float acc = 0.0f;
        for (int d = 0; d < Dk; ++d) acc = fmaf(u.fq[i * M + d], P[(int64_t)d * W + n], acc);
        u.R[i * M + n] = acc;
      }
    });
  }
}

// The output kernel, block (b, h, chunk c) (states written by states_body). smem: smem_floats(Output).
template <class T, class Exec>
NE_LA_HD void output_body(Exec& ex, const ChunkArgs<T>& a, int64_t bh, int64_t c, float* smem) {
  const ChunkShape& s = a.s;
  const Bufs u = carve(KernelKind::Output, s, a.state_smem, smem);
  const int64_t b = bh / s.H, h = bh % s.H, S = s.S(), nst = s.nst();
  const int Dk = s.Dk, Dv = s.Dv, W = s.W(), M = s.M(), C = s.C;
  const int64_t t0 = c * C;
  const int L = (int)((s.T - t0) < C ? (s.T - t0) : C);
  const float* Pg = a.states + (bh * nst + (s.causal ? c : 0)) * S;  // the state before the chunk (or the total)
  const float* P = a.state_smem ? u.P : Pg;
  const float lam = a.decay ? a.decay[h] : 1.0f;
  // phase: pw, f(q), [f(k); 1], [v; 1] of the chunk, P (a copy in smem when it fits)
  ex.phase([&](int tid, int nthr) {
    powers(tid, nthr, s, lam, u.pw);
    load_chunk<T>(tid, nthr, a, b, h, t0, L, u.fq, s.causal ? u.fk1 : nullptr, s.causal ? u.v1 : nullptr, nullptr);
    if (a.state_smem) copy_or_zero(tid, nthr, S, Pg, u.P);
  });
  chunk_reads(ex, s, u, P, L);  // A (causal), R and Sk
  // phase: o_i = readout(R_i, Sk_i), one thread per token, written over R_i (its own row)
  ex.phase([&](int tid, int nthr) {
    for (int i = tid; i < L; i += nthr)
      readout_row(s, &u.R[i * M], s.causal ? &u.Sk[i * M] : &P[(int64_t)Dk * W], &u.R[i * M]);
  });
  // phase: store o (coalesced along Dv)
  ex.phase([&](int tid, int nthr) {
    for (int e = tid; e < L * Dv; e += nthr) {
      const int i = e / Dv, n = e % Dv;
      a.o.at(b, t0 + i, h)[n] = from_f<T>(u.R[i * M + n]);
    }
  });
}

// Stores one chunk's gradients: gq_i = f'(q_i) dfq_i, gk_j = f'(k_j) dfk_j, gv_j = dv1_j[:Dv]
// (rows of length M; null pointers skipped). Part of a phase: reads only.
template <class T>
NE_LA_HD void store_grads(int tid, int nthr, const ChunkArgs<T>& a, int64_t b, int64_t h, int64_t t0, int L,
                          const float* fq, const float* dfq, const float* fk1, const float* dfk, const float* dv1) {
  const ChunkShape& s = a.s;
  const int Dk = s.Dk, Dv = s.Dv, M = s.M();
  if (dfq)
    for (int e = tid; e < L * Dk; e += nthr) {
      const int i = e / Dk, d = e % Dk;
      a.gq.at(b, t0 + i, h)[d] = from_f<T>(dfq[i * M + d] * fmap_d_from_f(s.fmap, fq[i * M + d]));
    }
  if (dfk)
    for (int e = tid; e < L * Dk; e += nthr) {
      const int j = e / Dk, d = e % Dk;
      a.gk.at(b, t0 + j, h)[d] = from_f<T>(dfk[j * M + d] * fmap_d_from_f(s.fmap, fk1[j * M + d]));
    }
  if (dv1)
    for (int e = tid; e < L * Dv; e += nthr) {
      const int j = e / Dv, n = e % Dv;
      a.gv.at(b, t0 + j, h)[n] = from_f<T>(dv1[j * M + n]);
    }
}

// ------------------------------------------------------------------ backward: three parallel steps
// After states_body, the backward runs in three more kernels, so that only an elementwise scan is
// sequential over the chunks:
//   backward_local (block per (b, h, chunk)): dr, dSk of its tokens (readout gradients at the
//        recomputed r, Sk), dq (which needs only the chunk and the state before it), and the chunk's
//        own contribution to the state gradient, D_c = [sum_i lambda^(i+1) f(q_i) dr_i^T ; lambda E_0]
//        (non-causal: [sum_i f(q_i) dr_i^T ; sum_i dSk_i]) -> xbuf[bh, c]; causal: dr, E -> drbuf, ebuf.
//   backward_sweep (one thread per state element): X_{nc-1} = dS'_final, X_{c-1} = lambda^(L_c) X_c + D_c
//        (X_c = the gradient of the state after chunk c, written over xbuf[bh, c]); dS'_0 = X_{-1}.
//        Non-causal: G = dS'_final + sum_c D_c (chunk order) -> xbuf[bh, 0] and dS'_0.
//   backward_kv (block per (b, h, chunk)): dk, dv of its tokens from X_c (non-causal: G), the
//        recomputed A and B, dr and E.

// backward_local, block (b, h, chunk c). smem: smem_floats(Backward) (P in smem if state_smem).
template <class T, class Exec>
NE_LA_HD void backward_local_body(Exec& ex, const ChunkArgs<T>& a, int64_t bh, int64_t c, float* smem) {
  const ChunkShape& s = a.s;
  const Bufs u = carve(KernelKind::Backward, s, a.state_smem, smem);
  const int64_t b = bh / s.H, h = bh % s.H, S = s.S(), nc = s.nc(), nst = s.nst();
  const int Dk = s.Dk, W = s.W(), M = s.M(), C = s.C;
  const int64_t t0 = c * C;
  const int L = (int)((s.T - t0) < C ? (s.T - t0) : C);
  const float* Pg = a.states + (bh * nst + (s.causal ? c : 0)) * S;  // the state before chunk c (or S')
  const float* P = a.state_smem ? u.P : Pg;
  float* D = a.xbuf + (bh * nc + c) * S;                               // D_c (out)
  const float lam = a.decay ? a.decay[h] : 1.0f;
  // phase: pw; f(q), [f(k); 1], [v; 1] (causal), grad_o (into G); P (smem copy when it fits)
  ex.phase([&](int tid, int nthr) {
    powers(tid, nthr, s, lam, u.pw);
    load_chunk<T>(tid, nthr, a, b, h, t0, L, u.fq, s.causal ? u.fk1 : nullptr, s.causal ? u.v1 : nullptr, u.G);
    if (a.state_smem) copy_or_zero(tid, nthr, S, Pg, u.P);
  });
  chunk_reads(ex, s, u, P, L);  // A, R, Sk recomputed as in output_body
  // phase: (dR_i, dSk_i) = readout gradients at (R_i, Sk_i) (non-causal: S'[Dk]) from grad_o_i, one
  //        thread per token
  ex.phase([&](int tid, int nthr) {
    for (int i = tid; i < L; i += nthr)
      readout_backward_row(s, &u.R[i * M], s.causal ? &u.Sk[i * M] : &P[(int64_t)Dk * W], &u.G[i * M], &u.dR[i * M],
                           &u.dSk[i * M]);
  });
  if (s.causal) {
    // phase: Bm[i, j] = lambda^(i-j) dr_i . v1_j for j <= i, else 0;
    //        E_j = dSk_j + lambda E_{j+1} (E_{L-1} = dSk_{L-1}), in place over dSk, one thread per column
    ex.phase([&](int tid, int nthr) {
      causal_gram(tid, nthr, L, W, u.dR, u.v1, M, u.pw, u.Bm, C);
      for (int n = tid; n < W; n += nthr)
        for (int j = L - 2; j >= 0; --j) u.dSk[j * M + n] = fmaf(lam, u.dSk[(j + 1) * M + n], u.dSk[j * M + n]);
    });
    // phase: G[i, d] = df(q_i)[d] = lambda^(i+1) sum_n dR[i, n] P[d, n] + sum_{j<=i} Bm[i, j] f(k_j)[d]
    //        (G held grad_o, read by the readout phase); D_c = [sum_i lambda^(i+1) fq[i, d] dR[i, n] ;
    //        lambda E_0]; dr, E rows -> drbuf, ebuf for backward_kv
    ex.phase([&](int tid, int nthr) {
      for (int e = tid; e < L * Dk; e += nthr) {
        const int i = e / Dk, d = e % Dk;
        float inter = 0.0f, intra = 0.0f;
        for (int n = 0; n < W; ++n) inter = fmaf(u.dR[i * M + n], P[(int64_t)d * W + n], inter);
        for (int j = 0; j <= i; ++j) intra = fmaf(u.Bm[i * C + j], u.fk1[j * M + d], intra);
        u.G[i * M + d] = fmaf(u.pw[i + 1], inter, intra);
      }
      for (int64_t e = tid; e < S; e += nthr) {
        const int d = (int)(e / W), n = (int)(e % W);
        float acc = 0.0f;
        if (d < Dk)
          for (int i = 0; i < L; ++i) acc = fmaf(u.pw[i + 1] * u.fq[i * M + d], u.dR[i * M + n], acc);
        else
          acc = lam * u.dSk[n];
        D[e] = acc;
      }
      float* dr = a.drbuf + (bh * s.T + t0) * W;
      float* eb = a.ebuf + (bh * s.T + t0) * W;
      for (int e = tid; e < L * W; e += nthr) {
        const int i = e / W, n = e % W;
        dr[e] = u.dR[i * M + n];
        eb[e] = u.dSk[i * M + n];
      }
    });
  } else {
    // phase: G[i, d] = df(q_i)[d] = sum_n dR[i, n] S'[d, n];  D_c = [sum_i fq[i, d] dR[i, n] ; sum_i dSk[i, n]]
    ex.phase([&](int tid, int nthr) {
      for (int e = tid; e < L * Dk; e += nthr) {
        const int i = e / Dk, d = e % Dk;
        float acc = 0.0f;
        for (int n = 0; n < W; ++n) acc = fmaf(u.dR[i * M + n], P[(int64_t)d * W + n], acc);
        u.G[i * M + d] = acc;
      }
      for (int64_t e = tid; e < S; e += nthr) {
        const int d = (int)(e / W), n = (int)(e % W);
        float acc = 0.0f;
        if (d < Dk)
          for (int i = 0; i < L; ++i) acc = fmaf(u.fq[i * M + d], u.dR[i * M + n], acc);
        else
          for (int i = 0; i < L; ++i) acc += u.dSk[i * M + n];
        D[e] = acc;
      }
    });
  }
  // phase: store dq = f'(q) df(q)
  ex.phase([&](int tid, int nthr) { store_grads<T>(tid, nthr, a, b, h, t0, L, u.fq, u.G, nullptr, nullptr, nullptr); });
}

// backward_sweep, state element e (< S) of (b, h): one thread, no shared memory.
template <class T>
NE_LA_HD void backward_sweep_element(const ChunkArgs<T>& a, int64_t bh, int64_t e) {
  const ChunkShape& s = a.s;
  const int64_t S = s.S(), nc = s.nc();
  float* xb = a.xbuf + bh * nc * S + e;  // xb[c * S] = D_c, then X_c
  float X = a.gfin ? a.gfin[bh * S + e] : 0.0f;
  if (s.causal) {
    const float lam = a.decay ? a.decay[bh % s.H] : 1.0f;
    // lambda^L_c (= pw[L] of the bodies): L_c = C but for the last chunk
    const float sC = (float)pow((double)lam, (double)s.C);
    const float sLast = (float)pow((double)lam, (double)(s.T - (nc - 1) * s.C));
    for (int64_t c = nc - 1; c >= 0; --c) {
      const float sL = c == nc - 1 ? sLast : sC;
      const float Dc = xb[c * S];
      xb[c * S] = X;  // X_c: the gradient of the state after chunk c
      X = fmaf(sL, X, Dc);
    }
  } else {
    for (int64_t c = 0; c < nc; ++c) X += xb[c * S];
    if (nc > 0) xb[0] = X;  // G, read by every chunk's backward_kv
  }
  if (a.ginit) a.ginit[bh * S + e] = X;
}

// backward_kv, block (b, h, chunk c), after backward_sweep. smem: smem_floats(Backward) (X in the P slot
// if state_smem).
template <class T, class Exec>
NE_LA_HD void backward_kv_body(Exec& ex, const ChunkArgs<T>& a, int64_t bh, int64_t c, float* smem) {
  const ChunkShape& s = a.s;
  const Bufs u = carve(KernelKind::Backward, s, a.state_smem, smem);
  const int64_t b = bh / s.H, h = bh % s.H, S = s.S(), nc = s.nc();
  const int Dk = s.Dk, W = s.W(), M = s.M(), C = s.C;
  const int64_t t0 = c * C;
  const int L = (int)((s.T - t0) < C ? (s.T - t0) : C);
  const float* Xg = a.xbuf + (bh * nc + (s.causal ? c : 0)) * S;  // X_c (non-causal: G)
  const float* X = a.state_smem ? u.P : Xg;
  const float lam = a.decay ? a.decay[h] : 1.0f;
  // phase: pw; f(q) (causal), [f(k); 1], [v; 1]; dR, E (causal, from backward_local); X (smem copy)
  ex.phase([&](int tid, int nthr) {
    powers(tid, nthr, s, lam, u.pw);
    load_chunk<T>(tid, nthr, a, b, h, t0, L, s.causal ? u.fq : nullptr, u.fk1, u.v1, nullptr);
    if (s.causal) {
      const float* dr = a.drbuf + (bh * s.T + t0) * W;
      const float* eb = a.ebuf + (bh * s.T + t0) * W;
      for (int e = tid; e < L * W; e += nthr) {
        const int i = e / W, n = e % W;
        u.dR[i * M + n] = dr[e];
        u.dSk[i * M + n] = eb[e];
      }
    }
    if (a.state_smem) copy_or_zero(tid, nthr, S, Xg, u.P);
  });
  if (s.causal) {
    // phase: A[i, j] = lambda^(i-j) f(q_i) . f(k_j), Bm[i, j] = lambda^(i-j) dr_i . v1_j  (j <= i, else 0)
    ex.phase([&](int tid, int nthr) {
      causal_gram(tid, nthr, L, Dk, u.fq, u.fk1, M, u.pw, u.A, C);
      causal_gram(tid, nthr, L, W, u.dR, u.v1, M, u.pw, u.Bm, C);
    });
    // phase: Sk[j, d] = df(k_j)[d] = lambda^(L-1-j) sum_n v1[j, n] X[d, n] + sum_{i>=j} Bm[i, j] f(q_i)[d]
    //        R[j, n]  = dv1_j[n]   = sum_{i>=j} A[i, j] dR[i, n] + E[j, n]
    //                                 + lambda^(L-1-j) sum_{d<=Dk} fk1[j, d] X[d, n]
    ex.phase([&](int tid, int nthr) {
      for (int e = tid; e < L * Dk; e += nthr) {
        const int j = e / Dk, d = e % Dk;
        float inter = 0.0f, intra = 0.0f;
        for (int n = 0; n < W; ++n) inter = fmaf(u.v1[j * M + n], X[(int64_t)d * W + n], inter);
        for (int i = j; i < L; ++i) intra = fmaf(u.Bm[i * C + j], u.fq[i * M + d], intra);
        u.Sk[j * M + d] = fmaf(u.pw[L - 1 - j], inter, intra);
      }
      for (int e = tid; e < L * W; e += nthr) {
        const int j = e / W, n = e % W;
        float inter = 0.0f, intra = 0.0f;
        for (int d = 0; d <= Dk; ++d) inter = fmaf(u.fk1[j * M + d], X[(int64_t)d * W + n], inter);
        for (int i = j; i < L; ++i) intra = fmaf(u.A[i * C + j], u.dR[i * M + n], intra);
        u.R[j * M + n] = fmaf(u.pw[L - 1 - j], inter, intra + u.dSk[j * M + n]);
      }
    });
  } else {
    // phase: Sk[j, d] = df(k_j)[d] = sum_n v1[j, n] G[d, n];  R[j, n] = dv1_j[n] = sum_{d<=Dk} fk1[j, d] G[d, n]
    ex.phase([&](int tid, int nthr) {
      for (int e = tid; e < L * Dk; e += nthr) {
        const int j = e / Dk, d = e % Dk;
        float acc = 0.0f;
        for (int n = 0; n < W; ++n) acc = fmaf(u.v1[j * M + n], X[(int64_t)d * W + n], acc);
        u.Sk[j * M + d] = acc;
      }
      for (int e = tid; e < L * W; e += nthr) {
        const int j = e / W, n = e % W;
        float acc = 0.0f;
        for (int d = 0; d <= Dk; ++d) acc = fmaf(u.fk1[j * M + d], X[(int64_t)d * W + n], acc);
        u.R[j * M + n] = acc;
      }
    });
  }
  // phase: store dk = f'(k) df(k), dv = dv1[:Dv]
  ex.phase([&](int tid, int nthr) { store_grads<T>(tid, nthr, a, b, h, t0, L, nullptr, nullptr, u.fk1, u.Sk, u.R); });
}

#undef NE_LA_HD

// The launchers (cuda/linear_attention_chunk.cu; float, __half, __nv_bfloat16), called with checked
// arguments (a.s.C and the scratch pointers are set inside): enqueue the chunked forward (states + output
// kernels) or backward (states + backward kernels) on `stream`. false when no chunk size fits in
// `max_smem_bytes` of shared memory (nothing enqueued: the caller runs the recurrent kernels).
template <class T>
bool chunk_forward(ChunkArgs<T> a, int64_t max_smem_bytes, void* stream);
template <class T>
bool chunk_backward(ChunkArgs<T> a, int64_t max_smem_bytes, void* stream);

}  // namespace la2
}  // namespace cuda
}  // namespace ne
