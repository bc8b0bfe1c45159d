// Bindings of the L-Mul ops used by normengine.ops.lmul (part of the one module normengine._C):
// lmul_elementwise and lmul_bmm on CPU or CUDA float32 tensors. (The raw lmul_gemm / lmul_scalar
// bindings for the runner live in bindings/arith.cpp.) The Python wrappers broadcast, convert and lay
// out the tensors; here every tensor is checked once more for what the kernels read.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings/interop.h"
#include "normengine/errors.h"
#include "ops/lmul.h"

namespace py = pybind11;
using namespace ne_bind;

namespace {

void check_f32(const TensorView& t) {
  if (t.dtype != ne::DType::F32) throw ne::DTypeError(std::string(t.name) + ": expected float32");
}
void same_device(const TensorView& a, const TensorView& b) {
  if (a.device.type != b.device.type || a.device.index != b.device.index)
    throw ne::DeviceError(std::string(b.name) + ": on " + b.device.str() + ", expected " + a.device.str());
}
bool contiguous(const TensorView& t) {
  int64_t s = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] != 1 && t.strides[d] != s) return false;
    s *= t.shape[d];
  }
  return true;
}
int64_t numel(const TensorView& t) {
  int64_t n = 1;
  for (int d = 0; d < t.ndim; ++d) n *= t.shape[d];
  return n;
}
void no_cuda(const TensorView& t) {
#if !defined(NE_WITH_CUDA)
  if (t.device.type == ne::DeviceType::CUDA)
    throw ne::DeviceError(std::string(t.name) + ": this build of normengine has no CUDA kernels");
#endif
}

}  // namespace

void bind_lmul(py::module_& m) {
  m.def(
      "lmul_elementwise",
      [](py::handle a, py::handle b, py::handle out, int bits, std::uintptr_t stream) {
        Borrowed keep;
        TensorView va = view_of(a, "a", keep), vb = view_of(b, "b", keep), vo = view_of(out, "out", keep);
        for (const TensorView* t : {&va, &vb, &vo}) {
          check_f32(*t);
          same_device(va, *t);
          no_cuda(*t);
          if (!contiguous(*t)) throw ne::ShapeError(std::string(t->name) + ": expected a contiguous tensor");
        }
        const int64_t n = numel(vo);
        if (numel(va) != n || numel(vb) != n) throw ne::ShapeError("b: element counts of a, b and out differ");
        if (bits < 1 || bits > 23) throw ne::ValueError("mantissa_bits: expected 1..23, got " + std::to_string(bits));
        py::gil_scoped_release nogil;
        const float *pa = static_cast<const float*>(va.data), *pb = static_cast<const float*>(vb.data);
        float* po = static_cast<float*>(vo.data);
        if (vo.device.type == ne::DeviceType::CPU) {
          ne::lmul_map_f32(n, pa, pb, po, bits);
        } else {
#if defined(NE_WITH_CUDA)
          ne::cuda::lmul_map(n, pa, pb, po, bits, reinterpret_cast<void*>(stream));
#endif
        }
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("bits"), py::arg("stream") = 0,
      "out = lmul(a, b) elementwise (float32, contiguous, same element count).");

  m.def(
      "lmul_bmm",
      [](py::handle x, py::handle w, py::handle out, int bits, std::uintptr_t stream) {
        Borrowed keep;
        TensorView vx = view_of(x, "a", keep), vw = view_of(w, "b", keep), vy = view_of(out, "out", keep);
        for (const TensorView* t : {&vx, &vw, &vy}) {
          check_f32(*t);
          same_device(vx, *t);
          no_cuda(*t);
          if (t->ndim != 3) throw ne::ShapeError(std::string(t->name) + ": expected 3 dimensions [batch, rows, cols]");
          if (t->shape[2] > 1 && t->strides[2] != 1)
            throw ne::ShapeError(std::string(t->name) + ": expected unit stride along the last dimension");
        }
        const int64_t B = vx.shape[0], M = vx.shape[1], K = vx.shape[2], N = vw.shape[1];
        if (vw.shape[0] != B || vw.shape[2] != K)
          throw ne::ShapeError("b: expected [" + std::to_string(B) + ", N, " + std::to_string(K) + "]");
        if (vy.shape[0] != B || vy.shape[1] != M || vy.shape[2] != N)
          throw ne::ShapeError("out: expected [" + std::to_string(B) + ", " + std::to_string(M) + ", " +
                               std::to_string(N) + "]");
        if (bits < 1 || bits > 23) throw ne::ValueError("mantissa_bits: expected 1..23, got " + std::to_string(bits));
        py::gil_scoped_release nogil;
        const float *px = static_cast<const float*>(vx.data), *pw = static_cast<const float*>(vw.data);
        float* py_ = static_cast<float*>(vy.data);
        if (vy.device.type == ne::DeviceType::CPU) {
          for (int64_t bi = 0; bi < B; ++bi)
            ne::lmul_gemm_f32(M, N, K, px + bi * vx.strides[0], vx.strides[1], pw + bi * vw.strides[0], vw.strides[1],
                              nullptr, py_ + bi * vy.strides[0], vy.strides[1], false, bits);
        } else {
#if defined(NE_WITH_CUDA)
          ne::cuda::lmul_bmm(B, M, N, K, px, vx.strides[0], vx.strides[1], pw, vw.strides[0], vw.strides[1], py_,
                             vy.strides[0], vy.strides[1], bits, reinterpret_cast<void*>(stream));
#endif
        }
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("bits"), py::arg("stream") = 0,
      "out[b, m, n] = sum_k lmul(x[b, m, k], w[b, n, k]): every product an L-Mul, fp32 sums in k order.");
}
