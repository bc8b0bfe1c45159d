// Bindings of the quantized GEMM kernels (part of the one module normengine._C).
// The Python wrapper (normengine.ops.quant) checks and lays out the tensors;
// here every tensor is checked once more for what the raw kernels read.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>

#include "bindings/interop.h"
#include "ops/quant_gemm.h"

namespace py = pybind11;
using namespace ne_bind;

namespace {

const float* vec(const Opt& o, int64_t n) {
  if (!o.ptr()) return nullptr;
  const ne::TensorView& t = *o.ptr();
  if (t.device.type != ne::DeviceType::CPU || t.dtype != ne::DType::F32 || t.ndim != 1 || t.shape[0] != n ||
      (n > 1 && t.strides[0] != 1))
    throw ne::ShapeError(std::string(t.name) + ": expected a contiguous float32 CPU vector of " + std::to_string(n) +
                         " elements, got " + ne::shape_str(t));
  return static_cast<const float*>(t.data);
}

}  // namespace

void bind_arith(py::module_& m) {
  m.def("int8_kernels", &ne::int8_kernels,
        "The W8A8 int8 GEMM kernels this CPU has, best first: 'amx', 'avx512vnni', 'avxvnni', 'isa' "
        "(the AVX2 vpmaddubsw / scalar kernel of the active ISA).");
  m.def("int8_decode_rows", &ne::int8_decode_rows,
        "{format: most rows}: the packed weight formats whose decode rows matmul_precision='medium' multiplies "
        "with int8 activations under the active ISA ('int4': AVX-512 VNNI or AVX2; 'int8-weight': AVX-512 VNNI), "
        "and up to how many rows of x.");
  m.def("int8_kernel", &ne::int8_kernel, "The W8A8 kernel in use now (capped by force_cpu_isa).");
  m.def("force_int8_kernel", &ne::force_int8_kernel, py::arg("name"),
        "Use one of int8_kernels() for W8A8 GEMMs ('auto': the best again); for tests and benchmarks.");
  m.def(
      "quant_linear",
      [](py::handle x, int fmt, py::handle data, py::handle scale, py::handle zero, int64_t group, int64_t N,
         int64_t K, py::handle bias, py::handle out, bool accumulate, bool bf16_products, float zero_point,
         py::handle sub, py::handle sub_zero, int64_t super) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vd = view_of(data, "qweight.data", b), vs = view_of(scale, "qweight.scale", b),
                   vo = view_of(out, "out", b);
        Opt vz = opt_view(zero, "qweight.zero", b), vb = opt_view(bias, "bias", b);
        if (fmt < 0 || fmt > 3) throw ne::ValueError("format: expected 0..3, got " + std::to_string(fmt));
        const int64_t M = vx.ndim == 2 ? vx.shape[0] : -1;
        const int64_t ldx = matrix(vx, ne::DType::F32, M, K), ldy = matrix(vo, ne::DType::F32, M, N);
        ne::QWeight w;
        w.format = static_cast<ne::QFormat>(fmt);
        w.N = N;
        w.K = K;
        w.group = group;
        const bool int4 = w.format == ne::QFormat::Int4;
        matrix(vd, (w.format == ne::QFormat::FP8 || int4) ? ne::DType::U8 : ne::DType::I8, N, int4 ? K / 2 : K);
        if (!vs.is_contiguous() || vs.dtype != ne::DType::F32 || vs.device.type != ne::DeviceType::CPU)
          throw ne::ShapeError("qweight.scale: expected a contiguous float32 CPU tensor");
        const Opt vu = opt_view(sub, "qweight.sub", b), vuz = opt_view(sub_zero, "qweight.sub_zero", b);
        if (vu.ptr() || vuz.ptr()) {  // two-level scales: a scale (and offset) per super-block, int8 per group
          if (!vu.ptr()) throw ne::ValueError("qweight.sub_zero: two-level offsets need the sub-scales (sub) too");
          if (!(int4 || (w.format == ne::QFormat::Int8Weight && group > 0)))
            throw ne::ValueError("qweight.sub: two-level scales are for int4 and grouped int8-weight");
          if (super < 1 || K % group || (K / group) % super)
            throw ne::ShapeError("super: " + std::to_string(super) + " groups a super-block do not divide a row's " +
                                 std::to_string(K / group) + " groups");
          for (const Opt* o : {&vu, &vuz})
            if (o->ptr() && matrix(*o->ptr(), ne::DType::I8, N, K / group) != K / group)
              throw ne::ShapeError(std::string(o->ptr()->name) + ": expected a contiguous array");
          w.sub = static_cast<const int8_t*>(vu.ptr()->data);
          w.sub_zero = vuz.ptr() ? static_cast<const int8_t*>(vuz.ptr()->data) : nullptr;
          w.super = super;
        }
        const int64_t want_scales = w.sub ? ne::qweight_super_count(N, K, group, super)
                                          : ne::qweight_scale_count(w.format, N, K, group);
        if (vs.numel() != want_scales)
          throw ne::ShapeError("qweight.scale: expected " + std::to_string(want_scales) + " scales, got " +
                               std::to_string(vs.numel()));
        if (vz.ptr()) {
          if (!int4 && !(w.format == ne::QFormat::Int8Weight && group > 0))
            throw ne::ValueError("qweight.zero: only int4 and grouped int8-weight take zero points");
          if (!vz.ptr()->is_contiguous() || vz.ptr()->dtype != ne::DType::F32 || vz.ptr()->numel() != want_scales)
            throw ne::ShapeError("qweight.zero: expected a contiguous float32 tensor of " + std::to_string(want_scales) +
                                 " zero points");
        }
        w.data = vd.data;
        w.scale = static_cast<const float*>(vs.data);
        w.zero = vz.ptr() ? static_cast<const float*>(vz.ptr()->data) : nullptr;
        if (!std::isfinite(zero_point)) throw ne::ValueError("zero_point: expected a finite value");
        w.zero_point = zero_point;
        const float* pb = vec(vb, N);
        py::gil_scoped_release nogil;
        ne::quant_gemm_f32(M, static_cast<const float*>(vx.data), ldx, w, pb, static_cast<float*>(vo.data), ldy,
                          accumulate, nullptr, bf16_products);
      },
      py::arg("x"), py::arg("format"), py::arg("data"), py::arg("scale"), py::arg("zero"), py::arg("group"),
      py::arg("N"), py::arg("K"), py::arg("bias"), py::arg("out"), py::arg("accumulate") = false,
      py::arg("bf16_products") = false, py::arg("zero_point") = 7.5f, py::arg("sub") = py::none(),
      py::arg("sub_zero") = py::none(), py::arg("super") = 0,
      "out[M, N] (+)= x[M, K] @ dequant(W)^T (+ bias), the format's own activation handling (quant_gemm.h); "
      "zero_point: int4 without zero points, every group's (QWeight::zero_point); sub / sub_zero (int8 [N, K / group]) "
      "and super: two-level scales (scale, zero: [N, K / (group * super)]).");
  m.def(
      "quantize_weight_rows",
      [](py::handle w, int fmt, int64_t group, bool symmetric, py::handle data, py::handle scale, py::handle zero) {
        Borrowed b;
        TensorView vw = view_of(w, "w", b), vd = view_of(data, "data", b), vs = view_of(scale, "scale", b);
        Opt vz = opt_view(zero, "zero", b);
        if (fmt != 0 && fmt != 1 && fmt != 2) throw ne::ValueError("format: expected 0 (int8), 1 (int8-weight) or 2 (int4)");
        const auto f = static_cast<ne::QFormat>(fmt);
        const bool int4 = f == ne::QFormat::Int4;
        if (vw.ndim != 2) throw ne::ShapeError("w: expected a 2-D weight");
        const int64_t N = vw.shape[0], K = vw.shape[1];
        const int64_t ldw = matrix(vw, vw.dtype, N, K);
        matrix(vd, int4 ? ne::DType::U8 : ne::DType::I8, N, int4 ? K / 2 : K);
        const int64_t ns = int4 || group > 0 ? N * (K / std::max<int64_t>(1, group)) : N;
        auto check_vec = [&](const TensorView& v, const char* name) {
          if (!v.is_contiguous() || v.dtype != ne::DType::F32 || v.device.type != ne::DeviceType::CPU || v.numel() != ns)
            throw ne::ShapeError(std::string(name) + ": expected a contiguous float32 CPU tensor of " + std::to_string(ns) +
                                 " elements");
        };
        check_vec(vs, "scale");
        if (vz.ptr()) check_vec(*vz.ptr(), "zero");
        if (vw.device.type != ne::DeviceType::CPU) throw ne::DeviceError("w: expected a CPU tensor");
        py::gil_scoped_release nogil;
        return ne::quantize_weight_rows(vw.data, vw.dtype, ldw, N, K, f, static_cast<int>(group), symmetric, vd.data,
                                        static_cast<float*>(vs.data),
                                        vz.ptr() ? static_cast<float*>(vz.ptr()->data) : nullptr);
      },
      py::arg("w"), py::arg("format"), py::arg("group"), py::arg("symmetric"), py::arg("data"), py::arg("scale"),
      py::arg("zero"),
      "Quantize w [N, K] (row-major rows) into data / scale (/ zero) as quantize_weight does (int8, int8-weight, "
      "int4), in C++; returns False if w holds NaN or Inf.");
}
