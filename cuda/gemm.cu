// The dense linear layer on the GPU: y[M, N] (+)= s_m ((x - c_m) W^T) (+ b), x float32, W float32 /
// bfloat16 / float16 (widened in registers, never copied), accumulation in float32 FMA (no TF32, no
// 16-bit rounding of activations: the CPU's gemm_f32 numbers, up to summation order). The twin of
// cpp/ops/gemm.cpp; the CUDA runner's projections (cuda/runner.cu) and norm_linear on CUDA tensors
// (cpp/ops/norm_linear.cpp) run here. Contract: ne::cuda::DenseLinearArgs in cpp/ops/gemm.h.
//   M <= kGemvMaxRows: gemv_kernel, one warp per output column, W streamed once with 16-byte loads
//     (memory bound: the decode step's traffic is the weights once).
//   else: gemm_tiled_kernel, a BM x BN tile per 256-thread block, BK-deep k-steps staged through
//     shared memory (k-major, padded), each thread an TM x TN register tile read as float4s, the next
//     k-step's global loads in flight while the current one is multiplied.
// The norm epilogue of norm_linear: row_shift c_m (LayerNorm's mean) is subtracted from x as its tiles
// are read (exact for rows whose mean is large next to their spread), row_scale s_m (rstd) multiplies
// the row's sums before the bias, so the normalized activation is never written to memory.
#include <climits>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "ops/gemm.h"
#include "ops/norm.h"

namespace ne {
namespace cuda {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Four consecutive elements as one aligned load (16 bytes for float, 8 for 16-bit types).
template <class T> struct alignas(4 * sizeof(T)) Quad { T e[4]; };

// Elements k .. k+3 of a row of K elements, as float; those >= K (or all, when !ok) read as 0.
// vec: the row start is 4-element aligned (and k a multiple of 4), so a full quad is one load.
template <class T>
__device__ __forceinline__ void load4(const T* row, int64_t k, int64_t K, bool ok, bool vec, float (&o)[4]) {
  if (ok && vec && k + 4 <= K) {
    const Quad<T> q = *reinterpret_cast<const Quad<T>*>(row + k);
#pragma unroll
    for (int c = 0; c < 4; ++c) o[c] = Elem<T>::load(q.e[c]);
    return;
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) o[c] = ok && k + c < K ? Elem<T>::load(row[k + c]) : 0.f;
}

// ============================================================================ linear

struct GemmParams {
  const float* x;
  int64_t ldx;
  const void* w;
  int64_t ldw;
  const float* bias;  // [N] or null
  float* y;
  int64_t ldy;
  int M, N, K;
  bool accumulate;  // y += ...  (else y = ...)
  bool vec;         // the kernel's vector-load conditions hold (see dense_linear_t)
  const float* row_shift;     // [M] or null: (x[m, k] - row_shift[m]) - row_shift_lo[m] is what the
  const float* row_shift_lo;  // [M] or null   kernels multiply
  const float* row_scale;  // [M] or null: the row's sums times row_scale[m], before the bias
};

constexpr int kGemvRows = 8;      // rows of x per gemv block row (grid.y walks the rest)
constexpr int kGemvMaxRows = static_cast<int>(kDenseGemvMaxRows);  // at most this many rows take the gemv path
constexpr int kGemvWarps = 8;     // output columns per gemv block

// ---------------------------------------------------------------------------- gemv_kernel
// y[m, n] (+)= s_m sum_k (x[m, k] - c_m) W[n, k] (+ b[n]) for the R rows m0 .. m0+R-1 (m0 = blockIdx.y * R)
// and the column n = blockIdx.x * 8 + warp. The warp's lanes stride along K, 16 bytes of W each
// (4 f32 / 8 f16/bf16), and multiply them into every row of x (tiny, cached in L1); warp sums at the end.
// Traffic: W once (per block row of R rows), the bound of a decode step.
// vec: W's row starts and x's row starts 16-byte aligned.
template <class TW, int R>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const GemmParams p) {
  constexpr int V = static_cast<int>(16 / sizeof(TW));
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  if (n >= p.N) return;  // the whole warp leaves; no block barrier follows
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * R;
  const int64_t left = static_cast<int64_t>(p.M) - m0;
  const int rows = left < R ? static_cast<int>(left) : R;
  const TW* w = static_cast<const TW*>(p.w) + n * p.ldw;
  const float* x = p.x + m0 * p.ldx;
  const int64_t K = p.K;
  float acc[R], c[R], cl[R];  // c, cl: the rows' shifts (norm_linear's LayerNorm means, two parts)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc[r] = 0.f;
    c[r] = p.row_shift && r < rows ? p.row_shift[m0 + r] : 0.f;
    cl[r] = p.row_shift_lo && r < rows ? p.row_shift_lo[m0 + r] : 0.f;
  }

  const int64_t kv = p.vec ? (K / V) * V : 0;  // [0, kv): full vectors
  for (int64_t k = static_cast<int64_t>(lane) * V; k < kv; k += 32 * V) {
    const Pack<TW, V> wp = *reinterpret_cast<const Pack<TW, V>*>(w + k);
    float wf[V];
#pragma unroll
    for (int i = 0; i < V; ++i) wf[i] = Elem<TW>::load(wp.e[i]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          const float4 xv = *reinterpret_cast<const float4*>(x + r * p.ldx + k + 4 * q);
          acc[r] = fmaf((xv.x - c[r]) - cl[r], wf[4 * q + 0], acc[r]);
          acc[r] = fmaf((xv.y - c[r]) - cl[r], wf[4 * q + 1], acc[r]);
          acc[r] = fmaf((xv.z - c[r]) - cl[r], wf[4 * q + 2], acc[r]);
          acc[r] = fmaf((xv.w - c[r]) - cl[r], wf[4 * q + 3], acc[r]);
        }
      }
    }
  }
  for (int64_t k = kv + lane; k < K; k += 32) {  // the tail (everything when !vec)
    const float wk = Elem<TW>::load(w[k]);
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < rows) acc[r] = fmaf((x[r * p.ldx + k] - c[r]) - cl[r], wk, acc[r]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0) {
    const float b = p.bias ? p.bias[n] : 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {
        float* yp = p.y + (m0 + r) * p.ldy + n;
        float v = (p.row_scale ? acc[r] * p.row_scale[m0 + r] : acc[r]) + b;
        if (p.accumulate) v += *yp;
        *yp = v;
      }
    }
  }
}

// ---------------------------------------------------------------------------- gemm_tiled_kernel
// Block (blockIdx.x, blockIdx.y) computes y[m0 .. m0+BM, n0 .. n0+BN), m0 = blockIdx.y * BM,
// n0 = blockIdx.x * BN. Per k-step of BK: the x tile [BM x BK] and the W tile [BN x BK] (both
// K-contiguous in memory) are read as quads of 4 k-values (one 16- or 8-byte load each when vec),
// widened to float and stored k-major into shared memory As[BK][BM+4], Bs[BK][BN+4] (the +4 pad
// keeps float4 alignment and spreads the transposing stores over the banks). Thread (tx, ty) owns
// rows  (i/4) * (4 TY) + 4 ty + i%4  (i < TM)  and columns  (j/4) * (4 TX) + 4 tx + j%4  (j < TN):
// groups of 4 adjacent rows / columns spaced so that a warp's float4 reads of a k-row of Bs are
// contiguous (conflict-free) and those of As are broadcasts. The next k-step's quads are loaded into
// registers before the current step's FMAs (one shared buffer, two barriers per step).
// Traffic: x read N/BN times, W read M/BM times (mostly from L2), y written (and read when
// accumulating) once.
constexpr int kTileThreads = 256;

template <class TW, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__(kTileThreads) gemm_tiled_kernel(const GemmParams p) {
  constexpr int TX = BN / TN, TY = BM / TM;
  static_assert(TX * TY == kTileThreads, "one output tile per thread");
  static_assert(TM % 4 == 0 && TN % 4 == 0 && BK % 4 == 0, "quads of 4");
  constexpr int KQ = BK / 4;                           // quads per tile row
  constexpr int LA = BM * KQ / kTileThreads, LB = BN * KQ / kTileThreads;  // quads per thread
  static_assert(LA >= 1 && LA * kTileThreads == BM * KQ, "x tile: whole quads per thread");
  static_assert(LB >= 1 && LB * kTileThreads == BN * KQ, "W tile: whole quads per thread");
  __shared__ __align__(16) float As[BK][BM + 4];
  __shared__ __align__(16) float Bs[BK][BN + 4];

  const int tid = static_cast<int>(threadIdx.x), tx = tid % TX, ty = tid / TX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const TW* W = static_cast<const TW*>(p.w);
  const int64_t K = p.K;

  float ra[LA][4], rb[LB][4];
  float shift[LA], shift_lo[LA];  // the shifts of this thread's x-tile rows (the same rows at every k-step)
#pragma unroll
  for (int l = 0; l < LA; ++l) {
    const int64_t m = m0 + (tid + l * kTileThreads) / KQ;
    shift[l] = p.row_shift && m < p.M ? p.row_shift[m] : 0.f;
    shift_lo[l] = p.row_shift_lo && m < p.M ? p.row_shift_lo[m] : 0.f;
  }
  auto load_tiles = [&](int64_t k0) {
#pragma unroll
    for (int l = 0; l < LA; ++l) {
      const int e = tid + l * kTileThreads, r = e / KQ, kq = e % KQ;
      const int64_t m = m0 + r;
      const bool ok = m < p.M;
      load4<float>(ok ? p.x + m * p.ldx : p.x, k0 + 4 * kq, K, ok, p.vec, ra[l]);
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (k0 + 4 * kq + c < K) ra[l][c] = (ra[l][c] - shift[l]) - shift_lo[l];  // the padding past K stays 0
    }
#pragma unroll
    for (int l = 0; l < LB; ++l) {
      const int e = tid + l * kTileThreads, r = e / KQ, kq = e % KQ;
      const int64_t n = n0 + r;
      const bool ok = n < p.N;
      load4<TW>(ok ? W + n * p.ldw : W, k0 + 4 * kq, K, ok, p.vec, rb[l]);
    }
  };
  auto store_tiles = [&]() {
#pragma unroll
    for (int l = 0; l < LA; ++l) {
      const int e = tid + l * kTileThreads, r = e / KQ, kq = e % KQ;
#pragma unroll
      for (int c = 0; c < 4; ++c) As[4 * kq + c][r] = ra[l][c];
    }
#pragma unroll
    for (int l = 0; l < LB; ++l) {
      const int e = tid + l * kTileThreads, r = e / KQ, kq = e % KQ;
#pragma unroll
      for (int c = 0; c < 4; ++c) Bs[4 * kq + c][r] = rb[l][c];
    }
  };

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  const int64_t steps = (K + BK - 1) / BK;
  load_tiles(0);
  store_tiles();
  __syncthreads();
  for (int64_t s = 0; s < steps; ++s) {
    const bool more = s + 1 < steps;  // uniform over the block
    if (more) load_tiles((s + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int g = 0; g < TM / 4; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(&As[kk][g * 4 * TY + 4 * ty]);
        a[4 * g + 0] = v.x; a[4 * g + 1] = v.y; a[4 * g + 2] = v.z; a[4 * g + 3] = v.w;
      }
#pragma unroll
      for (int g = 0; g < TN / 4; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(&Bs[kk][g * 4 * TX + 4 * tx]);
        b[4 * g + 0] = v.x; b[4 * g + 1] = v.y; b[4 * g + 2] = v.z; b[4 * g + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // every thread is done reading this step's tiles
    if (more) {
      store_tiles();
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + (i / 4) * 4 * TY + 4 * ty + (i % 4);
    if (m >= p.M) continue;
    float* yr = p.y + m * p.ldy;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + (j / 4) * 4 * TX + 4 * tx + (j % 4);
      if (n < p.N) {
        float v = p.row_scale ? acc[i][j] * p.row_scale[m] : acc[i][j];
        if (p.bias) v += p.bias[n];
        if (p.accumulate) v += yr[n];
        yr[n] = v;
      }
    }
  }
}

// Two tile shapes: 128 x 128 (8 x 8 per thread) when the grid still fills the GPU twice over, else
// 64 x 64 (4 x 4 per thread) for more blocks on smaller problems.
constexpr int kBigBM = 128, kBigBN = 128, kBigBK = 8, kBigTM = 8, kBigTN = 8;
constexpr int kSmallBM = 64, kSmallBN = 64, kSmallBK = 16, kSmallTM = 4, kSmallTN = 4;

// ============================================================================ host side

bool aligned_to(const void* p, size_t n) { return (reinterpret_cast<std::uintptr_t>(p) % n) == 0; }

template <class TW>
void dense_linear_t(const DenseLinearArgs& a, cudaStream_t s) {
  GemmParams p{};
  p.x = a.x;
  p.ldx = a.ldx;
  p.w = a.w;
  p.ldw = a.ldw;
  p.bias = a.bias;
  p.y = a.y;
  p.ldy = a.ldy;
  p.M = static_cast<int>(a.M);
  p.N = static_cast<int>(a.N);
  p.K = static_cast<int>(a.K);
  p.accumulate = a.accumulate;
  p.row_shift = a.norm.shift;
  p.row_shift_lo = a.norm.shift_lo;
  p.row_scale = a.norm.scale;
  const int64_t M = a.M, ldx = a.ldx;
  const float* x = a.x;
  if (M <= kGemvMaxRows) {
    // 16-byte vectors of W and of x rows
    p.vec = aligned_to(a.w, 16) && (a.ldw * static_cast<int64_t>(sizeof(TW))) % 16 == 0 && aligned_to(x, 16) &&
            ldx % 4 == 0;
    const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kGemvWarps)), static_cast<unsigned>(ceil_div(M, kGemvRows)));
    gemv_kernel<TW, kGemvRows><<<grid, kGemvWarps * 32, 0, s>>>(p);
    check_launch("gemv_kernel");
    return;
  }
  // quads of 4 elements of W and of x rows
  p.vec = aligned_to(a.w, 4 * sizeof(TW)) && a.ldw % 4 == 0 && aligned_to(x, 16) && ldx % 4 == 0;
  const int64_t big_blocks = ceil_div(M, kBigBM) * ceil_div(p.N, kBigBN);
  if (big_blocks >= 2 * static_cast<int64_t>(sm_count())) {
    const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kBigBN)), static_cast<unsigned>(ceil_div(M, kBigBM)));
    gemm_tiled_kernel<TW, kBigBM, kBigBN, kBigBK, kBigTM, kBigTN><<<grid, kTileThreads, 0, s>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kSmallBN)), static_cast<unsigned>(ceil_div(M, kSmallBM)));
    gemm_tiled_kernel<TW, kSmallBM, kSmallBN, kSmallBK, kSmallTM, kSmallTN><<<grid, kTileThreads, 0, s>>>(p);
  }
  check_launch("gemm_tiled_kernel");
}

}  // namespace

void dense_linear(const DenseLinearArgs& a, void* stream) {
  if (a.M <= 0 || a.N <= 0) return;
  if (a.M > INT_MAX || a.N > INT_MAX || a.K > INT_MAX)
    throw UnsupportedError("dense_linear: " + std::to_string(a.M) + " x " + std::to_string(a.N) + " x " +
                           std::to_string(a.K) + " is too large for the CUDA GEMM kernels");
  static_assert(kDenseMaxRows == 65535LL * kSmallBM, "grid.y of the small tiles");
  if (a.M > kDenseMaxRows) throw UnsupportedError("dense_linear: too many rows for one launch");
  const cudaStream_t s = as_stream(stream);
  switch (a.wdt) {
    case DType::F32: return dense_linear_t<float>(a, s);
    case DType::F16: return dense_linear_t<__half>(a, s);
    case DType::BF16: return dense_linear_t<__nv_bfloat16>(a, s);
    default: throw DTypeError(std::string("linear weight: unsupported dtype ") + dtype_name(a.wdt));
  }
}

void norm_linear_gemm(DenseLinearArgs a, NormKind kind, double eps, float* rstd, void* stream) {
  if (a.M <= 0 || a.N <= 0) return;
  StreamScratch scratch;
  if (kind == NormKind::LayerNorm) {  // the mean as the pair (x[0], mean(x - x[0])): cuda/norm.cu
    float* pair = static_cast<float*>(scratch.alloc(2 * static_cast<size_t>(a.M) * sizeof(float), as_stream(stream)));
    NormFwdArgs st{};
    st.kind = kind;
    st.x = RowMatrix{const_cast<float*>(a.x), DType::F32, a.M, a.K, a.ldx};
    st.mean = pair;
    st.mean_lo = pair + a.M;
    st.rstd = rstd;
    st.eps = eps;
    norm_stats(st, stream);
    a.norm.shift = pair;
    a.norm.shift_lo = pair + a.M;
  }
  a.norm.scale = rstd;
  dense_linear(a, stream);
}

}  // namespace cuda
}  // namespace ne
