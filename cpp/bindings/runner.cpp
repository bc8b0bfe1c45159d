// Bindings of the native transformer runner and the sampler (part of the one module normengine._C).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <random>
#include <string>

#include "bindings/interop.h"
#include "model/gguf_blocks.h"
#include "normengine/model.h"

namespace py = pybind11;
using namespace ne_bind;

namespace {

ne::ModelSpec spec_from(const py::dict& d) {
  ne::ModelSpec s;
  auto get = [&](const char* k) -> py::object {
    if (!d.contains(k)) throw ne::ValueError(std::string("spec: missing field '") + k + "'");
    return d[k];
  };
  s.vocab = get("vocab").cast<int>();
  s.d_model = get("d_model").cast<int>();
  s.n_layers = get("n_layers").cast<int>();
  s.n_heads = get("n_heads").cast<int>();
  s.n_kv_heads = get("n_kv_heads").cast<int>();
  s.head_dim = get("head_dim").cast<int>();
  s.d_ff = get("d_ff").cast<int>();
  s.max_seq_len = get("max_seq_len").cast<int>();
  s.norm = get("norm").cast<int>();
  s.norm_eps = get("norm_eps").cast<double>();
  s.activation = get("activation").cast<int>();
  s.gated_mlp = get("gated_mlp").cast<bool>();
  s.learned_pos = get("learned_pos").cast<bool>();
  s.rope_theta = get("rope_theta").cast<double>();
  s.qkv_bias = get("qkv_bias").cast<bool>();
  s.o_bias = get("o_bias").cast<bool>();
  s.mlp_bias = get("mlp_bias").cast<bool>();
  s.head_bias = get("head_bias").cast<bool>();
  // optional fields (defaults: every layer softmax, exact arithmetic)
  if (d.contains("attention")) s.attention = d["attention"].cast<std::vector<int>>();
  if (d.contains("linear_feature_map")) s.linear_feature_map = d["linear_feature_map"].cast<int>();
  if (d.contains("linear_normalize")) s.linear_normalize = d["linear_normalize"].cast<bool>();
  if (d.contains("norm_attention_norm")) s.norm_attention_norm = d["norm_attention_norm"].cast<int>();
  if (d.contains("linear_eps")) s.linear_eps = d["linear_eps"].cast<double>();
  if (d.contains("lmul_scope")) s.lmul_scope = d["lmul_scope"].cast<int>();
  if (d.contains("lmul_bits")) s.lmul_bits = d["lmul_bits"].cast<int>();
  if (d.contains("bf16_products")) s.bf16_products = d["bf16_products"].cast<bool>();
  if (d.contains("kv_bf16")) s.kv_bf16 = d["kv_bf16"].cast<bool>();
  if (d.contains("kv_int8")) s.kv_int8 = d["kv_int8"].cast<bool>();
  if (d.contains("rope_inv_freq")) s.rope_inv_freq = d["rope_inv_freq"].cast<std::vector<float>>();
  if (d.contains("rope_attn_factor")) s.rope_attn_factor = d["rope_attn_factor"].cast<double>();
  if (d.contains("qk_norm")) s.qk_norm = d["qk_norm"].cast<bool>();
  if (d.contains("window")) s.window = d["window"].cast<std::vector<int>>();
  if (d.contains("rope_inv_freq_local")) s.rope_inv_freq_local = d["rope_inv_freq_local"].cast<std::vector<float>>();
  if (d.contains("rope_attn_factor_local")) s.rope_attn_factor_local = d["rope_attn_factor_local"].cast<double>();
  if (d.contains("emb_scale")) s.emb_scale = d["emb_scale"].cast<double>();
  if (d.contains("attn_scale")) s.attn_scale = d["attn_scale"].cast<double>();
  if (d.contains("post_norms")) s.post_norms = d["post_norms"].cast<bool>();
  if (d.contains("rope_dim")) s.rope_dim = d["rope_dim"].cast<int>();
  if (d.contains("parallel_residual")) s.parallel_residual = d["parallel_residual"].cast<bool>();
  if (d.contains("attn_softcap")) s.attn_softcap = d["attn_softcap"].cast<double>();
  if (d.contains("final_softcap")) s.final_softcap = d["final_softcap"].cast<double>();
  if (d.contains("n_experts")) s.n_experts = d["n_experts"].cast<int>();
  if (d.contains("n_experts_used")) s.n_experts_used = d["n_experts_used"].cast<int>();
  if (d.contains("moe_d_ff")) s.moe_d_ff = d["moe_d_ff"].cast<int>();
  if (d.contains("shared_d_ff")) s.shared_d_ff = d["shared_d_ff"].cast<int>();
  if (d.contains("moe_norm_topk")) s.moe_norm_topk = d["moe_norm_topk"].cast<bool>();
  if (d.contains("moe_layers")) s.moe_layers = d["moe_layers"].cast<std::vector<int>>();
  if (s.norm < -1 || s.norm > 2) throw ne::ValueError("spec.norm: expected -1..2");
  if (s.activation < 0 || s.activation > 3) throw ne::ValueError("spec.activation: expected 0..3");
  return s;
}

// A contiguous CPU int32 vector argument.
const int32_t* i32(const TensorView& t, int64_t n) {
  if (t.device.type != ne::DeviceType::CPU) throw ne::DeviceError(std::string(t.name) + ": expected a CPU tensor");
  if (t.dtype != ne::DType::I32) throw ne::DTypeError(std::string(t.name) + ": expected int32, got " + ne::dtype_name(t.dtype));
  if (!t.is_contiguous() || t.ndim != 1 || (n >= 0 && t.shape[0] != n))
    throw ne::ShapeError(std::string(t.name) + ": expected a contiguous 1-D tensor" +
                         (n >= 0 ? " of " + std::to_string(n) + " elements" : std::string()) + ", got " +
                         ne::shape_str(t));
  return t.ptr<const int32_t>();
}

// A step's batch as the runners take it: n sequences (slots, lens: CPU int32 [n]) and their
// tokens back to back (CPU int32 [sum lens]); rows = the logits rows the step writes (every token
// with all_logits, else one per sequence).
struct StepArgs {
  int n = 0;
  const int32_t *slots = nullptr, *tokens = nullptr, *lens = nullptr;
  int64_t rows = 0;
};

StepArgs step_args(py::handle slots, py::handle tokens, py::handle lens, bool all_logits, Borrowed& b) {
  TensorView vs = view_of(slots, "slots", b), vt = view_of(tokens, "tokens", b), vl = view_of(lens, "lens", b);
  StepArgs a;
  a.n = static_cast<int>(vs.numel());
  a.slots = i32(vs, -1);
  a.lens = i32(vl, a.n);
  int64_t total = 0;
  for (int i = 0; i < a.n; ++i) total += a.lens[i];
  a.tokens = i32(vt, total);
  a.rows = all_logits ? total : a.n;
  return a;
}

struct Sampler {
  std::mt19937_64 rng;
  explicit Sampler(uint64_t seed) : rng(seed) {}
};

// Runner / CudaRunner::set_quant_tensor from Python: the packed parts as views named after the weight.
template <class R>
void set_quant_tensor(R& r, const std::string& name, int format, py::handle data, py::handle scale, py::handle zero,
                      int64_t group, py::handle sub, py::handle sub_zero, int64_t super) {
  Borrowed b;
  const std::string dn = name + ".qdata", sn = name + ".qscale", zn = name + ".qzero", un = name + ".qsub",
                    uzn = name + ".qsubzero";
  TensorView vd = view_of(data, dn.c_str(), b), vs = view_of(scale, sn.c_str(), b);
  const Opt vz = opt_view(zero, zn.c_str(), b), vu = opt_view(sub, un.c_str(), b),
            vuz = opt_view(sub_zero, uzn.c_str(), b);
  r.set_quant_tensor(name, format, vd, vs, vz.ptr(), group, ne::SubScales{vu.ptr(), vuz.ptr(), super});
}

// matrix() (interop.h) whose rows lie back to back, as the GGUF unpacker reads and writes them.
void expect_matrix(const TensorView& v, ne::DType dtype, int64_t rows, int64_t cols) {
  if (matrix(v, dtype, rows, cols) != cols)
    throw ne::ShapeError(std::string(v.name) + ": expected a contiguous array (rows back to back), got " +
                         ne::shape_str(v));
}

}  // namespace

void bind_runner(py::module_& m) {
  // GGUF blocks into int4 / int8-weight packing (cpp/model/gguf_blocks.h): blocks uint8 [R, row_bytes] (a
  // tensor's rows), rows int64 [n] or None, K elements a row; codes [n, K / 2] uint8 (int4) or [n, K] int8,
  // scale / zero float32 [n, K / group] (zero None where the type has no zero points in that format); with sub
  // (two-level, the K-quants): scale / zero [n, K / 256] (d, dmin), sub / sub_zero int8 [n, K / group].
  m.def(
      "gguf_unpack",
      [](const std::string& type, py::handle blocks, int64_t K, py::handle rows, bool int4, py::handle codes,
         py::handle scale, py::handle zero, py::handle sub, py::handle sub_zero) {
        if (!ne::gguf_unpacks(type, int4))
          throw ne::ValueError("type: " + type + " blocks do not unpack into " + (int4 ? "int4" : "int8-weight"));
        Borrowed b;
        const TensorView vb = view_of(blocks, "blocks", b), vc = view_of(codes, "codes", b),
                         vs = view_of(scale, "scale", b);
        const Opt vr = opt_view(rows, "rows", b), vz = opt_view(zero, "zero", b), vu = opt_view(sub, "sub", b),
                  vuz = opt_view(sub_zero, "sub_zero", b);
        const int64_t be = ne::gguf_block_elems(type), G = K / (K > 0 ? ne::gguf_group(type) : 1);
        if (K <= 0 || K % be) throw ne::ValueError("K: " + std::to_string(K) + " is not whole " + type + " blocks");
        if (vb.ndim != 2) throw ne::ShapeError("blocks: expected a 2-D uint8 array [rows, bytes a row]");
        expect_matrix(vb, ne::DType::U8, vb.shape[0], K / be * ne::gguf_block_bytes(type));
        int64_t n = vb.shape[0];
        if (vr.has) {
          if (vr.v.ndim != 1 || vr.v.dtype != ne::DType::I64 || !vr.v.is_contiguous() ||
              vr.v.device.type != ne::DeviceType::CPU)
            throw ne::ShapeError("rows: expected a contiguous 1-D int64 CPU array");
          n = vr.v.shape[0];
        }
        expect_matrix(vc, int4 ? ne::DType::U8 : ne::DType::I8, n, int4 ? K / 2 : K);
        // two-level (sub given): scale / zero one per block of 256, sub / sub_zero int8 per group
        const bool two = vu.has;
        if (two && !ne::gguf_two_level(type, int4))
          throw ne::ValueError("sub: " + type + " has no two-level scales in " + (int4 ? "int4" : "int8-weight"));
        const bool zeros = ne::gguf_has_zero(type, int4, two);
        const int64_t S = two ? K / be : G;
        expect_matrix(vs, ne::DType::F32, n, S);
        if (vz.has != zeros)
          throw ne::ValueError(std::string("zero: ") + (vz.has ? "expected None: " : "expected an array: ") + type +
                               (vz.has ? " has no" : " has") + " zero points in this format");
        if (vz.has) expect_matrix(vz.v, ne::DType::F32, n, S);
        if (vuz.has != (two && zeros))
          throw ne::ValueError(std::string("sub_zero: ") + (vuz.has ? "expected None" : "expected an array") +
                               " (two-level " + type + ")");
        if (two) expect_matrix(vu.v, ne::DType::I8, n, G);
        if (vuz.has) expect_matrix(vuz.v, ne::DType::I8, n, G);
        ne::GgufUnpackArgs a;
        a.blocks = vb.ptr<const uint8_t>();
        a.src_rows = vb.shape[0];
        a.row_bytes = vb.shape[1];
        a.K = K;
        a.rows = vr.has ? vr.v.ptr<const int64_t>() : nullptr;
        a.n_rows = n;
        a.int4 = int4;
        a.codes = vc.data;
        a.scale = vs.ptr<float>();
        a.zero = vz.has ? vz.v.ptr<float>() : nullptr;
        a.sub = two ? vu.v.ptr<int8_t>() : nullptr;
        a.sub_zero = vuz.has ? vuz.v.ptr<int8_t>() : nullptr;
        py::gil_scoped_release nogil;
        ne::gguf_unpack(type, a);
      },
      py::arg("type"), py::arg("blocks"), py::arg("K"), py::arg("rows"), py::arg("int4"), py::arg("codes"),
      py::arg("scale"), py::arg("zero"), py::arg("sub") = py::none(), py::arg("sub_zero") = py::none());
  m.def("gguf_two_level", &ne::gguf_two_level, py::arg("type"), py::arg("int4"),
        "Whether a GGUF type unpacks with two-level scales (sub / sub_zero: the K-quants; int4 only Q4_K)");
  m.def("gguf_group", &ne::gguf_group, py::arg("type"),
        "The elements one scale covers when a GGUF type unpacks (16 or 32; 0: not a type gguf_unpack reads)");
  m.def("gguf_has_zero", &ne::gguf_has_zero, py::arg("type"), py::arg("int4"), py::arg("two_level") = false,
        "Whether a GGUF type unpacks with zero points (two_level: two-level offsets, sub_zero) in that format");

  py::class_<ne::Runner>(m, "Runner", "Native transformer runner: weights, KV caches, prefill and decode.")
      .def(py::init([](py::dict spec, int slots, int ctx) { return new ne::Runner(spec_from(spec), slots, ctx); }),
           py::arg("spec"), py::arg("slots"), py::arg("ctx"))
      .def(
          "set_tensor",
          [](ne::Runner& r, const std::string& name, py::handle t, bool bf16) {
            Borrowed b;
            TensorView v = view_of(t, name.c_str(), b, bf16);
            r.set_tensor(name, v);
          },
          py::arg("name"), py::arg("tensor"), py::arg("bf16") = false,
          "Hand over a weight; the caller keeps it alive. bf16=True: a uint16 array (numpy) of bfloat16 bits.")
      .def("set_quant_tensor", &set_quant_tensor<ne::Runner>, py::arg("name"), py::arg("format"), py::arg("data"),
           py::arg("scale"), py::arg("zero"), py::arg("group"), py::arg("sub") = py::none(),
           py::arg("sub_zero") = py::none(), py::arg("super") = 0,
           "Hand over a quantized linear weight (QWeight layout; sub / sub_zero / super: two-level scales); the "
           "caller keeps the tensors alive.")
      .def("finalize", &ne::Runner::finalize)
      .def("fused_norms", &ne::Runner::fused_norms)
      .def("cache_bytes", &ne::Runner::cache_bytes,
           "Bytes of per-sequence memory: KV caches of softmax layers plus fixed-size linear-attention states.")
      .def(
          "forward",
          [](ne::Runner& r, py::handle slots, py::handle tokens, py::handle lens, py::handle logits, bool all_logits) {
            Borrowed b;
            const StepArgs a = step_args(slots, tokens, lens, all_logits, b);
            TensorView vo = view_of(logits, "logits", b);
            const int64_t rows = a.rows;
            if (vo.device.type != ne::DeviceType::CPU || vo.dtype != ne::DType::F32 || !vo.is_contiguous() ||
                vo.numel() != rows * r.spec().vocab)
              throw ne::ShapeError("logits: expected a contiguous float32 CPU tensor of " + std::to_string(rows) +
                                   " x " + std::to_string(r.spec().vocab) + " elements");
            py::gil_scoped_release nogil;
            r.forward(a.n, a.slots, a.tokens, a.lens, vo.ptr<float>(), all_logits);
          },
          py::arg("slots"), py::arg("tokens"), py::arg("lens"), py::arg("logits"), py::arg("all_logits"))
      .def("reset", &ne::Runner::reset, py::arg("slot"))
      .def("length", &ne::Runner::length, py::arg("slot"))
      .def("truncate", &ne::Runner::truncate, py::arg("slot"), py::arg("n"))
      .def_property_readonly("slots", &ne::Runner::slots)
      .def_property_readonly("ctx", &ne::Runner::ctx);

#if defined(NE_WITH_CUDA)
  py::class_<ne::CudaRunner>(m, "CudaRunner",
                             "Native transformer runner on a CUDA GPU: weights (CUDA tensors, zero-copy), KV caches in "
                             "device memory, prefill and decode enqueued on the caller's stream.")
      .def(py::init([](py::dict spec, int slots, int ctx, int device) {
             return new ne::CudaRunner(spec_from(spec), slots, ctx, device);
           }),
           py::arg("spec"), py::arg("slots"), py::arg("ctx"), py::arg("device") = -1)
      .def(
          "set_tensor",
          [](ne::CudaRunner& r, const std::string& name, py::handle t) {
            Borrowed b;
            TensorView v = view_of(t, name.c_str(), b);
            r.set_tensor(name, v);
          },
          py::arg("name"), py::arg("tensor"), "Hand over a weight (a CUDA tensor); the caller keeps it alive.")
      .def("set_quant_tensor", &set_quant_tensor<ne::CudaRunner>, py::arg("name"), py::arg("format"), py::arg("data"),
           py::arg("scale"), py::arg("zero"), py::arg("group"), py::arg("sub") = py::none(),
           py::arg("sub_zero") = py::none(), py::arg("super") = 0,
           "Hand over a quantized linear weight or embedding (QWeight layout, CUDA tensors); the caller keeps the "
           "tensors alive.")
      .def("finalize", &ne::CudaRunner::finalize)
      .def("fused_norms", &ne::CudaRunner::fused_norms)
      .def(
          "forward",
          [](ne::CudaRunner& r, py::handle slots, py::handle tokens, py::handle lens, py::handle logits, bool all_logits,
             std::uintptr_t stream) {
            Borrowed b;
            const StepArgs a = step_args(slots, tokens, lens, all_logits, b);
            TensorView vo = view_of(logits, "logits", b);
            const int64_t rows = a.rows;
            if (vo.device.type != ne::DeviceType::CUDA || vo.device.index != r.device())
              throw ne::DeviceError("logits: expected a CUDA tensor on cuda:" + std::to_string(r.device()) + ", got " +
                                    vo.device.str());
            if (vo.dtype != ne::DType::F32 || !vo.is_contiguous() || vo.numel() != rows * r.spec().vocab)
              throw ne::ShapeError("logits: expected a contiguous float32 CUDA tensor of " + std::to_string(rows) +
                                   " x " + std::to_string(r.spec().vocab) + " elements");
            py::gil_scoped_release nogil;
            r.forward(a.n, a.slots, a.tokens, a.lens, vo.ptr<float>(), all_logits, reinterpret_cast<void*>(stream));
          },
          py::arg("slots"), py::arg("tokens"), py::arg("lens"), py::arg("logits"), py::arg("all_logits"),
          py::arg("stream") = 0,
          "Enqueue one step on `stream` (a cudaStream_t as an int, e.g. torch.cuda.current_stream().cuda_stream; "
          "0: the default stream). slots / tokens / lens: CPU int32; logits: CUDA float32 [rows, vocab].")
      .def("reset", &ne::CudaRunner::reset, py::arg("slot"))
      .def("length", &ne::CudaRunner::length, py::arg("slot"))
      .def("truncate", &ne::CudaRunner::truncate, py::arg("slot"), py::arg("n"))
      .def_property_readonly("slots", &ne::CudaRunner::slots)
      .def_property_readonly("ctx", &ne::CudaRunner::ctx)
      .def_property_readonly("device", &ne::CudaRunner::device);
#endif

  py::class_<Sampler>(m, "Sampler", "Next-token sampler with its own random generator.")
      .def(py::init<uint64_t>(), py::arg("seed"))
      .def(
          "sample",
          [](Sampler& s, py::handle logits, float temperature, int top_k, float top_p, float min_p) {
            Borrowed b;
            TensorView v = view_of(logits, "logits", b);
            if (v.device.type != ne::DeviceType::CPU || v.dtype != ne::DType::F32 || v.ndim != 1 || v.strides[0] != 1)
              throw ne::ShapeError("logits: expected a contiguous 1-D float32 CPU tensor");
            ne::SamplingParams p;
            p.temperature = temperature;
            p.top_k = top_k;
            p.top_p = top_p;
            p.min_p = min_p;
            return ne::sample_token(v.ptr<const float>(), static_cast<int>(v.shape[0]), p, s.rng);
          },
          py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p") = 0.f);
}
