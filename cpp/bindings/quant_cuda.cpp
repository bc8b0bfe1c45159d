// Bindings of the CUDA quantized GEMMs (cuda/quant_gemm.cu; part of the one module normengine._C,
// present only in CUDA builds):
//   quant_linear_cuda(x, format, data, scale, zero, group, N, K, bias, out, accumulate=False, stream=0)
//       out[M, N] (+)= x[M, K] @ dequant(W)^T (+ bias) with the format's activation handling (quant_gemm.h);
//       x float32 / bfloat16 / float16 with unit column stride, out float32, every tensor on one CUDA device.
//   quant_activations_cuda(x, format, q, s, stream=0)
//       the activation quantization alone (format 0: int8 per row, 3: E4M3 per row and 128-block), for tests.
//   set_sm90_gemm(enabled) / sm90_gemm_enabled() / sm90_gemm_compiled() / sm90_gemm_calls()
//       the Hopper wgmma path of int8 / fp8 (cuda/quant_gemm_sm90.h): on by default where compiled in.
// `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream), 0 = the legacy default.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/interop.h"
#include "ops/quant_gemm.h"

namespace py = pybind11;
using namespace ne_bind;

#if defined(NE_WITH_CUDA)
namespace {

void on_cuda(const TensorView& t, const TensorView& ref) {
  if (t.device.type != ne::DeviceType::CUDA)
    throw ne::DeviceError(std::string(t.name) + ": expected a CUDA tensor, got " + t.device.str());
  if (t.device.index != ref.device.index)
    throw ne::DeviceError(std::string(t.name) + ": on " + t.device.str() + ", expected " + ref.device.str());
}

// A `rows` x `cols` matrix with unit column stride; returns its row stride.
int64_t matrix(const TensorView& t, int64_t rows, int64_t cols) {
  const bool ok = t.ndim == 2 && t.shape[0] == rows && t.shape[1] == cols && (cols <= 1 || t.strides[1] == 1) &&
                  (rows <= 1 || t.strides[0] >= cols);
  if (!ok)
    throw ne::ShapeError(std::string(t.name) + ": expected a [" + std::to_string(rows) + ", " + std::to_string(cols) +
                         "] matrix with contiguous rows, got " + ne::shape_str(t));
  return rows > 1 ? t.strides[0] : cols;
}

void dtype_is(const TensorView& t, ne::DType dt) {
  if (t.dtype != dt)
    throw ne::DTypeError(std::string(t.name) + ": expected " + ne::dtype_name(dt) + ", got " + ne::dtype_name(t.dtype));
}

void contiguous_f32(const TensorView& t, int64_t n) {
  dtype_is(t, ne::DType::F32);
  if (!t.is_contiguous() || t.numel() != n)
    throw ne::ShapeError(std::string(t.name) + ": expected a contiguous float32 tensor of " + std::to_string(n) +
                         " elements, got " + ne::shape_str(t));
}

void x_dtype(const TensorView& x) {
  if (x.dtype != ne::DType::F32 && x.dtype != ne::DType::BF16 && x.dtype != ne::DType::F16)
    throw ne::DTypeError(std::string("x: expected float32, bfloat16 or float16, got ") + ne::dtype_name(x.dtype));
}

}  // namespace
#endif

void bind_quant_cuda(py::module_& m) {
#if defined(NE_WITH_CUDA)
  m.def(
      "quant_linear_cuda",
      [](py::handle x, int fmt, py::handle data, py::handle scale, py::handle zero, int64_t group, int64_t N, int64_t K,
         py::handle bias, py::handle out, bool accumulate, std::uintptr_t stream) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vd = view_of(data, "qweight.data", b),
                   vs = view_of(scale, "qweight.scale", b), vo = view_of(out, "out", b);
        Opt vz = opt_view(zero, "qweight.zero", b), vb = opt_view(bias, "bias", b);
        if (fmt < 0 || fmt > 3) throw ne::ValueError("format: expected 0..3, got " + std::to_string(fmt));
        if (N < 1 || K < 1) throw ne::ShapeError("N, K: expected positive sizes");
        on_cuda(vx, vx);
        const TensorView* others[] = {&vd, &vs, &vo, vz.ptr(), vb.ptr()};
        for (const TensorView* t : others)
          if (t) on_cuda(*t, vx);
        x_dtype(vx);
        if (vx.ndim != 2) throw ne::ShapeError("x: expected a 2-D [M, K] tensor, got " + ne::shape_str(vx));
        const int64_t M = vx.shape[0];
        const int64_t ldx = matrix(vx, M, K);
        dtype_is(vo, ne::DType::F32);
        const int64_t ldy = matrix(vo, M, N);
        ne::QWeight w;
        w.format = static_cast<ne::QFormat>(fmt);
        w.N = N;
        w.K = K;
        w.group = group;
        const bool int4 = w.format == ne::QFormat::Int4;
        if (int4 && (group != 32 && group != 64 && group != 128))
          throw ne::ValueError("group: int4 needs 32, 64 or 128, got " + std::to_string(group));
        if (int4 && K % group) throw ne::ShapeError("K: " + std::to_string(K) + " is not a multiple of the group size");
        dtype_is(vd, (w.format == ne::QFormat::FP8 || int4) ? ne::DType::U8 : ne::DType::I8);
        if (!vd.is_contiguous() || matrix(vd, N, int4 ? K / 2 : K) != (int4 ? K / 2 : K))
          throw ne::ShapeError("qweight.data: expected a contiguous tensor");
        const int64_t want = ne::qweight_scale_count(w.format, N, K, group);
        contiguous_f32(vs, want);
        if (vz.ptr()) {
          if (!int4 && !(w.format == ne::QFormat::Int8Weight && group > 0))
            throw ne::ValueError("qweight.zero: only int4 and grouped int8-weight take zero points");
          contiguous_f32(*vz.ptr(), want);
        }
        if (vb.ptr()) contiguous_f32(*vb.ptr(), N);
        w.data = vd.data;
        w.scale = static_cast<const float*>(vs.data);
        w.zero = vz.ptr() ? static_cast<const float*>(vz.ptr()->data) : nullptr;
        const float* pb = vb.ptr() ? static_cast<const float*>(vb.ptr()->data) : nullptr;
        py::gil_scoped_release nogil;
        ne::cuda::quant_linear(M, vx.data, vx.dtype, ldx, w, pb, static_cast<float*>(vo.data), ldy, accumulate,
                               reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("format"), py::arg("data"), py::arg("scale"), py::arg("zero"), py::arg("group"),
      py::arg("N"), py::arg("K"), py::arg("bias"), py::arg("out"), py::arg("accumulate") = false,
      py::arg("stream") = 0,
      "CUDA: out[M, N] (+)= x[M, K] @ dequant(W)^T (+ bias), the format's own activation handling (quant_gemm.h).");

  m.def(
      "quant_activations_cuda",
      [](py::handle x, int fmt, py::handle q, py::handle s, std::uintptr_t stream) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vq = view_of(q, "q", b), vs = view_of(s, "s", b);
        if (fmt != 0 && fmt != 3) throw ne::ValueError("format: expected 0 (int8) or 3 (fp8), got " + std::to_string(fmt));
        on_cuda(vx, vx);
        on_cuda(vq, vx);
        on_cuda(vs, vx);
        x_dtype(vx);
        if (vx.ndim != 2) throw ne::ShapeError("x: expected a 2-D [M, K] tensor, got " + ne::shape_str(vx));
        const int64_t M = vx.shape[0], K = vx.shape[1];
        const int64_t ldx = matrix(vx, M, K);
        dtype_is(vq, fmt == 0 ? ne::DType::I8 : ne::DType::U8);
        const int64_t ldq = matrix(vq, M, K);
        const int64_t KB = fmt == 0 ? 1 : (K + 127) / 128;
        dtype_is(vs, ne::DType::F32);
        const int64_t lds = matrix(vs, M, KB);
        py::gil_scoped_release nogil;
        ne::cuda::quant_activations(M, K, vx.data, vx.dtype, ldx, static_cast<ne::QFormat>(fmt), vq.data, ldq,
                                    static_cast<float*>(vs.data), lds, reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("format"), py::arg("q"), py::arg("s"), py::arg("stream") = 0,
      "CUDA: quantize x [M, K] as quant_linear_cuda does: format 0 -> q int8 [M, K], s [M, 1]; format 3 -> q E4M3 "
      "bytes (uint8) [M, K], s [M, ceil(K / 128)].");
  m.def("set_sm90_gemm", &ne::cuda::set_sm90_gemm, py::arg("enabled"),
        "CUDA: route int8 / fp8 GEMMs of more than 8 rows on an sm_90 device to the wgmma kernels (True, the "
        "default) or to the mma.sync kernel (False), for tests and benchmarks that compare the two.");
  m.def("sm90_gemm_enabled", &ne::cuda::sm90_gemm_enabled);
  m.def("sm90_gemm_calls", &ne::cuda::sm90_gemm_calls, "CUDA: GEMMs the sm_90a wgmma kernels have run so far.");
  m.def("sm90_gemm_compiled", &ne::cuda::sm90_gemm_compiled,
        "Whether this build has the sm_90a wgmma GEMMs (CUDA builds with NORMENGINE_SM90_GEMM=ON).");
#else
  m.def("sm90_gemm_compiled", [] { return false; }, "Whether this build has the sm_90a wgmma GEMMs (no: no CUDA).");
#endif
}
