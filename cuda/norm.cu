// CUDA kernels of the normalization family: LayerNorm, RMSNorm and CRMSNorm forward (optionally fused
// with the residual add before them) and backward (with the weight / bias gradients), and the
// per-channel reductions and affines of Unified Normalization. Same contracts and the same math as
// the CPU kernels in cpp/ops/norm.cpp; accumulation in float (double for double tensors).
//
// Work split. A row (token) belongs to one "row group" of threads: a single warp for short rows (up
// to 128 16-byte vectors, e.g. 1024 bf16 features, forward), else a whole block of up to 512 threads
// (plan_rows). Row groups walk the rows with a grid-stride loop, so any number of rows works.
//  - cached kernels keep each thread's share of the row in registers between the passes (up to
//    8 vectors of 16 bytes per thread, i.e. rows of up to 32768 bf16 / 16384 f32 / 8192 f64 features
//    forward), so every tensor crosses memory once: the traffic of a copy.
//  - wide kernels (rows too wide for registers, or memory not 16-byte aligned) re-read the row from
//    global memory in every pass (served mostly by L1/L2); they use scalar access when unaligned.
// Row sums: warp shuffles, then (row group = block) one shared-memory slot per warp. Every thread of
// the row ends up with bit-identical sums.
//
// Column sums (dw, db, channel moments) are deterministic: every row group sums its rows into a
// private partial row of a stream-ordered scratch buffer [2][P][n], then colsum_kernel adds the P
// partial rows of each column in a fixed order.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "ops/norm.h"

namespace ne {
namespace cuda {
namespace {

constexpr int kMaxRowThreads = 512;        // threads of one row group (block) at most
constexpr size_t kScratchBudget = 64u << 20;  // bytes of partial sums we allow per call

// ============================================================================ device helpers

// Sum each of v[0..M) over the threads of this row group: one warp (blockDim.x == 32, any
// blockDim.y) or the whole block (blockDim.y == 1). red: __shared__ [M * 32]. Called by every
// thread of the group (uniformly, as it contains __syncthreads when the group is a block).
template <int M, class A>
__device__ __forceinline__ void row_sum(A (&v)[M], A* red) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[m] += __shfl_xor_sync(0xffffffffu, v[m], off);
  if (blockDim.x == 32) return;
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) red[m * 32 + warp] = v[m];
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    A s = red[m * 32];
    for (int w = 1; w < warps; ++w) s += red[m * 32 + w];
    v[m] = s;
  }
  __syncthreads();  // red may be reused right away
}

// The value thread 0 of the row group holds, in every thread of the group. slot: __shared__. The
// next write to slot is in the next row, after at least one row_sum barrier.
template <class A>
__device__ __forceinline__ A row_first(A v, A* slot) {
  if (blockDim.x == 32) return __shfl_sync(0xffffffffu, v, 0);
  if (threadIdx.x == 0) *slot = v;
  __syncthreads();
  return *slot;
}

template <class T>
__device__ __forceinline__ acc_t<T> round_to(acc_t<T> v) {  // v as stored in T, read back
  return Elem<T>::load(Elem<T>::store(v));
}

// The per-row scalars, computed in double as on the CPU, then rounded to the accumulator type.
template <class A>
__device__ __forceinline__ A mean_of(A sum, int64_t n) {
  return static_cast<A>(static_cast<double>(sum) / static_cast<double>(n));
}
template <class A>
__device__ __forceinline__ A inv_sqrt(double ms, double eps) {
  return static_cast<A>(1.0 / sqrt(ms + eps));
}

// Row r of each pass of the grid-stride loop: one per warp (blockDim.y rows per block) or per block.
#define NE_FOR_EACH_ROW(r, rows)                                                          \
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < (rows); \
       r += static_cast<int64_t>(gridDim.x) * blockDim.y)

// ============================================================================ forward

template <class T>
struct FwdParams {
  using A = acc_t<T>;
  const T* x;
  const T* res;  // null without the fused add
  T* y;
  T* res_out;
  int64_t ld_x, ld_res, ld_y, ld_out;
  const A* w;  // [n] or null (1)
  const A* b;  // [n] or null (0)
  A* mean;     // [rows] or null
  A* rstd;     // [rows] or null
  int64_t rows, n;
  double eps;
};

// y for the V features at c0 of one row, given xhat's inputs: h (the row values), and the row
// scalars. LayerNorm: xhat = ((h - K) - delta) * rstd; RMS/CRMS: xhat = h * rstd.
//   y = xhat * w + b   (fma; y = xhat * w without bias)
template <class T, NormKind KIND, int V>
__device__ __forceinline__ void write_y(const FwdParams<T>& p, T* y, int64_t c0, const acc_t<T> (&h)[V],
                                        acc_t<T> K, acc_t<T> delta, acc_t<T> rstd) {
  using A = acc_t<T>;
  A w[V], b[V], out[V];
  if (p.w) {
    load_acc<A, V>(p.w, c0, p.n, w);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) w[i] = A(1);
  }
  if (p.b) load_acc<A, V>(p.b, c0, p.n, b);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const A xhat = KIND == NormKind::LayerNorm ? ((h[i] - K) - delta) * rstd : h[i] * rstd;
    out[i] = p.b ? fmadd(xhat, w[i], b[i]) : xhat * w[i];
  }
  store_vec<T, V>(y, c0, p.n, out);
}

// ---------------------------------------------------------------------------- norm_fwd_cached
// One row per row group; thread t holds vectors t, t + T, ..., t + (KV-1)T (T = blockDim.x) of
// V = 16 / sizeof(T) features in registers, as stored (raw T: 4 registers per 16 bytes).
//   h = x (+ res, rounded to T, stored to res_out)
//   LayerNorm: K = h[0]; delta = mean(h - K); var = mean((h - K - delta)^2); rstd = 1/sqrt(var + eps)
//              y = ((h - K) - delta) * rstd * w + b;  mean = K + delta
//   RMSNorm:   rstd = 1/sqrt(mean(h^2) + eps);                  y = h * rstd * w (+ b)
//   CRMSNorm:  rstd = 1/sqrt((sum h^2 + (sum h)^2)/(n+1) + eps); y = h * rstd * w
// Traffic per row: read x (and res) once, write y (and res_out) once; w, b come from L1/L2.
// K is taken from thread 0's registers (not re-read), so res_out may alias x or res, and y may alias x.
template <class T, NormKind KIND, int KV>
__global__ void __launch_bounds__(kMaxRowThreads) norm_fwd_cached(const FwdParams<T> p) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A red[2 * 32];
  __shared__ A first;
  const int64_t n = p.n;
  auto col = [](int k) { return static_cast<int64_t>(threadIdx.x + k * blockDim.x) * V; };
  NE_FOR_EACH_ROW(r, p.rows) {
    Pack<T, V> h[KV];  // past the end of the row: 0
    const T* x = p.x + r * p.ld_x;
    const T* res = p.res ? p.res + r * p.ld_res : nullptr;
    T* out = p.res ? p.res_out + r * p.ld_out : nullptr;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int64_t c0 = col(k);
      load_pack<T, V>(x, c0, n, h[k]);
      if (res && c0 < n) {
        Pack<T, V> rv;
        load_pack<T, V>(res, c0, n, rv);
#pragma unroll
        for (int i = 0; i < V; ++i) h[k].e[i] = Elem<T>::store(Elem<T>::load(h[k].e[i]) + Elem<T>::load(rv.e[i]));
        store_pack<T, V>(out, c0, n, h[k]);
      }
    }
    auto at = [&](int k, int i) { return Elem<T>::load(h[k].e[i]); };

    A K = A(0), delta = A(0), rstd;
    if constexpr (KIND == NormKind::LayerNorm) {
      K = row_first(at(0, 0), &first);
      A s[1] = {A(0)};
#pragma unroll
      for (int k = 0; k < KV; ++k)
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (col(k) + i < n) s[0] += at(k, i) - K;
      row_sum(s, red);
      delta = mean_of(s[0], n);
      A q[1] = {A(0)};
#pragma unroll
      for (int k = 0; k < KV; ++k)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A c = (at(k, i) - K) - delta;
          if (col(k) + i < n) q[0] = fmadd(c, c, q[0]);
        }
      row_sum(q, red);
      rstd = inv_sqrt<A>(static_cast<double>(q[0]) / static_cast<double>(n), p.eps);
    } else if constexpr (KIND == NormKind::RMSNorm) {
      A q[1] = {A(0)};
#pragma unroll
      for (int k = 0; k < KV; ++k)
#pragma unroll
        for (int i = 0; i < V; ++i) q[0] = fmadd(at(k, i), at(k, i), q[0]);
      row_sum(q, red);
      rstd = inv_sqrt<A>(static_cast<double>(q[0]) / static_cast<double>(n), p.eps);
    } else {
      A sq[2] = {A(0), A(0)};  // sum h, sum h^2
#pragma unroll
      for (int k = 0; k < KV; ++k)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          sq[0] += at(k, i);
          sq[1] = fmadd(at(k, i), at(k, i), sq[1]);
        }
      row_sum(sq, red);
      const double s = sq[0];
      rstd = inv_sqrt<A>((static_cast<double>(sq[1]) + s * s) / static_cast<double>(n + 1), p.eps);
    }

    T* y = p.y + r * p.ld_y;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int64_t c0 = col(k);
      if (c0 >= n) continue;
      A hv[V];
#pragma unroll
      for (int i = 0; i < V; ++i) hv[i] = at(k, i);
      write_y<T, KIND, V>(p, y, c0, hv, K, delta, rstd);
    }
    if (threadIdx.x == 0) {
      if (p.mean) p.mean[r] = K + delta;  // 0 for RMS / CRMS, as on the CPU
      if (p.rstd) p.rstd[r] = rstd;
    }
  }
}

// ---------------------------------------------------------------------------- norm_fwd_wide
// Same formulas as norm_fwd_cached for rows too wide for registers, or unaligned rows (V = 1).
// Thread t owns vectors t, t + T, t + 2T, ... of the row and re-reads them in each pass:
//   [fused: h = x + res -> res_out]  LN: sum(h-K) | sum((h-K-delta)^2) | y   RMS/CRMS: sums | y
// Traffic: x (res) read and y (res_out) written once from DRAM; the 1-2 extra passes over h hit L2
// for rows of up to a few MB in flight. Each thread re-reads only what it wrote itself, so res_out
// may alias x or res.
template <class T, NormKind KIND, int V>
__global__ void __launch_bounds__(kMaxRowThreads) norm_fwd_wide(const FwdParams<T> p) {
  using A = acc_t<T>;
  __shared__ A red[2 * 32];
  __shared__ A first;
  const int64_t n = p.n;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const int64_t start = static_cast<int64_t>(threadIdx.x) * V;
  NE_FOR_EACH_ROW(r, p.rows) {
    const T* h = p.x + r * p.ld_x;
    if (p.res) {
      const T* x = h;
      const T* res = p.res + r * p.ld_res;
      T* out = p.res_out + r * p.ld_out;
      for (int64_t c0 = start; c0 < n; c0 += step) {
        A a[V], b[V];
        load_vec<T, V>(x, c0, n, a);
        load_vec<T, V>(res, c0, n, b);
#pragma unroll
        for (int i = 0; i < V; ++i) a[i] = round_to<T>(a[i] + b[i]);
        store_vec<T, V>(out, c0, n, a);
      }
      h = out;
    }

    A K = A(0), delta = A(0), rstd;
    if constexpr (KIND == NormKind::LayerNorm) {
      K = row_first(threadIdx.x == 0 ? Elem<T>::load(h[0]) : A(0), &first);
      A s[1] = {A(0)};
      for (int64_t c0 = start; c0 < n; c0 += step) {
        A v[V];
        load_vec<T, V>(h, c0, n, v);
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (c0 + i < n) s[0] += v[i] - K;
      }
      row_sum(s, red);
      delta = mean_of(s[0], n);
      A q[1] = {A(0)};
      for (int64_t c0 = start; c0 < n; c0 += step) {
        A v[V];
        load_vec<T, V>(h, c0, n, v);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A c = (v[i] - K) - delta;
          if (c0 + i < n) q[0] = fmadd(c, c, q[0]);
        }
      }
      row_sum(q, red);
      rstd = inv_sqrt<A>(static_cast<double>(q[0]) / static_cast<double>(n), p.eps);
    } else {
      A sq[2] = {A(0), A(0)};  // sum h, sum h^2 (the first only for CRMS)
      for (int64_t c0 = start; c0 < n; c0 += step) {
        A v[V];
        load_vec<T, V>(h, c0, n, v);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          sq[0] += v[i];
          sq[1] = fmadd(v[i], v[i], sq[1]);
        }
      }
      if constexpr (KIND == NormKind::RMSNorm) {
        A q[1] = {sq[1]};
        row_sum(q, red);
        rstd = inv_sqrt<A>(static_cast<double>(q[0]) / static_cast<double>(n), p.eps);
      } else {
        row_sum(sq, red);
        const double s = sq[0];
        rstd = inv_sqrt<A>((static_cast<double>(sq[1]) + s * s) / static_cast<double>(n + 1), p.eps);
      }
    }

    T* y = p.y + r * p.ld_y;
    for (int64_t c0 = start; c0 < n; c0 += step) {
      A v[V];
      load_vec<T, V>(h, c0, n, v);
      write_y<T, KIND, V>(p, y, c0, v, K, delta, rstd);
    }
    if (threadIdx.x == 0) {
      if (p.mean) p.mean[r] = K + delta;
      if (p.rstd) p.rstd[r] = rstd;
    }
  }
}

// ============================================================================ backward

template <class T>
struct BwdParams {
  using A = acc_t<T>;
  const T* dy;
  const T* h;
  const T* dres;  // null without a residual gradient
  T* dx;
  int64_t ld_dy, ld_h, ld_dres, ld_dx;
  const A* w;     // [n] or null (1)
  const A* rstd;  // [rows]
  A* part;        // [2][P][n] partial dw / db rows, P = gridDim.x * blockDim.y; null: not wanted
  bool want_dw, want_db;
  int64_t rows, n;
};

// Number of row sums each backward kind needs: {sgx} RMS, {sgx, sg} LN, {sgx, sg, hs} CRMS.
template <NormKind KIND>
constexpr int bwd_sums() {
  return KIND == NormKind::RMSNorm ? 1 : KIND == NormKind::LayerNorm ? 2 : 3;
}

// The row constants of dh = rstd * ((g - c_mean) - c_xhat * xhat), from the row sums
// sums = {sgx = sum g * xhat, sg = sum g, hs = sum h}:
//   LayerNorm: c_mean = sg/n,                    c_xhat = sgx/n
//   RMSNorm:   c_mean = 0,                       c_xhat = sgx/n
//   CRMSNorm:  c_mean = rstd * hs * sgx/(n+1),   c_xhat = sgx/(n+1)     (in double, as on the CPU)
template <NormKind KIND, class A>
__device__ __forceinline__ void dh_constants(const A (&sums)[bwd_sums<KIND>()], A rstd, int64_t n, A& c_mean,
                                             A& c_xhat) {
  if constexpr (KIND == NormKind::LayerNorm) {
    c_mean = mean_of(sums[1], n);
    c_xhat = mean_of(sums[0], n);
  } else if constexpr (KIND == NormKind::RMSNorm) {
    c_mean = A(0);
    c_xhat = mean_of(sums[0], n);
  } else {
    const double m = static_cast<double>(sums[0]) / static_cast<double>(n + 1);
    c_mean = static_cast<A>(static_cast<double>(rstd) * static_cast<double>(sums[2]) * m);
    c_xhat = static_cast<A>(m);
  }
}

// ---------------------------------------------------------------------------- norm_bwd_cached
// One row per row group; h and dy of the thread's KV vectors held in registers as stored (raw T):
//   xhat = ((h - K) - delta) * rstd (LN; K = h[0], delta = mean(h - K) recomputed) or h * rstd
//   g = dy * w;  row sums sgx = sum g * xhat, sg = sum g (LN), hs = sum h (CRMS)
//   dh = rstd * ((g - c_mean) - c_xhat * xhat)   (dh_constants);   dx = dh (+ dres)
//   dw_part += dy * xhat;  db_part += dy   (registers of the thread, over all rows of its group)
// After its last row each row group writes its partial dw / db row; colsum_kernel adds them up.
// Traffic per row: read h, dy (dres) once, write dx once; w from L1/L2 (twice). dx may alias dy or h.
template <class T, NormKind KIND, int KV>
__global__ void __launch_bounds__(kMaxRowThreads) norm_bwd_cached(const BwdParams<T> p) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr int M = bwd_sums<KIND>();
  __shared__ A red[3 * 32];
  __shared__ A first;
  const int64_t n = p.n;
  auto col = [](int k) { return static_cast<int64_t>(threadIdx.x + k * blockDim.x) * V; };
  auto load_w = [&](int64_t c0, A(&w)[V]) {
    if (p.w) {
      load_acc<A, V>(p.w, c0, n, w);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) w[i] = A(1);
    }
  };
  A dw[KV][V], db[KV][V];
#pragma unroll
  for (int k = 0; k < KV; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = db[k][i] = A(0);

  NE_FOR_EACH_ROW(r, p.rows) {
    Pack<T, V> h[KV], dy[KV];  // past the end of the row: 0
    const T* hr = p.h + r * p.ld_h;
    const T* dyr = p.dy + r * p.ld_dy;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      load_pack<T, V>(hr, col(k), n, h[k]);
      load_pack<T, V>(dyr, col(k), n, dy[k]);
    }
    const A rstd = p.rstd[r];

    A K = A(0), delta = A(0);
    if constexpr (KIND == NormKind::LayerNorm) {
      K = row_first(Elem<T>::load(h[0].e[0]), &first);
      A s[1] = {A(0)};
#pragma unroll
      for (int k = 0; k < KV; ++k)
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (col(k) + i < n) s[0] += Elem<T>::load(h[k].e[i]) - K;
      row_sum(s, red);
      delta = mean_of(s[0], n);
    }
    auto xhat_at = [&](int k, int i) {
      const A hv = Elem<T>::load(h[k].e[i]);
      return KIND == NormKind::LayerNorm ? ((hv - K) - delta) * rstd : hv * rstd;
    };

    A sums[M];  // sgx, sg, hs
#pragma unroll
    for (int m = 0; m < M; ++m) sums[m] = A(0);
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      if (col(k) >= n) continue;  // dy = 0 there: nothing to add
      A w[V];
      load_w(col(k), w);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = xhat_at(k, i);
        const A d = Elem<T>::load(dy[k].e[i]);  // 0 past the end of the row
        const A g = d * w[i];
        sums[0] = fmadd(g, xhat, sums[0]);
        if constexpr (M >= 2) sums[1] += g;
        if constexpr (M == 3) sums[2] += Elem<T>::load(h[k].e[i]);
        dw[k][i] = fmadd(d, xhat, dw[k][i]);
        db[k][i] += d;
      }
    }
    row_sum(sums, red);
    A c_mean, c_xhat;
    dh_constants<KIND>(sums, rstd, n, c_mean, c_xhat);

    T* dx = p.dx + r * p.ld_dx;
    const T* dres = p.dres ? p.dres + r * p.ld_dres : nullptr;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int64_t c0 = col(k);
      if (c0 >= n) continue;
      A w[V], out[V], dr[V];
      load_w(c0, w);
      if (dres) load_vec<T, V>(dres, c0, n, dr);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A g = Elem<T>::load(dy[k].e[i]) * w[i];
        out[i] = rstd * ((g - c_mean) - c_xhat * xhat_at(k, i));
        if (dres) out[i] += dr[i];
      }
      store_vec<T, V>(dx, c0, n, out);
    }
  }

  if (p.part) {
    const int64_t P = static_cast<int64_t>(gridDim.x) * blockDim.y;
    const int64_t gi = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    A* pw = p.part + gi * n;
    A* pb = p.part + (P + gi) * n;
#pragma unroll
    for (int k = 0; k < KV; ++k)
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t c = col(k) + i;
        if (c >= n) continue;
        if (p.want_dw) pw[c] = dw[k][i];
        if (p.want_db) pb[c] = db[k][i];
      }
  }
}

// ---------------------------------------------------------------------------- norm_bwd_wide
// Same formulas as norm_bwd_cached for rows too wide for registers, or unaligned rows (V = 1);
// passes: [LN: sum(h - K)] | sums of g, g*xhat (h) | dx, with the partial dw / db rows updated in
// place (scratch zeroed before the launch; each element is owned by one thread, so no races).
// Traffic: dx written once; h, dy read 2-3 times (L2 for all but the first).
template <class T, NormKind KIND, int V>
__global__ void __launch_bounds__(kMaxRowThreads) norm_bwd_wide(const BwdParams<T> p) {
  using A = acc_t<T>;
  constexpr int M = bwd_sums<KIND>();
  __shared__ A red[3 * 32];
  __shared__ A first;
  const int64_t n = p.n;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const int64_t start = static_cast<int64_t>(threadIdx.x) * V;
  A* pw = nullptr;
  A* pb = nullptr;
  if (p.part) {
    const int64_t P = static_cast<int64_t>(gridDim.x) * blockDim.y;
    const int64_t gi = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    pw = p.part + gi * n;
    pb = p.part + (P + gi) * n;
  }
  auto load_w = [&](int64_t c0, A(&w)[V]) {
    if (p.w) {
      load_acc<A, V>(p.w, c0, n, w);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) w[i] = A(1);
    }
  };

  NE_FOR_EACH_ROW(r, p.rows) {
    const T* h = p.h + r * p.ld_h;
    const T* dy = p.dy + r * p.ld_dy;
    const A rstd = p.rstd[r];
    A K = A(0), delta = A(0);
    if constexpr (KIND == NormKind::LayerNorm) {
      K = row_first(threadIdx.x == 0 ? Elem<T>::load(h[0]) : A(0), &first);
      A s[1] = {A(0)};
      for (int64_t c0 = start; c0 < n; c0 += step) {
        A v[V];
        load_vec<T, V>(h, c0, n, v);
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (c0 + i < n) s[0] += v[i] - K;
      }
      row_sum(s, red);
      delta = mean_of(s[0], n);
    }
    auto xhat_of = [&](A hv) {
      return KIND == NormKind::LayerNorm ? ((hv - K) - delta) * rstd : hv * rstd;
    };

    A sums[M];  // sgx, sg, hs
#pragma unroll
    for (int m = 0; m < M; ++m) sums[m] = A(0);
    for (int64_t c0 = start; c0 < n; c0 += step) {
      A hv[V], d[V], w[V];
      load_vec<T, V>(h, c0, n, hv);
      load_vec<T, V>(dy, c0, n, d);
      load_w(c0, w);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if constexpr (M == 3) sums[2] += hv[i];
        const A gg = d[i] * w[i];
        sums[0] = fmadd(gg, xhat_of(hv[i]), sums[0]);
        if constexpr (M >= 2) sums[1] += gg;
      }
    }
    row_sum(sums, red);
    A c_mean, c_xhat;
    dh_constants<KIND>(sums, rstd, n, c_mean, c_xhat);

    T* dx = p.dx + r * p.ld_dx;
    const T* dres = p.dres ? p.dres + r * p.ld_dres : nullptr;
    for (int64_t c0 = start; c0 < n; c0 += step) {
      A hv[V], d[V], w[V], out[V], dr[V];
      load_vec<T, V>(h, c0, n, hv);
      load_vec<T, V>(dy, c0, n, d);
      load_w(c0, w);
      if (dres) load_vec<T, V>(dres, c0, n, dr);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A xhat = xhat_of(hv[i]);
        out[i] = rstd * ((d[i] * w[i] - c_mean) - c_xhat * xhat);
        if (dres) out[i] += dr[i];
        if (c0 + i < n) {
          if (p.want_dw && pw) pw[c0 + i] = fmadd(d[i], xhat, pw[c0 + i]);
          if (p.want_db && pb) pb[c0 + i] += d[i];
        }
      }
      store_vec<T, V>(dx, c0, n, out);
    }
  }
}

// ============================================================================ column sums

// ---------------------------------------------------------------------------- colsum_kernel
// out_y[c] = sum_{q < P} part[y][q][c] for y = blockIdx.y (out_0, out_1; a null output is skipped).
// Block 32 columns x 8 partial-row lanes; the 8 lane sums are added in a fixed order (deterministic).
// Traffic: the partial rows once (P * n accumulators per output).
template <class A>
__global__ void __launch_bounds__(256) colsum_kernel(const A* part, int64_t P, int64_t n, A* out0, A* out1) {
  A* out = blockIdx.y == 0 ? out0 : out1;
  if (!out) return;  // uniform over the block
  const A* src = part + static_cast<int64_t>(blockIdx.y) * P * n;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A s = A(0);
  if (c < n)
    for (int64_t q = threadIdx.y; q < P; q += blockDim.y) s += src[q * n + c];
  __shared__ A t[8][33];
  t[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    A v = t[0][threadIdx.x];
    for (int y = 1; y < 8; ++y) v += t[y][threadIdx.x];
    out[c] = v;
  }
}

template <class T>
struct MomentParams {
  using A = acc_t<T>;
  const T* x;
  const T* dy;  // null: sum of squares
  int64_t ld_x, ld_dy;
  A* part;  // [2][P][n], P = gridDim.y * blockDim.y
  bool want2;
  int64_t rows, n, rows_per_chunk;
};

// ---------------------------------------------------------------------------- moments_kernel
// Stage 1 of channel_moments. Thread (tx, ty) of block (bx, by) owns the V columns of vector
// bx * blockDim.x + tx and the rows ty, ty + blockDim.y, ... of row chunk by:
//   part[0][q][c] = sum x^2  (dy null)  or  sum x * dy;   part[1][q][c] = sum dy
// with q = by * blockDim.y + ty. Loads are coalesced along the row. Traffic: x (dy) read once.
template <class T, int V>
__global__ void __launch_bounds__(256) moments_kernel(const MomentParams<T> p) {
  using A = acc_t<T>;
  const int64_t n = p.n;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= n) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * p.rows_per_chunk;
  const int64_t r1 = r0 + p.rows_per_chunk < p.rows ? r0 + p.rows_per_chunk : p.rows;
  A s1[V], s2[V];
#pragma unroll
  for (int i = 0; i < V; ++i) s1[i] = s2[i] = A(0);
  for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
    A xv[V];
    load_vec<T, V>(p.x + r * p.ld_x, c0, n, xv);
    if (p.dy) {
      A dv[V];
      load_vec<T, V>(p.dy + r * p.ld_dy, c0, n, dv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        s1[i] = fmadd(xv[i], dv[i], s1[i]);
        s2[i] += dv[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) s1[i] = fmadd(xv[i], xv[i], s1[i]);
    }
  }
  const int64_t P = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t q = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (c0 + i >= n) break;
    p.part[q * n + c0 + i] = s1[i];
    if (p.want2) p.part[(P + q) * n + c0 + i] = s2[i];
  }
}

// ============================================================================ channel affine

template <class T>
struct AffineParams {
  using A = acc_t<T>;
  const T* u;
  const T* v;  // null: out = a*u + b
  T* out;
  int64_t ld_u, ld_v, ld_out;
  const A* a;
  const A* b;  // null (0) allowed without v
  int64_t rows, n;
};

// ---------------------------------------------------------------------------- affine_kernel
//   out[r,c] = a[c] * u[r,c] + b[c]            (v null; b null -> 0)
//   out[r,c] = a[c] * u[r,c] + b[c] * v[r,c]
// Thread (tx, ty) owns the V columns of vector blockIdx.x * blockDim.x + tx (a, b loaded once) and
// walks rows blockIdx.y * blockDim.y + ty, stepping by gridDim.y * blockDim.y.
// Traffic: u (v) read once, out written once: a copy.
template <class T, int V>
__global__ void __launch_bounds__(256) affine_kernel(const AffineParams<T> p) {
  using A = acc_t<T>;
  const int64_t n = p.n;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= n) return;
  A a[V], b[V];
  load_acc<A, V>(p.a, c0, n, a);
  if (p.b) {
    load_acc<A, V>(p.b, c0, n, b);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) b[i] = A(0);
  }
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < p.rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    A u[V], t[V];
    load_vec<T, V>(p.u + r * p.ld_u, c0, n, u);
    if (p.v) {
      load_vec<T, V>(p.v + r * p.ld_v, c0, n, t);
#pragma unroll
      for (int i = 0; i < V; ++i) t[i] = b[i] * t[i];
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) t[i] = b[i];
    }
#pragma unroll
    for (int i = 0; i < V; ++i) t[i] = fmadd(a[i], u[i], t[i]);
    store_vec<T, V>(p.out + r * p.ld_out, c0, n, t);
  }
}

// ============================================================================ host side

// A row matrix that allows 16-byte vector access: 16-byte aligned base and every row start aligned.
bool vec_ok(const RowMatrix& m) {
  if (!m.data) return true;
  return aligned16(m.data) && (m.rows <= 1 || (m.ld * dtype_size(m.dtype)) % 16 == 0);
}
bool vec_ok(const void* p) { return p == nullptr || aligned16(p); }

unsigned grid_blocks(int64_t blocks) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), INT_MAX));
}
int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

// Threads per row group (tpr; a multiple of 32), row groups per block, and the register-cached
// vectors per thread (kv; 0: the wide kernel), for rows of nv vectors.
struct RowPlan {
  int tpr = 32, rpb = 1, kv = 0;
};
// kv_max == 0: the wide kernel. The cached kernels take about 4 vectors per thread, up to kv_max
// when the row needs it; a warp per row for rows of up to 32 * min(4, kv_max) vectors.
RowPlan plan_rows(int64_t nv, int kv_max) {
  RowPlan pl;
  if (kv_max > 0) {
    const int small_kv = std::min(4, kv_max);
    if (nv <= 32 * small_kv) {
      pl.kv = 1;
      while (pl.kv * 32 < nv) pl.kv *= 2;
    } else {
      int kv = small_kv;
      while (kv < kv_max && ceil_div(nv, kv) > kMaxRowThreads) kv *= 2;
      if (ceil_div(nv, kv) <= kMaxRowThreads) {
        pl.kv = kv;
        pl.tpr = static_cast<int>(round_up(ceil_div(nv, kv), 32));
      }
    }
  }
  if (pl.kv == 0)
    pl.tpr = nv <= 128 ? 32 : static_cast<int>(std::min<int64_t>(kMaxRowThreads, round_up(ceil_div(nv, 4), 32)));
  pl.rpb = pl.tpr == 32 ? 4 : 1;  // rows per block: several warps, or one block-wide row group
  return pl;
}

// Register-cached vectors per thread the backward kernel may use: besides h and dy (raw, 4
// registers per vector) it keeps the dw and db partial sums of its KV * V columns in registers,
// kept to 16 floats' worth each (bf16/f16: 2, f32: 4, f64: 4).
template <class T> constexpr int kBwdKvMax = 16 / kVec<T> / static_cast<int>(sizeof(acc_t<T>) / sizeof(float));
constexpr int kFwdKvMax = 8;

void check_cols(int64_t n) {
  if (n > INT_MAX / 2) throw UnsupportedError("normengine CUDA norm kernels: rows of more than 2^30 features");
}

// ---------------------------------------------------------------------------- forward
template <class T, NormKind KIND>
void forward_typed(const NormFwdArgs& a, cudaStream_t s) {
  using A = acc_t<T>;
  FwdParams<T> p{};
  p.x = static_cast<const T*>(a.x.data);
  p.res = static_cast<const T*>(a.res.data);
  p.y = static_cast<T*>(a.y.data);
  p.res_out = a.res.data ? static_cast<T*>(a.res_out.data) : nullptr;
  p.ld_x = a.x.ld;
  p.ld_res = a.res.ld;
  p.ld_y = a.y.ld;
  p.ld_out = a.res_out.ld;
  p.w = static_cast<const A*>(a.w);
  p.b = static_cast<const A*>(a.b);
  p.mean = static_cast<A*>(a.mean);
  p.rstd = static_cast<A*>(a.rstd);
  p.rows = a.x.rows;
  p.n = a.x.cols;
  p.eps = a.eps;

  const bool vec = vec_ok(a.x) && vec_ok(a.y) && (!p.res || (vec_ok(a.res) && vec_ok(a.res_out))) &&
                   vec_ok(a.w) && vec_ok(a.b);
  constexpr int V = kVec<T>;
  const RowPlan pl = plan_rows(ceil_div(p.n, vec ? V : 1), vec ? kFwdKvMax : 0);
  const dim3 block(pl.tpr, pl.rpb);
  const unsigned grid = grid_blocks(ceil_div(p.rows, pl.rpb));
  switch (pl.kv) {
    case 1: norm_fwd_cached<T, KIND, 1><<<grid, block, 0, s>>>(p); break;
    case 2: norm_fwd_cached<T, KIND, 2><<<grid, block, 0, s>>>(p); break;
    case 4: norm_fwd_cached<T, KIND, 4><<<grid, block, 0, s>>>(p); break;
    case 8: norm_fwd_cached<T, KIND, 8><<<grid, block, 0, s>>>(p); break;
    default:
      if (vec)
        norm_fwd_wide<T, KIND, V><<<grid, block, 0, s>>>(p);
      else
        norm_fwd_wide<T, KIND, 1><<<grid, block, 0, s>>>(p);
  }
  check_launch("norm_forward");
}

// ---------------------------------------------------------------------------- backward
// Launch a backward kernel and, when dw / db are wanted, the column sums of its partial rows.
// With partials the grid is one wave of resident blocks (each row group then sums many rows),
// capped so the scratch stays within kScratchBudget.
template <class T, class Kernel>
void launch_backward(Kernel kernel, BwdParams<T> p, const RowPlan& pl, bool zero_part, const NormBwdArgs& a,
                     cudaStream_t s) {
  using A = acc_t<T>;
  const dim3 block(pl.tpr, pl.rpb);
  const int64_t blocks = ceil_div(p.rows, pl.rpb);
  const bool want = a.dw || a.db;
  unsigned grid = grid_blocks(blocks);
  StreamScratch scratch;
  int64_t P = 0;
  if (want) {
    const int64_t budget_blocks =
        std::max<int64_t>(1, static_cast<int64_t>(kScratchBudget / (2 * sizeof(A) * p.n * pl.rpb)));
    grid = grid_blocks(std::min({blocks, resident_blocks(kernel, pl.tpr * pl.rpb), budget_blocks}));
    P = static_cast<int64_t>(grid) * pl.rpb;
    const size_t bytes = 2 * static_cast<size_t>(P) * p.n * sizeof(A);
    p.part = static_cast<A*>(scratch.alloc(bytes, s));
    if (zero_part) check(cudaMemsetAsync(p.part, 0, bytes, s), "cudaMemsetAsync (norm scratch)");
    p.want_dw = a.dw != nullptr;
    p.want_db = a.db != nullptr;
  }
  kernel<<<grid, block, 0, s>>>(p);
  check_launch("norm_backward");
  if (want) {
    colsum_kernel<A><<<dim3(grid_blocks(ceil_div(p.n, 32)), 2), dim3(32, 8), 0, s>>>(
        p.part, P, p.n, static_cast<A*>(a.dw), static_cast<A*>(a.db));
    check_launch("norm_backward (column sums)");
  }
}

template <class T, NormKind KIND, int KV>
void backward_cached(const BwdParams<T>& p, const RowPlan& pl, const NormBwdArgs& a, cudaStream_t s) {
  if constexpr (KV <= kBwdKvMax<T>) launch_backward<T>(norm_bwd_cached<T, KIND, KV>, p, pl, false, a, s);
}

template <class T, NormKind KIND>
void backward_typed(const NormBwdArgs& a, cudaStream_t s) {
  using A = acc_t<T>;
  BwdParams<T> p{};
  p.dy = static_cast<const T*>(a.dy.data);
  p.h = static_cast<const T*>(a.h.data);
  p.dres = static_cast<const T*>(a.dres.data);
  p.dx = static_cast<T*>(a.dx.data);
  p.ld_dy = a.dy.ld;
  p.ld_h = a.h.ld;
  p.ld_dres = a.dres.ld;
  p.ld_dx = a.dx.ld;
  p.w = static_cast<const A*>(a.w);
  p.rstd = static_cast<const A*>(a.rstd);
  p.rows = a.h.rows;
  p.n = a.h.cols;

  const bool vec = vec_ok(a.dy) && vec_ok(a.h) && vec_ok(a.dres) && vec_ok(a.dx) && vec_ok(a.w);
  constexpr int V = kVec<T>;
  const RowPlan pl = plan_rows(ceil_div(p.n, vec ? V : 1), vec ? kBwdKvMax<T> : 0);
  switch (pl.kv) {
    case 1: return backward_cached<T, KIND, 1>(p, pl, a, s);
    case 2: return backward_cached<T, KIND, 2>(p, pl, a, s);
    case 4: return backward_cached<T, KIND, 4>(p, pl, a, s);
    case 8: return backward_cached<T, KIND, 8>(p, pl, a, s);
    default:
      if (vec)
        launch_backward<T>(norm_bwd_wide<T, KIND, V>, p, pl, true, a, s);
      else
        launch_backward<T>(norm_bwd_wide<T, KIND, 1>, p, pl, true, a, s);
  }
}

// ---------------------------------------------------------------------------- channel ops
template <class T>
void moments_typed(const ChannelArgs& a, cudaStream_t s) {
  using A = acc_t<T>;
  MomentParams<T> p{};
  p.x = static_cast<const T*>(a.x.data);
  p.dy = static_cast<const T*>(a.dy.data);
  p.ld_x = a.x.ld;
  p.ld_dy = a.dy.ld;
  p.rows = a.x.rows;
  p.n = a.x.cols;
  p.want2 = a.dy.data && a.out2;
  A* out2 = p.want2 ? static_cast<A*>(a.out2) : nullptr;  // out2 is only defined with dy

  const bool vec = vec_ok(a.x) && vec_ok(a.dy);
  const int v = vec ? kVec<T> : 1;
  const int64_t nv = ceil_div(p.n, v);
  const int bx = static_cast<int>(std::min<int64_t>(256, round_up(nv, 32)));
  const int by = 256 / bx;
  const int64_t gx = ceil_div(nv, bx);
  if (gx > INT_MAX) throw UnsupportedError("channel_moments: too many columns");
  // Row chunks: about 4 blocks per SM in all, at least ~16 rows per thread, within the grid's
  // y limit and the scratch budget.
  const int64_t planes = p.want2 ? 2 : 1;
  int64_t chunks = std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(sm_count()), gx));
  chunks = std::min(chunks, ceil_div(p.rows, 16 * static_cast<int64_t>(by)));
  chunks = std::min<int64_t>(chunks, 65535);
  chunks = std::min<int64_t>(chunks, static_cast<int64_t>(kScratchBudget / (planes * by * p.n * sizeof(A))));
  chunks = std::max<int64_t>(chunks, 1);
  p.rows_per_chunk = ceil_div(p.rows, chunks);
  chunks = ceil_div(p.rows, p.rows_per_chunk);
  const int64_t P = chunks * by;

  StreamScratch scratch;
  p.part = static_cast<A*>(scratch.alloc(static_cast<size_t>(planes * P * p.n) * sizeof(A), s));
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(chunks));
  if (vec)
    moments_kernel<T, kVec<T>><<<grid, dim3(bx, by), 0, s>>>(p);
  else
    moments_kernel<T, 1><<<grid, dim3(bx, by), 0, s>>>(p);
  check_launch("channel_moments");
  colsum_kernel<A><<<dim3(grid_blocks(ceil_div(p.n, 32)), static_cast<unsigned>(planes)), dim3(32, 8), 0, s>>>(
      p.part, P, p.n, static_cast<A*>(a.out1), out2);
  check_launch("channel_moments (column sums)");
}

template <class T>
void affine_typed(const ChannelArgs& a, cudaStream_t s) {
  using A = acc_t<T>;
  AffineParams<T> p{};
  p.u = static_cast<const T*>(a.u.data);
  p.v = static_cast<const T*>(a.v.data);
  p.out = static_cast<T*>(a.out.data);
  p.ld_u = a.u.ld;
  p.ld_v = a.v.ld;
  p.ld_out = a.out.ld;
  p.a = static_cast<const A*>(a.a);
  p.b = static_cast<const A*>(a.b);
  p.rows = a.u.rows;
  p.n = a.u.cols;

  const bool vec = vec_ok(a.u) && vec_ok(a.v) && vec_ok(a.out) && vec_ok(a.a) && vec_ok(a.b);
  const int v = vec ? kVec<T> : 1;
  const int64_t nv = ceil_div(p.n, v);
  const int bx = static_cast<int>(std::min<int64_t>(256, round_up(nv, 32)));
  const int by = 256 / bx;
  const int64_t gx = ceil_div(nv, bx);
  if (gx > INT_MAX) throw UnsupportedError("channel_affine: too many columns");
  const int64_t gy = std::min<int64_t>(ceil_div(p.rows, by), 65535);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (vec)
    affine_kernel<T, kVec<T>><<<grid, dim3(bx, by), 0, s>>>(p);
  else
    affine_kernel<T, 1><<<grid, dim3(bx, by), 0, s>>>(p);
  check_launch("channel_affine");
}

// Call fn with a value of the element type of dtype t (f32, f16, bf16, f64).
template <class Fn>
void with_dtype(DType t, Fn&& fn) {
  switch (float_slot(t)) {
    case 0: return fn(float{});
    case 1: return fn(__half{});
    case 2: return fn(__nv_bfloat16{});
    default: return fn(double{});
  }
}
// Call fn with std::integral_constant<NormKind, kind>.
template <class Fn>
void with_kind(NormKind k, Fn&& fn) {
  switch (k) {
    case NormKind::LayerNorm: return fn(std::integral_constant<NormKind, NormKind::LayerNorm>{});
    case NormKind::RMSNorm: return fn(std::integral_constant<NormKind, NormKind::RMSNorm>{});
    case NormKind::CRMSNorm: return fn(std::integral_constant<NormKind, NormKind::CRMSNorm>{});
  }
  throw ValueError("norm kind: unknown value " + std::to_string(static_cast<int>(k)));
}


// ============================================================================ row statistics only
// norm_linear's first step: rstd (and the LayerNorm mean) of each row, nothing written per element.
// One 256-thread block per row (grid-stride over rows), strided over the row's features:
//   LayerNorm: K = h[0]; delta = mean(h - K); var = mean((h - K - delta)^2)   (two passes, shifted);
//              mean = K + delta, or (with mean_lo) the pair mean = K, mean_lo = delta
//   RMSNorm:   rstd = 1 / sqrt(mean(h^2) + eps)
//   CRMSNorm:  rstd = 1 / sqrt((sum h^2 + (sum h)^2) / (n + 1) + eps)
// Traffic: x read once (LayerNorm: twice, the second pass mostly from L1/L2).
template <class T, NormKind KIND>
__global__ void __launch_bounds__(256) stats_kernel(const T* x, int64_t ld, int64_t rows, int64_t n, double eps,
                                                    acc_t<T>* mean, acc_t<T>* mean_lo, acc_t<T>* rstd) {
  using A = acc_t<T>;
  __shared__ A red[2 * 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* h = x + r * ld;
    if (KIND == NormKind::LayerNorm) {
      const A K = Elem<T>::load(h[0]);
      A v[1] = {A(0)};
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[0] += Elem<T>::load(h[i]) - K;
      row_sum<1>(v, red);
      const A delta = mean_of<A>(v[0], n);
      A q[1] = {A(0)};
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        A c = (Elem<T>::load(h[i]) - K) - delta;
        q[0] += c * c;
      }
      row_sum<1>(q, red);
      if (threadIdx.x == 0) {
        if (mean_lo) {
          mean[r] = K;
          mean_lo[r] = delta;
        } else if (mean) {
          mean[r] = K + delta;
        }
        rstd[r] = inv_sqrt<A>(static_cast<double>(q[0]) / static_cast<double>(n), eps);
      }
    } else {
      A v[2] = {A(0), A(0)};  // sum h, sum h^2
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        A e = Elem<T>::load(h[i]);
        v[0] += e;
        v[1] += e * e;
      }
      row_sum<2>(v, red);
      if (threadIdx.x == 0) {
        const double s = v[0], q = v[1];
        const double ms = KIND == NormKind::RMSNorm ? q / static_cast<double>(n)
                                                    : (q + s * s) / static_cast<double>(n + 1);
        if (mean) mean[r] = A(0);
        rstd[r] = inv_sqrt<A>(ms, eps);
      }
    }
  }
}

}  // namespace

// ============================================================================ entry points

void norm_stats(const NormFwdArgs& a, void* stream) {
  if (a.x.rows == 0 || a.x.cols == 0) return;
  check_cols(a.x.cols);
  cudaStream_t s = as_stream(stream);
  const unsigned grid = static_cast<unsigned>(a.x.rows < (1 << 30) ? a.x.rows : (1 << 30));
  with_dtype(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    with_kind(a.kind, [&](auto k) {
      stats_kernel<T, decltype(k)::value><<<grid, 256, 0, s>>>(
          static_cast<const T*>(a.x.data), a.x.ld, a.x.rows, a.x.cols, a.eps, static_cast<A*>(a.mean),
          static_cast<A*>(a.mean_lo), static_cast<A*>(a.rstd));
    });
  });
  check_launch("norm_stats");
}

void norm_forward(const NormFwdArgs& a, void* stream) {
  if (a.x.rows == 0 || a.x.cols == 0) return;
  check_cols(a.x.cols);
  cudaStream_t s = as_stream(stream);
  with_dtype(a.x.dtype, [&](auto t) {
    using T = decltype(t);
    with_kind(a.kind, [&](auto k) { forward_typed<T, decltype(k)::value>(a, s); });
  });
}

void norm_backward(const NormBwdArgs& a, void* stream) {
  cudaStream_t s = as_stream(stream);
  const size_t acc = a.h.dtype == DType::F64 ? sizeof(double) : sizeof(float);
  if (a.h.rows == 0 || a.h.cols == 0) {  // sums over no rows
    if (a.dw) check(cudaMemsetAsync(a.dw, 0, static_cast<size_t>(a.h.cols) * acc, s), "cudaMemsetAsync (dweight)");
    if (a.db) check(cudaMemsetAsync(a.db, 0, static_cast<size_t>(a.h.cols) * acc, s), "cudaMemsetAsync (dbias)");
    return;
  }
  check_cols(a.h.cols);
  with_dtype(a.h.dtype, [&](auto t) {
    using T = decltype(t);
    with_kind(a.kind, [&](auto k) { backward_typed<T, decltype(k)::value>(a, s); });
  });
}

void channel_moments(const ChannelArgs& a, void* stream) {
  cudaStream_t s = as_stream(stream);
  const int64_t n = a.x.cols;
  if (n <= 0) return;
  const size_t acc = a.x.dtype == DType::F64 ? sizeof(double) : sizeof(float);
  const bool want2 = a.dy.data && a.out2;
  if (a.x.rows == 0) {  // sums over no rows
    check(cudaMemsetAsync(a.out1, 0, static_cast<size_t>(n) * acc, s), "cudaMemsetAsync (out1)");
    if (want2) check(cudaMemsetAsync(a.out2, 0, static_cast<size_t>(n) * acc, s), "cudaMemsetAsync (out2)");
    return;
  }
  with_dtype(a.x.dtype, [&](auto t) { moments_typed<decltype(t)>(a, s); });
}

void channel_affine(const ChannelArgs& a, void* stream) {
  if (a.u.rows == 0 || a.u.cols == 0) return;
  cudaStream_t s = as_stream(stream);
  with_dtype(a.u.dtype, [&](auto t) { affine_typed<decltype(t)>(a, s); });
}

}  // namespace cuda
}  // namespace ne
