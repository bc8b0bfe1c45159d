// Linear attention, MALA and norm attention on the GPU (contract and readouts: cpp/ops/linear_attention.h).
//
// Every op carries one augmented state per (batch b, head h):
//   S'_t = lambda S'_{t-1} + k'_t v'_t^T,   k' = [f(k_t); 1], v' = [v_t; 1],   S' in R^{(Dk+1) x (Dv+1)} fp32
// and reads it out with a = f(q_t) (zero-padded to Dk+1):
//   r_t   = S'_t[:Dk, :]^T a          (r[:Dv] = S^T f(q), r[Dv] = f(q) . z)
//   row_t = S'_t[Dk, :]                (row[:Dv] = sum v, row[Dv] = n, tokens incl. the initial state's)
//   linear: o = r[:Dv] / (r[Dv] + eps)  (or r[:Dv])
//   MALA:   c = Dk^-1/2, zq = c r[Dv] / n, beta = 1 + 1 / (zq + eps), o = beta c r[:Dv] / n - zq row[:Dv] / n
//   norm:   o = Norm(r[:Dv])  (RMS or LayerNorm over Dv, no affine)
// Non-causal: every token reads the state after all tokens (lambda must be 1).
//
// Backward (recomputes S' from q, k, v, initial_state; nothing saved by the forward):
//   pass 1 (t ascending): recompute S'_t, r_t, row_t; dr_t, drow_t from grad_o (per-op formulas below);
//          d f(q_t) = S'_t[:Dk, :] dr_t; dr_t, drow_t go to a scratch buffer [B*H, T, 2 (Dv+1)] fp32.
//   pass 2 (t descending): G_t = dS'_t (total) = [a_t dr_t^T ; drow_t^T] + lambda G_{t+1}, G_{T-1} includes
//          grad_final_state; d f(k_t) = G_t[:Dk, :] v'_t, dv_t = G_t[:, :Dv]^T k'_t; d initial = lambda G_0.
//
// Version 1 (correct first): one block of 256 threads per (b, h) walks the tokens in order (the recurrent
// form, O(T Dk Dv) work per head, no chunking yet). The state lives in shared memory when it fits
// (opt-in dynamic shared memory: (Dk+1)(Dv+1) floats forward, twice that backward), else in a global
// fp32 scratch (L2 resident). Threads own state columns for the rank-1 updates and column readouts
// (conflict-free, coalesced) and state rows for the row readouts (stride Dv+1). Memory traffic is the
// minimum: q, k, v read once per pass, o / grads written once; the cost is T sequential steps with two
// to four block barriers each, so throughput is bounded by latency, not bandwidth. These kernels run
// for algorithm="recurrent" (LinAttnAlgorithm::Recurrent) and as the fallback where no chunk fits in
// shared memory; they are the reference the chunked kernels are tested against on a GPU.
//
// Version 2 (the default, LinAttnAlgorithm::Chunk): the chunkwise-parallel form, C = 64 tokens per chunk
// (32 / 16 for wide heads), intra-chunk masked products plus inter-chunk state, in
// cuda/linear_attention_chunk.cu / .cuh; the entry points below dispatch to it after their checks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "linear_attention_chunk.cuh"
#include "ops/linear_attention.h"

namespace ne {
namespace cuda {
// The contract's declarations (also in cpp/ops/linear_attention.h; repeated here so this file compiles
// against either version of the header).
void linear_attention_forward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView* decay, const TensorView* initial_state, const TensorView& o,
                              const TensorView* final_state, void* stream);
void linear_attention_backward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView* decay, const TensorView* initial_state, const TensorView& grad_o,
                               const TensorView* grad_final_state, const TensorView& grad_q, const TensorView& grad_k,
                               const TensorView& grad_v, const TensorView* grad_initial_state, void* stream);

namespace {

constexpr int kThreads = 256;
constexpr int kMaxHeadDim = 256;

// A [B, T, H, D] tensor with unit last stride.
template <class T>
struct V4 {
  T* p;
  int64_t sb, st, sh;
  __device__ T* at(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};

struct Shape {
  int B, H, Dk, Dv;
  int64_t T;
  int kind, fmap, out_norm;
  bool causal, normalize;
  float eps;
};

// phi and its derivative: 0 elu+1, 1 relu, 2 identity.
__device__ __forceinline__ float fmap_f(int m, float x) {
  if (m == 0) return x > 0.f ? x + 1.f : expf(x);
  if (m == 1) return x > 0.f ? x : 0.f;
  return x;
}
__device__ __forceinline__ float fmap_d(int m, float x) {
  if (m == 0) return x > 0.f ? 1.f : expf(x);
  if (m == 1) return x > 0.f ? 1.f : 0.f;
  return 1.f;
}

// Sum of v over the block, returned to every thread. red: 32 floats of shared memory; two barriers,
// so consecutive calls may reuse red.
__device__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[w] = v;
  __syncthreads();
  float s = 0.f;
  const int nw = blockDim.x >> 5;
  for (int i = 0; i < nw; ++i) s += red[i];
  __syncthreads();
  return s;
}

// Shared-memory vectors of one step (floats): a, qr, kf, kr [Dk+1 each], vv, dov, r, row, dr, drow [Dv+1 each], red[32].
struct Vecs {
  float *a, *qr, *kf, *kr, *vv, *dov, *r, *row, *dr, *drow, *red;
};
__host__ __device__ inline int64_t vec_floats(int Dk, int Dv) { return 4 * (int64_t)(Dk + 1) + 6 * (int64_t)(Dv + 1) + 32; }
__device__ inline Vecs carve(float* base, int Dk, int Dv) {
  Vecs s;
  s.a = base; base += Dk + 1;
  s.qr = base; base += Dk + 1;
  s.kf = base; base += Dk + 1;
  s.kr = base; base += Dk + 1;
  s.vv = base; base += Dv + 1;
  s.dov = base; base += Dv + 1;
  s.r = base; base += Dv + 1;
  s.row = base; base += Dv + 1;
  s.dr = base; base += Dv + 1;
  s.drow = base; base += Dv + 1;
  s.red = base;
  return s;
}

// Load token t of (b, h): a = f(q), qr = q, kf = [f(k); 1], kr = k, vv = [v; 1] (those requested).
template <class T>
__device__ void load_token(const Shape& sh, const V4<const T>& q, const V4<const T>& k, const V4<const T>& v, int b,
                           int h, int64_t t, bool lq, bool lkv, Vecs& s) {
  const int fm = sh.fmap;
  if (lq) {
    const T* qp = q.at(b, t, h);
    for (int i = threadIdx.x; i < sh.Dk; i += blockDim.x) {
      const float x = Elem<T>::load(qp[i]);
      s.qr[i] = x;
      s.a[i] = fmap_f(fm, x);
    }
  }
  if (lkv) {
    const T* kp = k.at(b, t, h);
    const T* vp = v.at(b, t, h);
    for (int i = threadIdx.x; i < sh.Dk; i += blockDim.x) {
      const float x = Elem<T>::load(kp[i]);
      s.kr[i] = x;
      s.kf[i] = fmap_f(fm, x);
    }
    for (int j = threadIdx.x; j < sh.Dv; j += blockDim.x) s.vv[j] = Elem<T>::load(vp[j]);
    if (threadIdx.x == 0) {
      s.kf[sh.Dk] = 1.f;
      s.vv[sh.Dv] = 1.f;
    }
  }
}

// Column pass: optionally S' = lam S' + kf vv^T, then r = S'[:Dk,:]^T a, row = S'[Dk,:].
__device__ void update_read(const Shape& sh, float* S, float lam, bool upd, bool read, Vecs& s) {
  const int ld = sh.Dv + 1, Dk = sh.Dk;
  for (int j = threadIdx.x; j <= sh.Dv; j += blockDim.x) {
    float acc = 0.f;
    const float vj = s.vv[j];
    for (int i = 0; i < Dk; ++i) {
      float x = S[(int64_t)i * ld + j];
      if (upd) {
        x = fmaf(lam, x, s.kf[i] * vj);
        S[(int64_t)i * ld + j] = x;
      }
      acc = fmaf(s.a[i], x, acc);
    }
    float x = S[(int64_t)Dk * ld + j];
    if (upd) {
      x = fmaf(lam, x, vj);
      S[(int64_t)Dk * ld + j] = x;
    }
    if (read) {
      s.r[j] = acc;
      s.row[j] = x;
    }
  }
}

// o from r, row (all threads call: contains block reductions). Writes o_t.
template <class T>
__device__ void readout(const Shape& sh, Vecs& s, T* op) {
  const int Dv = sh.Dv;
  const float eps = sh.eps;
  if (sh.kind == 0) {
    const float den = sh.normalize ? 1.f / (s.r[Dv] + eps) : 1.f;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) op[j] = Elem<T>::store(s.r[j] * den);
  } else if (sh.kind == 1) {
    const float c = rsqrtf((float)sh.Dk), n = s.row[Dv];
    const float zq = c * s.r[Dv] / n, beta = 1.f + 1.f / (zq + eps);
    for (int j = threadIdx.x; j < Dv; j += blockDim.x)
      op[j] = Elem<T>::store(beta * c * s.r[j] / n - zq * s.row[j] / n);
  } else {
    float s1 = 0.f, s2 = 0.f;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      s1 += s.r[j];
      s2 += s.r[j] * s.r[j];
    }
    const float mean = sh.out_norm == 1 ? block_sum(s1, s.red) / Dv : 0.f;
    float s3 = 0.f;  // sum (y - mean)^2, two-pass for LayerNorm
    if (sh.out_norm == 1)
      for (int j = threadIdx.x; j < Dv; j += blockDim.x) s3 += (s.r[j] - mean) * (s.r[j] - mean);
    else
      s3 = s2;
    const float var = block_sum(s3, s.red) / Dv, inv = rsqrtf(var + eps);
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) op[j] = Elem<T>::store((s.r[j] - mean) * inv);
  }
}

// dr, drow from grad_o (in s.dov) and r, row. All threads call.
__device__ void readout_grad(const Shape& sh, Vecs& s) {
  const int Dv = sh.Dv;
  const float eps = sh.eps;
  if (sh.kind == 0) {
    if (sh.normalize) {
      const float inv = 1.f / (s.r[Dv] + eps);
      float p = 0.f;
      for (int j = threadIdx.x; j < Dv; j += blockDim.x) p += s.dov[j] * s.r[j];
      p = block_sum(p, s.red);
      for (int j = threadIdx.x; j < Dv; j += blockDim.x) s.dr[j] = s.dov[j] * inv;
      if (threadIdx.x == 0) s.dr[Dv] = -p * inv * inv;
    } else {
      for (int j = threadIdx.x; j < Dv; j += blockDim.x) s.dr[j] = s.dov[j];
      if (threadIdx.x == 0) s.dr[Dv] = 0.f;
    }
    for (int j = threadIdx.x; j <= Dv; j += blockDim.x) s.drow[j] = 0.f;
  } else if (sh.kind == 1) {
    // o_j = beta A_j / n - zq row_j / n with A = c r, zq = c r[Dv] / n, beta = 1 + 1 / (zq + eps).
    const float c = rsqrtf((float)sh.Dk), n = s.row[Dv];
    const float zq = c * s.r[Dv] / n, ze = zq + eps, beta = 1.f + 1.f / ze;
    float pa = 0.f, pr = 0.f;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      pa += s.dov[j] * c * s.r[j];
      pr += s.dov[j] * s.row[j];
    }
    const float sA = block_sum(pa, s.red), sR = block_sum(pr, s.red);
    const float gzq = -sA / (n * ze * ze) - sR / n;                            // dL/dzq
    const float dn = -beta * sA / (n * n) + zq * sR / (n * n) - gzq * zq / n;  // dL/dn (zq depends on n)
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      s.dr[j] = s.dov[j] * beta * c / n;
      s.drow[j] = -s.dov[j] * zq / n;
    }
    if (threadIdx.x == 0) {
      s.dr[Dv] = c * gzq / n;
      s.drow[Dv] = dn;
    }
  } else {
    float s1 = 0.f, s2 = 0.f;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      s1 += s.r[j];
      s2 += s.r[j] * s.r[j];
    }
    const bool ln = sh.out_norm == 1;
    const float mean = ln ? block_sum(s1, s.red) / Dv : 0.f;
    float s3 = 0.f;
    if (ln)
      for (int j = threadIdx.x; j < Dv; j += blockDim.x) s3 += (s.r[j] - mean) * (s.r[j] - mean);
    else
      s3 = s2;
    const float inv = rsqrtf(block_sum(s3, s.red) / Dv + eps);
    float pd = 0.f, po = 0.f;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      const float oj = (s.r[j] - mean) * inv;
      pd += s.dov[j];
      po += s.dov[j] * oj;
    }
    const float m1 = ln ? block_sum(pd, s.red) / Dv : 0.f, m2 = block_sum(po, s.red) / Dv;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      const float oj = (s.r[j] - mean) * inv;
      s.dr[j] = inv * (s.dov[j] - m1 - oj * m2);
    }
    for (int j = threadIdx.x; j <= Dv; j += blockDim.x) s.drow[j] = 0.f;
    if (threadIdx.x == 0) s.dr[Dv] = 0.f;
  }
}

__device__ void copy_state(float* dst, const float* src, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src ? src[i] : 0.f;
}

template <class T>
__global__ void __launch_bounds__(kThreads) lin_attn_fwd_kernel(Shape sh, V4<const T> q, V4<const T> k,
                                                                 V4<const T> v, V4<T> o, const float* decay,
                                                                 const float* init, float* fin, float* gscratch,
                                                                 bool state_in_smem) {
  extern __shared__ float smem[];
  const int bh = blockIdx.x, b = bh / sh.H, h = bh % sh.H;
  const int64_t nS = (int64_t)(sh.Dk + 1) * (sh.Dv + 1);
  float* S = state_in_smem ? smem : gscratch + (int64_t)bh * nS;
  Vecs s = carve(state_in_smem ? smem + nS : smem, sh.Dk, sh.Dv);
  const float lam = decay ? decay[h] : 1.f;
  copy_state(S, init ? init + (int64_t)bh * nS : nullptr, nS);
  __syncthreads();
  if (!sh.causal) {  // accumulate all tokens first
    for (int64_t t = 0; t < sh.T; ++t) {
      load_token<T>(sh, q, k, v, b, h, t, false, true, s);
      __syncthreads();
      update_read(sh, S, lam, true, false, s);
      __syncthreads();
    }
  }
  for (int64_t t = 0; t < sh.T; ++t) {
    load_token<T>(sh, q, k, v, b, h, t, true, sh.causal, s);
    __syncthreads();
    update_read(sh, S, lam, sh.causal, true, s);
    __syncthreads();
    readout<T>(sh, s, o.at(b, t, h));
    // next step's load writes a, kf, vv only (readout reads r, row); its barrier orders r reuse.
  }
  __syncthreads();
  if (fin)
    for (int64_t i = threadIdx.x; i < nS; i += blockDim.x) fin[(int64_t)bh * nS + i] = S[i];
}

// The runner's rows (linear_attention_rows): one block per (sequence i, head h) walks the sequence's
// rows as the causal forward above walks its tokens, from the state of the sequence's slot (zero for a
// sequence that starts at position 0) and back into it. The state lives in shared memory when it fits,
// else it is updated in place in global memory. The head's columns are views whose base holds the
// head's offset (GQA: kv head g = h / group), so load_token's (b, h) are (0, 0). Sequences of chunk_min
// rows or more (chunk_min > 0) went through the chunked kernels: their blocks do nothing.
__global__ void __launch_bounds__(kThreads) lin_attn_rows_kernel(Shape sh, LinAttnRowsArgs a, bool state_in_smem,
                                                                 int chunk_min) {
  extern __shared__ float smem[];
  const int i = blockIdx.x / sh.H, h = blockIdx.x % sh.H, g = h / (sh.H / a.n_kv_heads);
  const int64_t t0 = i ? a.last[i - 1] + 1 : 0, T = a.last[i] + 1 - t0;
  if (chunk_min > 0 && T >= chunk_min) return;  // the whole block: this sequence went chunked
  const int64_t nS = (int64_t)(sh.Dk + 1) * (sh.Dv + 1);
  float* home = a.state + ((int64_t)a.slot_of_row[t0] * sh.H + h) * nS;
  float* S = state_in_smem ? smem : home;
  Vecs s = carve(state_in_smem ? smem + nS : smem, sh.Dk, sh.Dv);
  const bool fresh = a.pos[t0] == 0;
  if (state_in_smem || fresh) copy_state(S, fresh ? nullptr : home, nS);
  __syncthreads();
  const V4<const float> q{a.q + t0 * a.ldq + (int64_t)h * sh.Dk, 0, a.ldq, 0};
  const V4<const float> k{a.k + t0 * a.ldk + (int64_t)g * sh.Dk, 0, a.ldk, 0};
  const V4<const float> v{a.v + t0 * a.ldv + (int64_t)g * sh.Dv, 0, a.ldv, 0};
  const float lam = a.decay ? a.decay[h] : 1.f;
  for (int64_t t = 0; t < T; ++t) {
    load_token<float>(sh, q, k, v, 0, 0, t, true, true, s);
    __syncthreads();
    update_read(sh, S, lam, true, true, s);
    __syncthreads();
    readout<float>(sh, s, a.o + (t0 + t) * a.ldo + (int64_t)h * sh.Dv);
  }
  __syncthreads();
  if (state_in_smem)
    for (int64_t e = threadIdx.x; e < nS; e += blockDim.x) home[e] = S[e];
}

template <class T>
__global__ void __launch_bounds__(kThreads) lin_attn_bwd_kernel(Shape sh, V4<const T> q, V4<const T> k,
                                                                 V4<const T> v, V4<const T> go, V4<T> gq, V4<T> gk,
                                                                 V4<T> gv, const float* decay, const float* init,
                                                                 const float* gfin, float* ginit, float* gscratch,
                                                                 float* drbuf, bool state_in_smem) {
  extern __shared__ float smem[];
  const int bh = blockIdx.x, b = bh / sh.H, h = bh % sh.H;
  const int Dk = sh.Dk, Dv = sh.Dv, ld = Dv + 1;
  const int64_t nS = (int64_t)(Dk + 1) * (Dv + 1);
  float* S = state_in_smem ? smem : gscratch + (int64_t)bh * 2 * nS;
  float* G = S + nS;
  Vecs s = carve(state_in_smem ? smem + 2 * nS : smem, Dk, Dv);
  float* DR = drbuf + (int64_t)bh * sh.T * 2 * ld;
  const float lam = decay ? decay[h] : 1.f;
  const int fm = sh.fmap;

  // ---- pass 1: S'_t, dr_t, drow_t, dq_t
  copy_state(S, init ? init + (int64_t)bh * nS : nullptr, nS);
  __syncthreads();
  if (!sh.causal) {
    for (int64_t t = 0; t < sh.T; ++t) {
      load_token<T>(sh, q, k, v, b, h, t, false, true, s);
      __syncthreads();
      update_read(sh, S, lam, true, false, s);
      __syncthreads();
    }
  }
  for (int64_t t = 0; t < sh.T; ++t) {
    load_token<T>(sh, q, k, v, b, h, t, true, sh.causal, s);
    const T* gop = go.at(b, t, h);
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) s.dov[j] = Elem<T>::load(gop[j]);
    __syncthreads();
    update_read(sh, S, lam, sh.causal, true, s);
    __syncthreads();
    readout_grad(sh, s);
    __syncthreads();
    for (int j = threadIdx.x; j < ld; j += blockDim.x) {
      DR[t * 2 * ld + j] = s.dr[j];
      DR[t * 2 * ld + ld + j] = s.drow[j];
    }
    T* gqp = gq.at(b, t, h);
    for (int i = threadIdx.x; i < Dk; i += blockDim.x) {  // d f(q)_i = S'[i, :] . dr
      float acc = 0.f;
      for (int j = 0; j < ld; ++j) acc = fmaf(S[(int64_t)i * ld + j], s.dr[j], acc);
      gqp[i] = Elem<T>::store(acc * fmap_d(fm, s.qr[i]));
    }
    __syncthreads();
  }

  // ---- pass 2: G_t, dk_t, dv_t
  copy_state(G, gfin ? gfin + (int64_t)bh * nS : nullptr, nS);
  __syncthreads();
  // G += [a dr^T ; drow^T], after G *= step (column pass)
  auto accumulate = [&](float step) {
    for (int j = threadIdx.x; j < ld; j += blockDim.x) {
      const float drj = s.dr[j];
      for (int i = 0; i < Dk; ++i) {
        const int64_t x = (int64_t)i * ld + j;
        G[x] = fmaf(step, G[x], s.a[i] * drj);
      }
      const int64_t x = (int64_t)Dk * ld + j;
      G[x] = fmaf(step, G[x], s.drow[j]);
    }
  };
  auto load_dr = [&](int64_t t) {
    for (int j = threadIdx.x; j < ld; j += blockDim.x) {
      s.dr[j] = DR[t * 2 * ld + j];
      s.drow[j] = DR[t * 2 * ld + ld + j];
    }
  };
  // dv_t = G[:, :Dv]^T k' (column pass), d f(k)_t = G[:Dk, :] v' (row pass); the caller syncs before.
  auto kv_grads = [&](int64_t t) {
    T* gvp = gv.at(b, t, h);
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      float acc = G[(int64_t)Dk * ld + j];  // k'[Dk] = 1
      for (int i = 0; i < Dk; ++i) acc = fmaf(G[(int64_t)i * ld + j], s.kf[i], acc);
      gvp[j] = Elem<T>::store(acc);
    }
    T* gkp = gk.at(b, t, h);
    for (int i = threadIdx.x; i < Dk; i += blockDim.x) {
      float acc = G[(int64_t)i * ld + Dv];  // v'[Dv] = 1
      for (int j = 0; j < Dv; ++j) acc = fmaf(G[(int64_t)i * ld + j], s.vv[j], acc);
      gkp[i] = Elem<T>::store(acc * fmap_d(fm, s.kr[i]));
    }
  };
  if (sh.causal) {
    for (int64_t t = sh.T - 1; t >= 0; --t) {
      load_token<T>(sh, q, k, v, b, h, t, true, true, s);
      load_dr(t);
      __syncthreads();
      accumulate(t == sh.T - 1 ? 1.f : lam);
      __syncthreads();
      kv_grads(t);
      __syncthreads();
    }
  } else {
    for (int64_t t = 0; t < sh.T; ++t) {
      load_token<T>(sh, q, k, v, b, h, t, true, false, s);
      load_dr(t);
      __syncthreads();
      accumulate(1.f);
      __syncthreads();
    }
    for (int64_t t = 0; t < sh.T; ++t) {
      load_token<T>(sh, q, k, v, b, h, t, false, true, s);
      __syncthreads();
      kv_grads(t);
      __syncthreads();
    }
  }
  if (ginit) {
    const float f = (sh.causal && sh.T > 0) ? lam : 1.f;
    for (int64_t i = threadIdx.x; i < nS; i += blockDim.x) ginit[(int64_t)bh * nS + i] = f * G[i];
  }
}

// ------------------------------------------------------------------ host side
void check_cuda_view(const TensorView& t, const char* name) {
  if (t.device.type != DeviceType::CUDA) throw DeviceError(std::string(name) + ": expected a CUDA tensor");
}

template <class T>
V4<T> view4(const TensorView& t, const char* name, int64_t B, int64_t Tn, int64_t H, int64_t D) {
  check_cuda_view(t, name);
  if (t.ndim != 4 || t.shape[0] != B || t.shape[1] != Tn || t.shape[2] != H || t.shape[3] != D)
    throw ShapeError(std::string(name) + ": expected shape [" + std::to_string(B) + ", " + std::to_string(Tn) +
                     ", " + std::to_string(H) + ", " + std::to_string(D) + "]");
  if (D > 1 && t.strides[3] != 1) throw ShapeError(std::string(name) + ": the last dimension must have stride 1");
  return V4<T>{static_cast<T*>(t.data), t.strides[0], t.strides[1], t.strides[2]};
}

const float* state_ptr(const TensorView* t, const char* name, int64_t B, int64_t H, int Dk, int Dv) {
  if (!t) return nullptr;
  check_cuda_view(*t, name);
  if (t->dtype != DType::F32) throw DTypeError(std::string(name) + ": expected float32");
  if (t->ndim != 4 || t->shape[0] != B || t->shape[1] != H || t->shape[2] != Dk + 1 || t->shape[3] != Dv + 1 ||
      !t->is_contiguous())
    throw ShapeError(std::string(name) + ": expected a contiguous float32 [B, H, Dk+1, Dv+1] tensor");
  return static_cast<const float*>(t->data);
}

// The op's parameters and head dims into sh (checked).
void set_params(Shape& sh, const LinAttnParams& p, int Dk, int Dv) {
  sh.Dk = Dk;
  sh.Dv = Dv;
  if (sh.Dk < 1 || sh.Dk > kMaxHeadDim)
    throw UnsupportedError("q: head dim Dk = " + std::to_string(sh.Dk) + " not supported on CUDA (1 .. 256)");
  if (sh.Dv < 1 || sh.Dv > kMaxHeadDim)
    throw UnsupportedError("v: head dim Dv = " + std::to_string(sh.Dv) + " not supported on CUDA (1 .. 256)");
  sh.kind = static_cast<int>(p.kind);
  if (sh.kind < 0 || sh.kind > 2) throw ValueError("kind: unknown value " + std::to_string(sh.kind));
  sh.fmap = p.kind == LinAttnKind::Linear ? static_cast<int>(p.fmap)
                                          : (p.kind == LinAttnKind::Mala ? 0 : 2);
  if (sh.fmap < 0 || sh.fmap > 2) throw ValueError("feature_map: unknown value " + std::to_string(sh.fmap));
  sh.out_norm = p.out_norm;
  if (p.kind == LinAttnKind::Norm && (p.out_norm < 0 || p.out_norm > 1))
    throw ValueError("norm: expected 0 (rms) or 1 (layer)");
  sh.causal = p.causal;
  sh.normalize = p.normalize;
  sh.eps = p.eps;
}

Shape make_shape(const LinAttnParams& p, const TensorView& q, const TensorView& v, const TensorView* decay) {
  if (q.ndim != 4) throw ShapeError("q: expected [B, T, H, Dk]");
  if (v.ndim != 4) throw ShapeError("v: expected [B, T, H, Dv]");
  Shape sh;
  sh.B = static_cast<int>(q.shape[0]);
  sh.T = q.shape[1];
  sh.H = static_cast<int>(q.shape[2]);
  set_params(sh, p, static_cast<int>(q.shape[3]), static_cast<int>(v.shape[3]));
  if ((int64_t)sh.B * sh.H > 2147483647LL) throw UnsupportedError("q: B * H too large");
  if (decay) {
    check_cuda_view(*decay, "decay");
    if (p.kind != LinAttnKind::Norm) throw ValueError("decay: only norm attention takes a decay");
    if (!p.causal) throw ValueError("decay: must be None for non-causal norm attention");
    if (decay->dtype != DType::F32 || decay->ndim != 1 || decay->shape[0] != sh.H || !decay->is_contiguous())
      throw ShapeError("decay: expected a contiguous float32 [H] tensor");
  }
  return sh;
}

int max_smem_optin() {
  int dev = 0, n = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  return n;
}

template <class Fn>
void with_elem(DType t, const char* name, Fn&& fn) {
  switch (t) {
    case DType::F32: return fn(float{});
    case DType::F16: return fn(__half{});
    case DType::BF16: return fn(__nv_bfloat16{});
    default: throw DTypeError(std::string(name) + ": expected float32, float16 or bfloat16");
  }
}

// The chunked kernels' arguments (cuda/linear_attention_chunk.cuh) from the checked shape and views.
template <class T>
la2::Tok<T> tok(const V4<T>& x) {
  la2::Tok<T> t;
  t.p = x.p;
  t.sb = x.sb;
  t.st = x.st;
  t.sh = x.sh;
  return t;
}

template <class T>
la2::ChunkArgs<T> chunk_common(const Shape& sh, const V4<const T>& q, const V4<const T>& k, const V4<const T>& v,
                               const float* decay, const float* init) {
  la2::ChunkArgs<T> a;
  a.s.B = sh.B;
  a.s.H = sh.H;
  a.s.Dk = sh.Dk;
  a.s.Dv = sh.Dv;
  a.s.T = sh.T;
  a.s.kind = sh.kind;
  a.s.fmap = sh.fmap;
  a.s.out_norm = sh.out_norm;
  a.s.causal = sh.causal;
  a.s.normalize = sh.normalize;
  a.s.eps = sh.eps;
  a.q = tok(q);
  a.k = tok(k);
  a.v = tok(v);
  a.decay = decay;
  a.init = init;
  return a;
}

template <class T>
la2::ChunkArgs<T> chunk_fwd_args(const Shape& sh, const V4<const T>& q, const V4<const T>& k, const V4<const T>& v,
                                 const V4<T>& o, const float* decay, const float* init, float* fin) {
  la2::ChunkArgs<T> a = chunk_common<T>(sh, q, k, v, decay, init);
  a.o = tok(o);
  a.fin = fin;
  return a;
}

template <class T>
la2::ChunkArgs<T> chunk_bwd_args(const Shape& sh, const V4<const T>& q, const V4<const T>& k, const V4<const T>& v,
                                 const V4<const T>& go, const V4<T>& gq, const V4<T>& gk, const V4<T>& gv,
                                 const float* decay, const float* init, const float* gfin, float* ginit) {
  la2::ChunkArgs<T> a = chunk_common<T>(sh, q, k, v, decay, init);
  a.go = tok(go);
  a.gq = tok(gq);
  a.gk = tok(gk);
  a.gv = tok(gv);
  a.gfin = gfin;
  a.ginit = ginit;
  return a;
}

}  // namespace

void linear_attention_forward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView* decay, const TensorView* initial_state, const TensorView& o,
                              const TensorView* final_state, void* stream) {
  const Shape sh = make_shape(p, q, v, decay);
  if (k.dtype != q.dtype) throw DTypeError("k: dtype must match q");
  if (v.dtype != q.dtype) throw DTypeError("v: dtype must match q");
  if (o.dtype != q.dtype) throw DTypeError("o: dtype must match q");
  const float* init = state_ptr(initial_state, "initial_state", sh.B, sh.H, sh.Dk, sh.Dv);
  float* fin = const_cast<float*>(state_ptr(final_state, "final_state", sh.B, sh.H, sh.Dk, sh.Dv));
  const int64_t nbh = (int64_t)sh.B * sh.H;
  if (nbh == 0) return;
  cudaStream_t s = as_stream(stream);
  const int64_t nS = (int64_t)(sh.Dk + 1) * (sh.Dv + 1);
  const size_t vec_bytes = vec_floats(sh.Dk, sh.Dv) * sizeof(float);
  const bool in_smem = nS * sizeof(float) + vec_bytes <= (size_t)max_smem_optin();
  const size_t smem = in_smem ? nS * sizeof(float) + vec_bytes : vec_bytes;
  const float* dec = decay ? static_cast<const float*>(decay->data) : nullptr;
  with_elem(q.dtype, "q", [&](auto tag) {
    using T = decltype(tag);
    auto qv = view4<const T>(q, "q", sh.B, sh.T, sh.H, sh.Dk);
    auto kv = view4<const T>(k, "k", sh.B, sh.T, sh.H, sh.Dk);
    auto vv = view4<const T>(v, "v", sh.B, sh.T, sh.H, sh.Dv);
    auto ov = view4<T>(o, "o", sh.B, sh.T, sh.H, sh.Dv);
    if (sh.T == 0 && !fin) return;
    if (p.algorithm == LinAttnAlgorithm::Chunk &&
        la2::chunk_forward<T>(chunk_fwd_args<T>(sh, qv, kv, vv, ov, dec, init, fin), max_smem_optin(), s))
      return;  // else: recurrent (also where no chunk fits in shared memory)
    StreamScratch scratch;
    float* g = in_smem ? nullptr : static_cast<float*>(scratch.alloc(nbh * nS * sizeof(float), s));
    check(cudaFuncSetAttribute(lin_attn_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
          "cudaFuncSetAttribute (linear_attention_forward)");
    lin_attn_fwd_kernel<T><<<(unsigned)nbh, kThreads, smem, s>>>(sh, qv, kv, vv, ov, dec, init, fin, g, in_smem);
    check_launch("linear_attention_forward");
  });
}

void linear_attention_backward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView* decay, const TensorView* initial_state, const TensorView& grad_o,
                               const TensorView* grad_final_state, const TensorView& grad_q, const TensorView& grad_k,
                               const TensorView& grad_v, const TensorView* grad_initial_state, void* stream) {
  const Shape sh = make_shape(p, q, v, decay);
  const char* names[] = {"k", "v", "grad_o", "grad_q", "grad_k", "grad_v"};
  const TensorView* ts[] = {&k, &v, &grad_o, &grad_q, &grad_k, &grad_v};
  for (int i = 0; i < 6; ++i)
    if (ts[i]->dtype != q.dtype) throw DTypeError(std::string(names[i]) + ": dtype must match q");
  const float* init = state_ptr(initial_state, "initial_state", sh.B, sh.H, sh.Dk, sh.Dv);
  const float* gfin = state_ptr(grad_final_state, "grad_final_state", sh.B, sh.H, sh.Dk, sh.Dv);
  float* ginit = const_cast<float*>(state_ptr(grad_initial_state, "grad_initial_state", sh.B, sh.H, sh.Dk, sh.Dv));
  const int64_t nbh = (int64_t)sh.B * sh.H;
  if (nbh == 0) return;
  cudaStream_t s = as_stream(stream);
  const int64_t nS = (int64_t)(sh.Dk + 1) * (sh.Dv + 1);
  const size_t vec_bytes = vec_floats(sh.Dk, sh.Dv) * sizeof(float);
  const bool in_smem = 2 * nS * sizeof(float) + vec_bytes <= (size_t)max_smem_optin();
  const size_t smem = in_smem ? 2 * nS * sizeof(float) + vec_bytes : vec_bytes;
  const size_t state_bytes = in_smem ? 0 : (size_t)nbh * 2 * nS * sizeof(float);
  const size_t dr_bytes = (size_t)nbh * (size_t)(sh.T > 0 ? sh.T : 1) * 2 * (sh.Dv + 1) * sizeof(float);
  const float* dec = decay ? static_cast<const float*>(decay->data) : nullptr;
  with_elem(q.dtype, "q", [&](auto tag) {
    using T = decltype(tag);
    auto qv = view4<const T>(q, "q", sh.B, sh.T, sh.H, sh.Dk);
    auto kv = view4<const T>(k, "k", sh.B, sh.T, sh.H, sh.Dk);
    auto vv = view4<const T>(v, "v", sh.B, sh.T, sh.H, sh.Dv);
    auto gov = view4<const T>(grad_o, "grad_o", sh.B, sh.T, sh.H, sh.Dv);
    auto gqv = view4<T>(grad_q, "grad_q", sh.B, sh.T, sh.H, sh.Dk);
    auto gkv = view4<T>(grad_k, "grad_k", sh.B, sh.T, sh.H, sh.Dk);
    auto gvv = view4<T>(grad_v, "grad_v", sh.B, sh.T, sh.H, sh.Dv);
    if (p.algorithm == LinAttnAlgorithm::Chunk &&
        la2::chunk_backward<T>(chunk_bwd_args<T>(sh, qv, kv, vv, gov, gqv, gkv, gvv, dec, init, gfin, ginit),
                               max_smem_optin(), s))
      return;  // else: recurrent (also where no chunk fits in shared memory)
    StreamScratch scratch;
    float* base = static_cast<float*>(scratch.alloc(state_bytes + dr_bytes, s));
    float* g = in_smem ? nullptr : base;
    float* drbuf = base + state_bytes / sizeof(float);
    check(cudaFuncSetAttribute(lin_attn_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
          "cudaFuncSetAttribute (linear_attention_backward)");
    lin_attn_bwd_kernel<T><<<(unsigned)nbh, kThreads, smem, s>>>(sh, qv, kv, vv, gov, gqv, gkv, gvv, dec, init, gfin,
                                                                ginit, g, drbuf, in_smem);
    check_launch("linear_attention_backward");
  });
}

void linear_attention_rows(const LinAttnRowsArgs& a, void* stream) {
  if (a.n_seqs < 1) return;
  if (a.n_heads < 1 || a.n_kv_heads < 1 || a.n_heads % a.n_kv_heads)
    throw ValueError("linear_attention_rows: n_heads must be a positive multiple of n_kv_heads");
  if ((int64_t)a.n_seqs * a.n_heads > 2147483647LL) throw UnsupportedError("linear_attention_rows: too many sequences");
  if (a.decay && a.p.kind != LinAttnKind::Norm) throw ValueError("decay: only norm attention takes a decay");
  Shape sh{};
  sh.B = a.n_seqs;
  sh.H = a.n_heads;
  set_params(sh, a.p, a.dk, a.dv);
  sh.causal = true;
  const int64_t nS = (int64_t)(sh.Dk + 1) * (sh.Dv + 1);
  const size_t vec_bytes = vec_floats(sh.Dk, sh.Dv) * sizeof(float);
  const bool in_smem = nS * sizeof(float) + vec_bytes <= (size_t)max_smem_optin();
  const size_t smem = in_smem ? nS * sizeof(float) + vec_bytes : vec_bytes;
  cudaStream_t s = as_stream(stream);
  // Long sequences (no GQA): the chunked forward, from the slot's state (none at position 0) into a
  // scratch final state, copied back into the slot. A plan that fits no chunk fails for every sequence
  // alike (it depends on the head dims only): then the recurrent kernel takes them all.
  int chunk_min = 0;
  if (a.host_lens && a.n_kv_heads == a.n_heads) {
    StreamScratch scratch;
    float* fin = nullptr;
    int64_t t0 = 0;
    for (int i = 0; i < a.n_seqs; t0 += a.host_lens[i], ++i) {
      const int64_t T = a.host_lens[i];
      if (T < kChunkMinRows) continue;
      if (!fin) fin = static_cast<float*>(scratch.alloc(static_cast<size_t>(a.n_heads * nS) * sizeof(float), s));
      Shape one = sh;
      one.B = 1;
      one.T = T;
      float* home = a.state + static_cast<int64_t>(a.host_slots[i]) * a.n_heads * nS;
      const V4<const float> qv{a.q + t0 * a.ldq, 0, a.ldq, sh.Dk}, kv{a.k + t0 * a.ldk, 0, a.ldk, sh.Dk},
          vv{a.v + t0 * a.ldv, 0, a.ldv, sh.Dv};
      const V4<float> ov{a.o + t0 * a.ldo, 0, a.ldo, sh.Dv};
      if (!la2::chunk_forward<float>(chunk_fwd_args<float>(one, qv, kv, vv, ov, a.decay,
                                                           a.host_pos0[i] == 0 ? nullptr : home, fin),
                                     max_smem_optin(), s))
        break;  // nothing enqueued (the first long sequence): all go token by token
      check(cudaMemcpyAsync(home, fin, static_cast<size_t>(a.n_heads * nS) * sizeof(float), cudaMemcpyDeviceToDevice, s),
            "cudaMemcpyAsync (linear attention state)");
      chunk_min = kChunkMinRows;
    }
  }
  check(cudaFuncSetAttribute(lin_attn_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
        "cudaFuncSetAttribute (linear_attention_rows)");
  lin_attn_rows_kernel<<<(unsigned)(a.n_seqs * a.n_heads), kThreads, smem, s>>>(sh, a, in_smem, chunk_min);
  check_launch("linear_attention_rows");
}

}  // namespace cuda
}  // namespace ne
