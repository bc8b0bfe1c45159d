// normengine._C: the only pybind11 code. Python tensors (torch, numpy: anything with __dlpack__)
// become non-owning TensorViews for the duration of a call; C++ errors become the classes of
// normengine.errors. Kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/interop.h"
#include "normengine/host_cache.h"
#include "normengine/ops.h"
#include "ops/gemm.h"

namespace py = pybind11;
using ne::TensorView;

namespace {

using namespace ne_bind;

ne::NormKind norm_kind(int k) {
  if (k < 0 || k > 2) throw ne::ValueError("kind: expected 0 (layer), 1 (rms) or 2 (crms)");
  return static_cast<ne::NormKind>(k);
}

ne::Ctx ctx_of(std::uintptr_t stream) {
  ne::Ctx c;
  c.cuda_stream = reinterpret_cast<void*>(stream);
  return c;
}

void raise_as(const char* cls, const char* fallback_builtin, const char* msg) {
  // normengine.errors holds the classes; fall back to builtins if it cannot be imported.
  try {
    py::object mod = py::module_::import("normengine.errors");
    PyErr_SetString(mod.attr(cls).ptr(), msg);
  } catch (py::error_already_set&) {
    PyErr_SetString(py::module_::import("builtins").attr(fallback_builtin).ptr(), msg);
  }
}

// One block of the host cache (normengine/host_cache.h), exposed with the buffer protocol so that
// torch.frombuffer / numpy wrap it without a copy; the block goes back to the cache when the last
// object viewing it (the tensor's storage holds this one) is gone.
struct HostBuffer {
  void* ptr = nullptr;
  std::size_t capacity = 0;
  std::size_t bytes = 0;
  explicit HostBuffer(std::size_t n) : bytes(n) { ptr = ne::host_cache_acquire(n, &capacity); }
  ~HostBuffer() { ne::host_cache_release(ptr, capacity); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
};

}  // namespace

void bind_runner(py::module_& m);  // bindings/runner.cpp
void bind_quant_cuda(py::module_& m);  // bindings/quant_cuda.cpp: CUDA quantized GEMMs
void bind_arith(py::module_& m);   // bindings/arith.cpp: quantized GEMM
void bind_linear_attention(py::module_& m);  // bindings/linear_attention.cpp: CUDA training kernels
void bind_lmul(py::module_& m);    // bindings/lmul.cpp: L-Mul elementwise / batched, CPU + CUDA

PYBIND11_MODULE(_C, m) {
  m.doc() = "normengine native kernels";
  bind_runner(m);
  bind_quant_cuda(m);
  bind_arith(m);
  bind_lmul(m);
  bind_linear_attention(m);

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ne::ShapeError& e) {
      raise_as("ShapeError", "ValueError", e.what());
    } catch (const ne::DTypeError& e) {
      raise_as("DTypeError", "TypeError", e.what());
    } catch (const ne::DeviceError& e) {
      raise_as("DeviceError", "ValueError", e.what());
    } catch (const ne::UnsupportedError& e) {
      raise_as("UnsupportedError", "ValueError", e.what());
    } catch (const ne::ValueError& e) {
      raise_as("ArgumentError", "ValueError", e.what());
    } catch (const ne::Error& e) {
      raise_as("NormEngineError", "RuntimeError", e.what());
    }
  });

  // ---------------------------------------------------------------- runtime
  m.def("cpu_isa", &ne::cpu_isa, "The CPU kernels in use: 'avx512bf16', 'avx512', 'avx2' or 'generic'.");
  m.def("force_cpu_isa", [](const std::string& s) { ne::force_cpu_isa(s.c_str()); }, py::arg("isa"),
        "Use a lower ISA's CPU kernels (testing the fallbacks).");
  m.def("num_threads", &ne::num_threads);
  m.def("set_num_threads", &ne::set_num_threads, py::arg("n"));
  m.def("built_with_cuda", &ne::built_with_cuda);

  // ---------------------------------------------------------------- host buffer cache
  py::class_<HostBuffer>(m, "HostBuffer", py::buffer_protocol(),
                         "nbytes writable bytes from the host cache (2 MiB aligned, contents unspecified); "
                         "back to the cache when garbage")
      .def(py::init([](long long n) {
             if (n < 0) throw ne::ValueError("nbytes: expected >= 0, got " + std::to_string(n));
             return new HostBuffer(static_cast<std::size_t>(n));
           }),
           py::arg("nbytes"))
      .def_property_readonly("address", [](const HostBuffer& b) { return reinterpret_cast<std::uintptr_t>(b.ptr); })
      .def_property_readonly("capacity", [](const HostBuffer& b) { return b.capacity; })
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.ptr, 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.bytes)}, {1});
      });
  m.def("host_cache_empty", [] {
    py::gil_scoped_release nogil;
    return ne::host_cache_empty();
  });
  m.def("host_cache_set_limit", [](long long n) {
    if (n < 0) throw ne::ValueError("limit: expected >= 0 bytes, got " + std::to_string(n));
    py::gil_scoped_release nogil;
    ne::host_cache_set_limit(static_cast<std::size_t>(n));
  }, py::arg("nbytes"));
  m.def("host_cache_limit", [] { return ne::host_cache_stats().limit_bytes; });
  m.def("host_cache_stats", [] {
    ne::HostCacheStats s = ne::host_cache_stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["in_use_bytes"] = s.in_use_bytes;
    d["limit_bytes"] = s.limit_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
  m.def("cuda_available", &ne::cuda_available);

  // ---------------------------------------------------------------- normalization
  m.def(
      "norm_forward",
      [](int kind, py::handle x, py::handle residual, py::handle weight, py::handle bias, double eps,
         py::handle y, py::handle residual_out, py::handle mean, py::handle rstd, std::uintptr_t stream) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vy = view_of(y, "out", b);
        Opt r = opt_view(residual, "residual", b), w = opt_view(weight, "weight", b),
            bi = opt_view(bias, "bias", b), ro = opt_view(residual_out, "residual_out", b),
            mu = opt_view(mean, "mean", b), rs = opt_view(rstd, "rstd", b);
        py::gil_scoped_release nogil;
        ne::norm_forward(norm_kind(kind), vx, r.ptr(), w.ptr(), bi.ptr(), eps, vy, ro.ptr(), mu.ptr(), rs.ptr(),
                         ctx_of(stream));
      },
      py::arg("kind"), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
      py::arg("y"), py::arg("residual_out"), py::arg("mean"), py::arg("rstd"), py::arg("stream") = 0);

  m.def(
      "norm_backward",
      [](int kind, py::handle dy, py::handle h, py::handle weight, py::handle rstd, py::handle dresidual,
         py::handle dx, py::handle dweight, py::handle dbias, std::uintptr_t stream) {
        Borrowed b;
        TensorView vdy = view_of(dy, "grad_output", b), vh = view_of(h, "x", b), vr = view_of(rstd, "rstd", b),
                   vdx = view_of(dx, "grad_input", b);
        Opt w = opt_view(weight, "weight", b), dr = opt_view(dresidual, "grad_residual", b),
            dw = opt_view(dweight, "grad_weight", b), db = opt_view(dbias, "grad_bias", b);
        py::gil_scoped_release nogil;
        ne::norm_backward(norm_kind(kind), vdy, vh, w.ptr(), vr, dr.ptr(), vdx, dw.ptr(), db.ptr(), ctx_of(stream));
      },
      py::arg("kind"), py::arg("dy"), py::arg("h"), py::arg("weight"), py::arg("rstd"), py::arg("dresidual"),
      py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("stream") = 0);

  m.def(
      "norm_stats",
      [](int kind, py::handle x, double eps, py::handle mean, py::handle rstd, std::uintptr_t stream) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vr = view_of(rstd, "rstd", b);
        Opt mu = opt_view(mean, "mean", b);
        py::gil_scoped_release nogil;
        ne::norm_stats(norm_kind(kind), vx, eps, mu.ptr(), vr, ctx_of(stream));
      },
      py::arg("kind"), py::arg("x"), py::arg("eps"), py::arg("mean"), py::arg("rstd"), py::arg("stream") = 0);

  m.def(
      "norm_linear",
      [](int kind, py::handle x, py::handle w, py::handle bias, double eps, py::handle col_sum, py::handle y,
         py::handle mean, py::handle rstd, std::uintptr_t stream, bool bf16_products) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vw = view_of(w, "weight", b), vy = view_of(y, "out", b),
                   vr = view_of(rstd, "rstd", b);
        Opt vb = opt_view(bias, "bias", b), vc = opt_view(col_sum, "col_sum", b), mu = opt_view(mean, "mean", b);
        py::gil_scoped_release nogil;
        ne::norm_linear(norm_kind(kind), vx, vw, vb.ptr(), eps, vc.ptr(), vy, mu.ptr(), vr, ctx_of(stream),
                        bf16_products);
      },
      py::arg("kind"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("col_sum"),
      py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("stream") = 0, py::arg("bf16_products") = false);

  // ---------------------------------------------------------------- per-channel
  m.def(
      "channel_moments",
      [](py::handle x, py::handle dy, py::handle out1, py::handle out2, std::uintptr_t stream) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), o1 = view_of(out1, "out1", b);
        Opt d = opt_view(dy, "grad_output", b), o2 = opt_view(out2, "out2", b);
        py::gil_scoped_release nogil;
        ne::channel_moments(vx, d.ptr(), o1, o2.ptr(), ctx_of(stream));
      },
      py::arg("x"), py::arg("dy"), py::arg("out1"), py::arg("out2"), py::arg("stream") = 0);

  m.def(
      "channel_affine",
      [](py::handle x, py::handle a, py::handle bias, py::handle y, std::uintptr_t stream) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), va = view_of(a, "scale", b), vy = view_of(y, "out", b);
        Opt vb = opt_view(bias, "shift", b);
        py::gil_scoped_release nogil;
        ne::channel_affine(vx, va, vb.ptr(), vy, ctx_of(stream));
      },
      py::arg("x"), py::arg("a"), py::arg("b"), py::arg("y"), py::arg("stream") = 0);

  m.def(
      "channel_lincomb",
      [](py::handle u, py::handle a, py::handle v, py::handle c, py::handle out, std::uintptr_t stream) {
        Borrowed b;
        TensorView vu = view_of(u, "u", b), va = view_of(a, "a", b), vv = view_of(v, "v", b),
                   vc = view_of(c, "b", b), vo = view_of(out, "out", b);
        py::gil_scoped_release nogil;
        ne::channel_lincomb(vu, va, vv, vc, vo, ctx_of(stream));
      },
      py::arg("u"), py::arg("a"), py::arg("v"), py::arg("b"), py::arg("out"), py::arg("stream") = 0);

  // ---------------------------------------------------------------- dense linear
  m.def(
      "linear",
      [](py::handle x, py::handle w, py::handle bias, py::handle y, std::uintptr_t stream, bool bf16_products) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vw = view_of(w, "weight", b), vy = view_of(y, "out", b);
        Opt vb = opt_view(bias, "bias", b);
        py::gil_scoped_release nogil;
        ne::linear(vx, vw, vb.ptr(), vy, ctx_of(stream), nullptr, bf16_products);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("stream") = 0,
      py::arg("bf16_products") = false);
  // ---------------------------------------------------------------- gated activations
  m.def(
      "gated_activation",
      [](int act, py::handle a, py::handle bb, py::handle y, std::uintptr_t stream) {
        Borrowed b;
        TensorView va = view_of(a, "gate", b), vy = view_of(y, "out", b);
        Opt vb = opt_view(bb, "up", b);
        py::gil_scoped_release nogil;
        ne::gated_activation(static_cast<ne::Activation>(act), va, vb.ptr(), vy, ctx_of(stream));
      },
      py::arg("act"), py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("stream") = 0);
  m.def(
      "gated_activation_backward",
      [](int act, py::handle dy, py::handle a, py::handle bb, py::handle da, py::handle db, std::uintptr_t stream) {
        Borrowed b;
        TensorView vdy = view_of(dy, "grad_output", b), va = view_of(a, "gate", b), vda = view_of(da, "grad_gate", b);
        Opt vb = opt_view(bb, "up", b), vdb = opt_view(db, "grad_up", b);
        py::gil_scoped_release nogil;
        ne::gated_activation_backward(static_cast<ne::Activation>(act), vdy, va, vb.ptr(), vda, vdb.ptr(),
                                      ctx_of(stream));
      },
      py::arg("act"), py::arg("grad_output"), py::arg("gate"), py::arg("up"), py::arg("grad_gate"),
      py::arg("grad_up"), py::arg("stream") = 0);

  // ---------------------------------------------------------------- rotary embedding
  m.def(
      "rotary_embedding",
      [](py::handle x, py::handle cos, py::handle sin, py::handle crow, py::handle y, bool backward,
         std::uintptr_t stream) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vc = view_of(cos, "cos", b), vs = view_of(sin, "sin", b),
                   vr = view_of(crow, "position_rows", b), vy = view_of(y, "out", b);
        py::gil_scoped_release nogil;
        ne::rotary_embedding(vx, vc, vs, vr, vy, backward, ctx_of(stream));
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("position_rows"), py::arg("out"), py::arg("backward"),
      py::arg("stream") = 0);

  // ---------------------------------------------------------------- cross-entropy
  m.def(
      "cross_entropy",
      [](py::handle logits, py::handle target, int64_t ignore_index, double label_smoothing, py::handle loss,
         py::handle lse, py::handle grad, py::handle row_scale, double scale, std::uintptr_t stream) {
        Borrowed b;
        TensorView vz = view_of(logits, "logits", b), vt = view_of(target, "target", b),
                   vl = view_of(loss, "loss", b);
        Opt ve = opt_view(lse, "lse", b), vg = opt_view(grad, "grad", b), vs = opt_view(row_scale, "row_scale", b);
        py::gil_scoped_release nogil;
        ne::cross_entropy(vz, vt, ignore_index, label_smoothing, vl, ve.ptr(), vg.ptr(), vs.ptr(), scale,
                          ctx_of(stream));
      },
      py::arg("logits"), py::arg("target"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("loss"),
      py::arg("lse"), py::arg("grad"), py::arg("row_scale"), py::arg("scale"), py::arg("stream") = 0);

  m.def("amx_bf16_available", &ne::amx_bf16_available,
        "Whether gemm_f32's bf16_products path has AMX-BF16 tiles here, within the active ISA");
  m.def("bf16_products_available", &ne::bf16_products_available,
        "Whether gemm_f32's bf16_products path runs in bf16 here (AMX-BF16 tiles, or AVX512-BF16 dot products), "
        "within the active ISA");

  // Testing hook: the runner's raw contract ne::gemm_f32 (with `accumulate`), on CPU tensors that
  // ne::linear has already validated as x [M, K], weight [N, K], bias [N] or None, out [M, N].
  m.def(
      "gemm_f32",
      [](py::handle x, py::handle w, py::handle bias, py::handle y, bool accumulate, bool bf16_products) {
        Borrowed b;
        TensorView vx = view_of(x, "x", b), vw = view_of(w, "weight", b), vy = view_of(y, "out", b);
        Opt vb = opt_view(bias, "bias", b);
        if (vx.ndim != 2 || vy.ndim != 2 || vx.device.type != ne::DeviceType::CPU)
          throw ne::ShapeError("gemm_f32: expected 2-D CPU tensors x and out");
        TensorView px = vx, py_ = vy;  // validate everything as linear() does, on zero rows
        px.shape[0] = py_.shape[0] = 0;
        ne::linear(px, vw, vb.ptr(), py_);
        ne::RowMatrix xr = ne::as_rows(vx), yr = ne::as_rows(vy);
        if (xr.rows != yr.rows) throw ne::ShapeError("out: expected as many rows as x");
        const int64_t N = vw.shape[0], K = vw.shape[1];
        py::gil_scoped_release nogil;
        ne::gemm_f32(xr.rows, N, K, static_cast<const float*>(xr.data), xr.ld, vw.data, vw.dtype,
                     N > 1 ? vw.strides[0] : K, vb.has ? static_cast<const float*>(vb.v.data) : nullptr,
                     static_cast<float*>(yr.data), yr.ld, accumulate, nullptr, bf16_products);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("accumulate"),
      py::arg("bf16_products") = false);
}
