// Gated activations of an MLP on the GPU, forward and backward (the CPU's cpp/ops/gated.cpp), grid-stride
// over the rows' elements:
//   y  = act(a) * b            da = dy * b * act'(a)            db = dy * act(a)
// (without b: y = act(a), da = dy * act'(a)); 16-bit tensors in float32 math, float64 in double.
#include <cstdint>

#include "activation.cuh"
#include "common.cuh"
#include "ops/gated.h"

namespace ne {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Mat {  // a RowMatrix's element (r, c) offset, on the device
  int64_t cols, ld;
  __device__ int64_t at(int64_t i) const { return (i / cols) * ld + i % cols; }
};

template <class T>
__global__ void __launch_bounds__(kThreads)
gated_fwd_kernel(int kind, int64_t n, Mat ma, const T* a, Mat mb, const T* b, Mat my, T* y) {
  using A = acc_t<T>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    A v = act_fn(kind, Elem<T>::load(a[ma.at(i)]));
    if (b) v *= Elem<T>::load(b[mb.at(i)]);
    y[my.at(i)] = Elem<T>::store(v);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
gated_bwd_kernel(int kind, int64_t n, Mat ma, const T* a, Mat mb, const T* b, Mat mdy, const T* dy, Mat mda, T* da,
                 Mat mdb, T* db) {
  using A = acc_t<T>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    A y;
    const A d = act_grad(kind, Elem<T>::load(a[ma.at(i)]), y);
    const A g = Elem<T>::load(dy[mdy.at(i)]);
    if (b) {
      da[mda.at(i)] = Elem<T>::store(g * Elem<T>::load(b[mb.at(i)]) * d);
      if (db) db[mdb.at(i)] = Elem<T>::store(g * y);
    } else {
      da[mda.at(i)] = Elem<T>::store(g * d);
    }
  }
}

Mat mat(const RowMatrix& m) { return Mat{m.cols > 0 ? m.cols : 1, m.ld}; }

unsigned blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

template <class T>
void fwd(const GatedArgs& g, cudaStream_t st) {
  const int64_t n = g.a.rows * g.a.cols;
  if (n == 0) return;
  gated_fwd_kernel<T><<<blocks(n), kThreads, 0, st>>>(g.act, n, mat(g.a), static_cast<const T*>(g.a.data), mat(g.b),
                                                     static_cast<const T*>(g.b.data), mat(g.y),
                                                     static_cast<T*>(g.y.data));
  check_launch("gated_fwd_kernel");
}

template <class T>
void bwd(const GatedArgs& g, cudaStream_t st) {
  const int64_t n = g.a.rows * g.a.cols;
  if (n == 0) return;
  gated_bwd_kernel<T><<<blocks(n), kThreads, 0, st>>>(
      g.act, n, mat(g.a), static_cast<const T*>(g.a.data), mat(g.b), static_cast<const T*>(g.b.data), mat(g.dy),
      static_cast<const T*>(g.dy.data), mat(g.da), static_cast<T*>(g.da.data), mat(g.db), static_cast<T*>(g.db.data));
  check_launch("gated_bwd_kernel");
}

}  // namespace

void gated_forward(const GatedArgs& g, void* stream) {
  switch (g.a.dtype) {
    case DType::F32: return fwd<float>(g, as_stream(stream));
    case DType::F16: return fwd<__half>(g, as_stream(stream));
    case DType::BF16: return fwd<__nv_bfloat16>(g, as_stream(stream));
    default: return fwd<double>(g, as_stream(stream));
  }
}

void gated_backward(const GatedArgs& g, void* stream) {
  switch (g.a.dtype) {
    case DType::F32: return bwd<float>(g, as_stream(stream));
    case DType::F16: return bwd<__half>(g, as_stream(stream));
    case DType::BF16: return bwd<__nv_bfloat16>(g, as_stream(stream));
    default: return bwd<double>(g, as_stream(stream));
  }
}

}  // namespace cuda
}  // namespace ne
