// Rotary position embedding as a training op on the GPU (the CPU's cpp/ops/rotary.cpp), grid-stride over the
// rows' R / 2 pairs (i, i + R / 2), and over the copied tail x[R:] when y is not x:
//   forward:   y1 = x1 c1 - x2 s1,    y2 = x2 c2 + x1 s2
//   backward:  dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
// An out-of-range position row gives NaN rows (the Python op checks the rows before launching).
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "ops/rotary.h"

namespace ne {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads)
rotary_kernel(int64_t rows, int64_t D, int64_t R, const T* x, int64_t ldx, T* y, int64_t ldy, const acc_t<T>* cs,
              const acc_t<T>* sn, const int64_t* crow, int64_t P, bool backward) {
  using A = acc_t<T>;
  const int64_t h = R / 2, per = h + (x == y ? 0 : D - R);  // work items per row: the pairs, then the tail
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < rows * per;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / per, j = i % per;
    const T* xr = x + r * ldx;
    T* yr = y + r * ldy;
    if (j >= h) {  // the copied tail
      yr[R + j - h] = xr[R + j - h];
      continue;
    }
    const int64_t p = crow[r];
    if (p < 0 || p >= P) {
      yr[j] = yr[h + j] = Elem<T>::store(A(NAN));
      continue;
    }
    const A* c = cs + p * R;
    const A* s = sn + p * R;
    const A x1 = Elem<T>::load(xr[j]), x2 = Elem<T>::load(xr[h + j]);
    if (!backward) {
      yr[j] = Elem<T>::store(x1 * c[j] - x2 * s[j]);
      yr[h + j] = Elem<T>::store(x2 * c[h + j] + x1 * s[h + j]);
    } else {
      yr[j] = Elem<T>::store(x1 * c[j] + x2 * s[h + j]);
      yr[h + j] = Elem<T>::store(x2 * c[h + j] - x1 * s[j]);
    }
  }
}

template <class T>
void launch(const RotaryArgs& a, int64_t P, cudaStream_t st) {
  const int64_t per = a.R / 2 + (a.x.data == a.y.data ? 0 : a.x.cols - a.R), n = a.x.rows * per;
  if (n == 0) return;
  const int64_t b = (n + kThreads - 1) / kThreads;
  rotary_kernel<T><<<static_cast<unsigned>(b < 4096 ? b : 4096), kThreads, 0, st>>>(
      a.x.rows, a.x.cols, a.R, static_cast<const T*>(a.x.data), a.x.ld, static_cast<T*>(a.y.data), a.y.ld,
      static_cast<const acc_t<T>*>(a.cos), static_cast<const acc_t<T>*>(a.sin), a.crow, P, a.backward);
  check_launch("rotary_kernel");
}

}  // namespace

void rotary(const RotaryArgs& a, void* stream) {
  const int64_t P = a.n_positions;
  switch (a.x.dtype) {
    case DType::F32: return launch<float>(a, P, as_stream(stream));
    case DType::F16: return launch<__half>(a, P, as_stream(stream));
    case DType::BF16: return launch<__nv_bfloat16>(a, P, as_stream(stream));
    default: return launch<double>(a, P, as_stream(stream));
  }
}

}  // namespace cuda
}  // namespace ne
