// Bindings of the L-Mul ops used by normengine.ops.lmul (part of the one module normengine._C):
// lmul_elementwise and lmul_bmm on CPU or CUDA float32 tensors. (The raw lmul_gemm / lmul_scalar
// bindings for the runner live in bindings/arith.cpp.) The Python wrappers broadcast, convert and lay
// out the tensors; here every tensor is checked once more for what the kernels read.
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "normengine/ops.h"

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
      [](py::handle x, py::handle w, py::handle out, int bits, std::uintptr_t stream, bool w_kn) {
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
        if (w_kn && vw.device.type != ne::DeviceType::CPU)
          throw ne::UnsupportedError("b: w_kn (a [batch, K, N] operand) is read in place on the CPU only");
        const int64_t B = vx.shape[0], M = vx.shape[1], K = vx.shape[2], N = vw.shape[w_kn ? 2 : 1];
        if (vw.shape[0] != B || vw.shape[w_kn ? 1 : 2] != K)
          throw ne::ShapeError(w_kn ? "b: expected [" + std::to_string(B) + ", " + std::to_string(K) + ", N]"
                                    : "b: expected [" + std::to_string(B) + ", N, " + std::to_string(K) + "]");
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
                              nullptr, py_ + bi * vy.strides[0], vy.strides[1], false, bits, w_kn);
        } else {
#if defined(NE_WITH_CUDA)
          ne::cuda::lmul_bmm(B, M, N, K, px, vx.strides[0], vx.strides[1], pw, vw.strides[0], vw.strides[1], py_,
                             vy.strides[0], vy.strides[1], bits, reinterpret_cast<void*>(stream));
#endif
        }
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("bits"), py::arg("stream") = 0, py::arg("w_kn") = false,
      "out[b, m, n] = sum_k lmul(x[b, m, k], w[b, n, k]) (w_kn, CPU: w[b, k, n]): every product an L-Mul, fp32 "
      "sums in k order.");

  // The runner's raw entry point, exposed for testing: one sequence's KV cache.
  m.def(
      "lmul_cache_attention",
      [](py::handle q, py::handle k, py::handle v, py::handle pos, py::handle out, int n_heads, int n_kv_heads,
         double scale, int bits) {
        Borrowed keep;
        TensorView vq = view_of(q, "q", keep), vk = view_of(k, "k", keep), vv = view_of(v, "v", keep),
                   vp = view_of(pos, "pos", keep), vo = view_of(out, "out", keep);
        for (const TensorView* t : {&vq, &vk, &vv, &vo}) {
          check_f32(*t);
          if (t->device.type != ne::DeviceType::CPU) throw ne::DeviceError(std::string(t->name) + ": CPU only");
          if (t->ndim != 2 || !contiguous(*t)) throw ne::ShapeError(std::string(t->name) + ": expected a contiguous 2-D tensor");
        }
        if (vp.dtype != ne::DType::I32 || vp.ndim != 1 || vp.shape[0] != vq.shape[0] || !contiguous(vp))
          throw ne::ShapeError("pos: expected int32 [n_tokens]");
        if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads || vq.shape[1] % n_heads)
          throw ne::ValueError("n_heads: expected a multiple of n_kv_heads dividing q's width");
        const int D = static_cast<int>(vq.shape[1] / n_heads);
        if (vk.shape[1] != int64_t(n_kv_heads) * D || vv.shape[1] != vk.shape[1] || vv.shape[0] != vk.shape[0])
          throw ne::ShapeError("k: expected [ctx, n_kv_heads * head_dim], v the same");
        if (vo.shape[0] != vq.shape[0] || vo.shape[1] != vq.shape[1]) throw ne::ShapeError("out: expected q's shape");
        const int32_t* pp = static_cast<const int32_t*>(vp.data);
        for (int64_t t = 0; t < vp.shape[0]; ++t)
          if (pp[t] < 0 || pp[t] >= vk.shape[0]) throw ne::ValueError("pos: positions must lie in [0, ctx)");
        const int64_t T = vq.shape[0];
        std::vector<const float*> kp(static_cast<size_t>(T), static_cast<const float*>(vk.data)),
            vpp(static_cast<size_t>(T), static_cast<const float*>(vv.data));
        ne::AttnArgs a{T, static_cast<const float*>(vq.data), vq.shape[1], static_cast<float*>(vo.data), vo.shape[1],
                       kp.data(), vpp.data(), pp, n_heads, n_kv_heads, D, static_cast<float>(scale)};
        py::gil_scoped_release nogil;
        ne::lmul_cache_attention(a, bits);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos"), py::arg("out"), py::arg("n_heads"),
      py::arg("n_kv_heads"), py::arg("scale"), py::arg("bits"),
      "Testing: ne::lmul_cache_attention over one sequence's cache (q [T, H*D], k/v [ctx, Hkv*D], pos [T]).");
}
