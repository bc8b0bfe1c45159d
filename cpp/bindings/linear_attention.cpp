// Bindings of the linear-attention training kernels (part of the one module normengine._C; present in
// every build): CPU tensors run the CPU kernels (cpp/ops/linear_attention_entry.cpp; `stream` is
// ignored), CUDA tensors the CUDA kernels (cuda/linear_attention.cu, CUDA builds only). Argument
// order: kind, feature map, causal, normalize, out_norm, eps, q, k, v, decay, initial_state, o,
// final_state, stream (ops/linear_attention.h), then recurrent (CUDA only: False runs the chunked
// kernels of cuda/linear_attention_chunk.cu, True the token-serial ones; the CPU kernels are always
// chunked and ignore it).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/interop.h"
#include "ops/linear_attention.h"

namespace py = pybind11;
using namespace ne_bind;

namespace {

ne::LinAttnParams params(int kind, int fmap, bool causal, bool normalize, int out_norm, double eps, bool recurrent) {
  if (kind < 0 || kind > 2) throw ne::ValueError("kind: expected 0 (linear), 1 (mala) or 2 (norm)");
  if (fmap < 0 || fmap > 2) throw ne::ValueError("feature_map: expected 0 (elu1), 1 (relu) or 2 (identity)");
  if (out_norm < 0 || out_norm > 1) throw ne::ValueError("out_norm: expected 0 (rms) or 1 (layer)");
  ne::LinAttnParams p;
  p.kind = static_cast<ne::LinAttnKind>(kind);
  p.fmap = static_cast<ne::FeatureMap>(fmap);
  p.causal = causal;
  p.normalize = normalize;
  p.out_norm = out_norm;
  p.eps = static_cast<float>(eps);
  p.algorithm = recurrent ? ne::LinAttnAlgorithm::Recurrent : ne::LinAttnAlgorithm::Chunk;
  return p;
}

bool on_cuda(const TensorView& q) {
  if (q.device.type != ne::DeviceType::CUDA) return false;
#if defined(NE_WITH_CUDA)
  return true;
#else
  throw ne::DeviceError("q: this build of normengine has no CUDA kernels, got a tensor on " + q.device.str());
#endif
}

}  // namespace

void bind_linear_attention(py::module_& m) {
  m.def(
      "linear_attention_forward",
      [](int kind, int fmap, bool causal, bool normalize, int out_norm, double eps, py::handle q, py::handle k,
         py::handle v, py::handle decay, py::handle initial_state, py::handle o, py::handle final_state,
         std::uintptr_t stream, bool recurrent) {
        Borrowed b;
        TensorView vq = view_of(q, "q", b), vk = view_of(k, "k", b), vv = view_of(v, "v", b), vo = view_of(o, "o", b);
        Opt vd = opt_view(decay, "decay", b), vi = opt_view(initial_state, "initial_state", b),
            vf = opt_view(final_state, "final_state", b);
        const bool cuda = on_cuda(vq);
        const ne::LinAttnParams p = params(kind, fmap, causal, normalize, out_norm, eps, recurrent);
        py::gil_scoped_release nogil;
        if (!cuda) {
          ne::linear_attention_forward(p, vq, vk, vv, vd.ptr(), vi.ptr(), vo, vf.ptr());
          return;
        }
#if defined(NE_WITH_CUDA)
        ne::cuda::linear_attention_forward(p, vq, vk, vv, vd.ptr(), vi.ptr(), vo, vf.ptr(),
                                           reinterpret_cast<void*>(stream));
#endif
      },
      py::arg("kind"), py::arg("feature_map"), py::arg("causal"), py::arg("normalize"), py::arg("out_norm"),
      py::arg("eps"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("decay"), py::arg("initial_state"),
      py::arg("o"), py::arg("final_state"), py::arg("stream") = 0, py::arg("recurrent") = false);
  m.def(
      "linear_attention_backward",
      [](int kind, int fmap, bool causal, bool normalize, int out_norm, double eps, py::handle q, py::handle k,
         py::handle v, py::handle decay, py::handle initial_state, py::handle grad_o, py::handle grad_final_state,
         py::handle grad_q, py::handle grad_k, py::handle grad_v, py::handle grad_initial_state,
         std::uintptr_t stream, bool recurrent) {
        Borrowed b;
        TensorView vq = view_of(q, "q", b), vk = view_of(k, "k", b), vv = view_of(v, "v", b),
                   vgo = view_of(grad_o, "grad_o", b), vgq = view_of(grad_q, "grad_q", b),
                   vgk = view_of(grad_k, "grad_k", b), vgv = view_of(grad_v, "grad_v", b);
        Opt vd = opt_view(decay, "decay", b), vi = opt_view(initial_state, "initial_state", b),
            vgf = opt_view(grad_final_state, "grad_final_state", b),
            vgi = opt_view(grad_initial_state, "grad_initial_state", b);
        const bool cuda = on_cuda(vq);
        const ne::LinAttnParams p = params(kind, fmap, causal, normalize, out_norm, eps, recurrent);
        py::gil_scoped_release nogil;
        if (!cuda) {
          ne::linear_attention_backward(p, vq, vk, vv, vd.ptr(), vi.ptr(), vgo, vgf.ptr(), vgq, vgk, vgv, vgi.ptr());
          return;
        }
#if defined(NE_WITH_CUDA)
        ne::cuda::linear_attention_backward(p, vq, vk, vv, vd.ptr(), vi.ptr(), vgo, vgf.ptr(), vgq, vgk, vgv, vgi.ptr(),
                                            reinterpret_cast<void*>(stream));
#endif
      },
      py::arg("kind"), py::arg("feature_map"), py::arg("causal"), py::arg("normalize"), py::arg("out_norm"),
      py::arg("eps"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("decay"), py::arg("initial_state"),
      py::arg("grad_o"), py::arg("grad_final_state"), py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"),
      py::arg("grad_initial_state"), py::arg("stream") = 0, py::arg("recurrent") = false);
}
