// Cross-entropy of logit rows on the GPU: the CPU kernel's formulas (cpp/ops/cross_entropy.cpp), one block
// per row, each pass a strided sweep of the row followed by a block reduction:
//   pass 1: m = max_j z_j (NaN kept), and sum_j z_j for label smoothing
//   pass 2: sum_j exp(z_j - m), the exps kept in grad
//   loss = m + log(sum) - (1 - s) z_t - (s / V) sum_j z_j          (in double, by one thread)
//   pass 3: grad_j = c * (e_j / sum - s / V), then grad_t -= c (1 - s)        (c = scale * row_scale[r])
// Rows whose target is ignore_index: loss 0, grad 0. An out-of-range target: NaN loss and NaN gradient row
// (the Python op checks targets before it launches).
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "ops/cross_entropy.h"

namespace ne {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// op over the block's values; every thread gets the result. red: kThreads / 32 scratch slots.
template <class A, class Op>
__device__ __forceinline__ A block_reduce(A v, A* red, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // (red may still be read by the previous reduction)
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < kThreads / 32; ++w) v = op(v, red[w]);
  return v;
}

template <class A>
__device__ __forceinline__ A max_keep_nan(A a, A b) { return (a != a || a > b) ? a : b; }

template <class A>
__global__ void __launch_bounds__(kThreads) ce_rows_kernel(CeArgs a) {
  __shared__ A red[kThreads / 32];
  const int64_t r = blockIdx.x, V = a.z.cols;
  const A* z = static_cast<const A*>(a.z.data) + r * a.z.ld;  // (RowMatrix::row is host code)
  A* g = a.grad.data ? static_cast<A*>(a.grad.data) + r * a.grad.ld : nullptr;
  A* loss = static_cast<A*>(a.loss) + r;
  A* lse_out = a.lse ? static_cast<A*>(a.lse) + r : nullptr;
  const int64_t t = a.target[r];
  if (t == a.ignore_index) {
    if (threadIdx.x == 0) {
      *loss = A(0);
      if (lse_out) *lse_out = A(0);
    }
    if (g)
      for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = A(0);
    return;
  }
  if (t < 0 || t >= V) {
    if (threadIdx.x == 0) *loss = A(NAN);
    if (g)
      for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = A(NAN);
    return;
  }
  const A s = static_cast<A>(a.smoothing);
  A m = A(-INFINITY), zs = A(0);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const A v = z[j];
    m = max_keep_nan(m, v);
    zs += v;
  }
  m = block_reduce(m, red, [](A x, A y) { return max_keep_nan(x, y); });
  zs = block_reduce(zs, red, [](A x, A y) { return x + y; });
  const A zt = z[t];
  __syncthreads();  // every thread has read z_t before pass 2 may overwrite it (grad == logits)
  A es = A(0);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const A e = exp(z[j] - m);
    es += e;
    if (g) g[j] = e;
  }
  es = block_reduce(es, red, [](A x, A y) { return x + y; });
  if (threadIdx.x == 0) {  // (the row's scalars in double, as the CPU kernel: a loss near 0 keeps its digits)
    const double lse = static_cast<double>(m) + log(static_cast<double>(es));
    const double sd = a.smoothing;
    *loss = static_cast<A>(lse - (1.0 - sd) * static_cast<double>(zt) - sd / static_cast<double>(V) * zs);
    if (lse_out) *lse_out = static_cast<A>(lse);
  }
  if (!g) return;
  const A c = static_cast<A>(a.scale) * (a.row_scale ? static_cast<const A*>(a.row_scale)[r] : A(1));
  const A mul = c / es, sub = c * s / static_cast<A>(V);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    A v = g[j] * mul - sub;
    if (j == t) v -= c * (A(1) - s);
    g[j] = v;
  }
}

}  // namespace

void cross_entropy(const CeArgs& a, void* stream) {
  if (a.z.rows == 0) return;
  if (a.z.rows > 2147483647LL) throw UnsupportedError("cross_entropy: too many rows for one launch");
  const dim3 grid(static_cast<unsigned>(a.z.rows));
  if (a.z.dtype == DType::F64)
    ce_rows_kernel<double><<<grid, kThreads, 0, as_stream(stream)>>>(a);
  else
    ce_rows_kernel<float><<<grid, kThreads, 0, as_stream(stream)>>>(a);
  check_launch("cross_entropy");
}

}  // namespace cuda
}  // namespace ne
