// Host harness that RUNS cuda/runner.cu (ne::CudaRunner: embedding, norms, q/k/v/o and MLP linears,
// RoPE + KV cache, attention, head) on the CPU through the SIMT emulator of cuda_emu.h: the very
// kernels, launchers and host code of the CUDA build, compiled by g++. The build
// (tests/test_runner_cuda_emu.py) rewrites the launches `k<<<cfg>>>(args)` of cuda/runner.cu and
// cuda/norm.cu into `k << ::ne_emu::launch_config(cfg)(args)`; the rewritten runner.cu is included
// here (NE_EMU_RUNNER_SOURCE: its kernels, in an anonymous namespace, can then be named in the launch
// log), the rewritten norm.cu and cpp/core/tensor.cpp are separate translation units of the library.
// The public ne::norm_forward that the runner calls (cpp/ops/norm.cpp, which also holds the CPU
// kernels) is replaced below by its CUDA branch: views -> NormFwdArgs -> ne::cuda::norm_forward.
// Packed (quantized) weights run ne::cuda::quant_linear: the rewritten cuda/quant_gemm.cu is one more
// translation unit of the library (built with -DNE_CUDA_EMU, its tensor-core PTX on the emulator's).
// "Device" pointers are host pointers: the weights are the CPU model's own tensors.
//
// extern "C" entry points (ctypes): each returns 0 (or a handle), or -1 / null with the message in
// ne_remu_error().
// Standard headers first: some (<random>, which normengine/model.h includes) spell
// __attribute__((__noinline__)), which cuda_emu.h's __noinline__ macro would break.
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>

#include "cuda_emu.h"

#include NE_EMU_RUNNER_SOURCE
#include "harness.h"

#include "ops/norm.h"

namespace ne {
// The CUDA branch of cpp/ops/norm.cpp's norm_forward (the runner passes contiguous float32 rows,
// weight and bias [d]; no residual, mean or rstd).
void norm_forward(NormKind kind, const TensorView& x, const TensorView* residual, const TensorView* weight,
                  const TensorView* bias, double eps, const TensorView& y, const TensorView* residual_out,
                  const TensorView* mean, const TensorView* rstd, const Ctx& ctx) {
  if (x.device.type != DeviceType::CUDA || y.device.type != DeviceType::CUDA)
    throw Error("runner_emu norm_forward: expected CUDA views");
  NormFwdArgs a{};
  a.kind = kind;
  a.x = as_rows(x);
  a.y = as_rows(y);
  if (residual) {
    a.res = as_rows(*residual);
    a.res_out = as_rows(*residual_out);
  }
  a.w = weight ? weight->data : nullptr;
  a.b = bias ? bias->data : nullptr;
  a.mean = mean ? mean->data : nullptr;
  a.rstd = rstd ? rstd->data : nullptr;
  a.eps = eps;
  if (a.x.rows == 0) return;
  cuda::norm_forward(a, ctx.cuda_stream);
}
}  // namespace ne

// runner_ops_emu.cpp: the kernels of ne::cuda::linear_attention_rows and ne::cuda::lmul_linear (internal
// to that translation unit)
__attribute__((visibility("hidden"))) const void* ne_remu_lin_attn_rows_kernel();
__attribute__((visibility("hidden"))) const void* ne_remu_lmul_bmm_kernel();
// runner_ops_emu.cpp: cuda/gemm.cu's kernels (the dense projections), each handed to reg with its name
__attribute__((visibility("hidden"))) void ne_remu_gemm_names(void (*reg)(const void*, const char*));
__attribute__((visibility("hidden"))) void ne_remu_chunk_names(void (*reg)(const void*, const char*));

namespace {

using ne_harness::guarded;
using ne_harness::name;


// ---------------------------------------------------------------------------- kernel names

void init_names_local() {
  using namespace ne::cuda;
  ne_remu_gemm_names([](const void* k, const char* s) { name(static_cast<const char*>(k), s); });
  ne_remu_chunk_names([](const void* k, const char* s) { name(static_cast<const char*>(k), s); });
  name(embed_kernel, "embed");
  name(rope_cache_kernel<float>, "rope_cache");
  name(rope_cache_kernel<__nv_bfloat16>, "rope_cache<bf16>");
  name(attention_kernel<1, float>, "attention<1>");
  name(attention_kernel<2, float>, "attention<2>");
  name(attention_kernel<4, float>, "attention<4>");
  name(attention_kernel<8, float>, "attention<8>");
  name(attention_kernel<1, __nv_bfloat16>, "attention<1,bf16>");
  name(attention_kernel<2, __nv_bfloat16>, "attention<2,bf16>");
  name(attention_kernel<4, __nv_bfloat16>, "attention<4,bf16>");
  name(attention_kernel<8, __nv_bfloat16>, "attention<8,bf16>");
  name(rope_cache_kernel<int8_t>, "rope_cache<int8>");
  name(attention_kernel<1, int8_t>, "attention<1,int8>");
  name(attention_kernel<2, int8_t>, "attention<2,int8>");
  name(attention_kernel<4, int8_t>, "attention<4,int8>");
  name(attention_kernel<8, int8_t>, "attention<8,int8>");
  name(activation_kernel, "activation");
  name(gather_rows_kernel, "gather_rows");
  name(moe_combine_kernel, "moe_combine");
  name(lmul_attention_kernel, "lmul_attention");
  name(static_cast<const char*>(ne_remu_lin_attn_rows_kernel()), "lin_attn_rows");
  name(static_cast<const char*>(ne_remu_lmul_bmm_kernel()), "lmul_bmm");
}

ne::DType dtype_of(int code) { return static_cast<ne::DType>(code); }  // ne::DType values

}  // namespace

NE_HARNESS_NAMES(init_names_local)

extern "C" {

const char* ne_remu_error() { return ne_harness::error(); }

// ints: vocab, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, max_seq_len, norm, activation,
// gated_mlp, learned_pos, qkv_bias, o_bias, mlp_bias, head_bias, kv_bf16, linear_feature_map,
// linear_normalize, norm_attention_norm, lmul_scope, lmul_bits, bf16_products, qk_norm, post_norms, rope_dim,
// parallel_residual, n_experts, n_experts_used, moe_d_ff, shared_d_ff, moe_norm_topk, kv_int8 (33);
// dbl: norm_eps, rope_theta, linear_eps, rope_attn_factor, emb_scale, attn_scale, rope_attn_factor_local,
// attn_softcap, final_softcap (9);
// attention: the n_layers attention types (AttnType values), or null (every layer softmax); inv_freq,
// inv_local: n_inv RoPE frequencies (spec.rope_inv_freq, rope_inv_freq_local), or null (plain / none);
// window: the n_layers sliding windows (spec.window), or null (none).
void* ne_remu_create(const int* ints, const double* dbl, const int* attention, const float* inv_freq,
                     const float* inv_local, int n_inv, const int* window, int slots, int ctx, const int* moe_layers) {
  ne::CudaRunner* r = nullptr;
  guarded([&] {
    ne::ModelSpec s;
    s.vocab = ints[0];
    s.d_model = ints[1];
    s.n_layers = ints[2];
    s.n_heads = ints[3];
    s.n_kv_heads = ints[4];
    s.head_dim = ints[5];
    s.d_ff = ints[6];
    s.max_seq_len = ints[7];
    s.norm = ints[8];
    s.activation = ints[9];
    s.gated_mlp = ints[10] != 0;
    s.learned_pos = ints[11] != 0;
    s.qkv_bias = ints[12] != 0;
    s.o_bias = ints[13] != 0;
    s.mlp_bias = ints[14] != 0;
    s.head_bias = ints[15] != 0;
    s.kv_bf16 = ints[16] != 0;
    s.linear_feature_map = ints[17];
    s.linear_normalize = ints[18] != 0;
    s.norm_attention_norm = ints[19];
    s.lmul_scope = ints[20];
    s.lmul_bits = ints[21];
    s.bf16_products = ints[22] != 0;
    s.qk_norm = ints[23] != 0;
    s.post_norms = ints[24] != 0;
    s.rope_dim = ints[25];
    s.parallel_residual = ints[26] != 0;
    s.n_experts = ints[27];
    s.n_experts_used = ints[28];
    s.moe_d_ff = ints[29];
    s.shared_d_ff = ints[30];
    s.moe_norm_topk = ints[31] != 0;
    s.kv_int8 = ints[32] != 0;
    s.norm_eps = dbl[0];
    s.rope_theta = dbl[1];
    s.linear_eps = dbl[2];
    s.rope_attn_factor = dbl[3];
    s.emb_scale = dbl[4];
    s.attn_scale = dbl[5];
    s.rope_attn_factor_local = dbl[6];
    s.attn_softcap = dbl[7];
    s.final_softcap = dbl[8];
    if (attention) s.attention.assign(attention, attention + s.n_layers);
    if (inv_freq) s.rope_inv_freq.assign(inv_freq, inv_freq + n_inv);
    if (inv_local) s.rope_inv_freq_local.assign(inv_local, inv_local + n_inv);
    if (window) s.window.assign(window, window + s.n_layers);
    if (moe_layers) s.moe_layers.assign(moe_layers, moe_layers + s.n_layers);
    r = new ne::CudaRunner(s, slots, ctx, -1);
  });
  return r;
}

void ne_remu_destroy(void* h) {
  std::lock_guard<std::mutex> lock(ne_harness::mu);
  delete static_cast<ne::CudaRunner*>(h);
}

// A weight on "cuda:0" (host memory): dtype an ne::DType value, shape / strides in elements.
int ne_remu_set_tensor(void* h, const char* name_, void* data, int dtype, int ndim, const int64_t* shape,
                       const int64_t* strides) {
  return guarded([&] {
    ne::TensorView t;
    t.data = data;
    t.dtype = dtype_of(dtype);
    t.device = ne::Device{ne::DeviceType::CUDA, 0};
    t.ndim = ndim;
    for (int i = 0; i < ndim; ++i) {
      t.shape[i] = shape[i];
      t.strides[i] = strides[i];
    }
    t.name = name_;
    static_cast<ne::CudaRunner*>(h)->set_tensor(name_, t);
  });
}

// A packed weight on "cuda:0": format an ne::QFormat value; data [N, K] int8 / [N, K/2] uint8 (int4) /
// [N, K] uint8 (fp8), scale and zero float32 (zero null: symmetric) in the shapes QWeight documents.
int ne_remu_set_quant_tensor(void* h, const char* name_, int format, void* data, const int64_t* data_shape,
                             void* scale, const int64_t* scale_shape, int scale_ndim, void* zero, int64_t group) {
  return guarded([&] {
    auto view = [](void* p, ne::DType dt, const int64_t* shape, int ndim, const char* nm) {
      ne::TensorView t;
      t.data = p;
      t.dtype = dt;
      t.device = ne::Device{ne::DeviceType::CUDA, 0};
      t.ndim = ndim;
      int64_t st = 1;
      for (int i = ndim - 1; i >= 0; --i) {
        t.shape[i] = shape[i];
        t.strides[i] = st;
        st *= shape[i];
      }
      t.name = nm;
      return t;
    };
    const ne::DType ddt = format <= 1 ? ne::DType::I8 : ne::DType::U8;
    const ne::TensorView d = view(data, ddt, data_shape, 2, "qdata"), s = view(scale, ne::DType::F32, scale_shape,
                                                                                scale_ndim, "qscale");
    const ne::TensorView z = zero ? view(zero, ne::DType::F32, scale_shape, scale_ndim, "qzero") : ne::TensorView{};
    static_cast<ne::CudaRunner*>(h)->set_quant_tensor(name_, format, d, s, zero ? &z : nullptr, group);
  });
}

int ne_remu_finalize(void* h) {
  return guarded([&] { static_cast<ne::CudaRunner*>(h)->finalize(); });
}

int ne_remu_fused_norms(void* h) {
  int f = -1;
  if (guarded([&] { f = static_cast<ne::CudaRunner*>(h)->fused_norms() ? 1 : 0; })) return -1;
  return f;
}

// ne::cuda::dense_linear (cuda/gemm.cu): y[M, N] (+)= s_m ((x - c_m) W^T) (+ b); wdt an ne::DType value;
// shift / shift_lo / scale / bias may be null.
int ne_remu_dense_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, int wdt,
                         int64_t ldw, const float* bias, float* y, int64_t ldy, int accumulate, const float* shift,
                         const float* shift_lo, const float* scale) {
  return guarded([&] {
    ne::cuda::DenseLinearArgs a = ne::cuda::dense_args(M, N, K, x, ldx, w, dtype_of(wdt), ldw, bias, y, ldy);
    a.accumulate = accumulate != 0;
    a.norm.shift = shift;
    a.norm.shift_lo = shift_lo;
    a.norm.scale = scale;
    ne::cuda::dense_linear(a, nullptr);
  });
}

// ne::cuda::norm_linear_gemm (norm_linear's GEMM on CUDA tensors): kind an ne::NormKind value; rstd the
// rows' statistics (LayerNorm: rewritten by the pass that takes the mean as a pair).
int ne_remu_norm_linear_gemm(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, int wdt,
                             int64_t ldw, const float* bias, float* y, int64_t ldy, int kind, double eps, float* rstd) {
  return guarded([&] {
    ne::cuda::norm_linear_gemm(ne::cuda::dense_args(M, N, K, x, ldx, w, dtype_of(wdt), ldw, bias, y, ldy),
                               static_cast<ne::NormKind>(kind), eps, rstd, nullptr);
  });
}

// ne::cuda::norm_stats for LayerNorm with the mean as a pair (NormFwdArgs::mean_lo), as the runner's fused
// norms take it: hi = x[0], lo = mean(x - x[0]), and rstd; float32 rows [M, K] at stride ldx.
int ne_remu_layer_stats_pair(int64_t M, int64_t K, const float* x, int64_t ldx, double eps, float* hi, float* lo,
                             float* rstd) {
  return guarded([&] {
    ne::NormFwdArgs a{};
    a.kind = ne::NormKind::LayerNorm;
    a.x = ne::RowMatrix{const_cast<float*>(x), ne::DType::F32, M, K, ldx};
    a.mean = hi;
    a.mean_lo = lo;
    a.rstd = rstd;
    a.eps = eps;
    ne::cuda::norm_stats(a, nullptr);
  });
}

int ne_remu_reset(void* h, int slot) {
  return guarded([&] { static_cast<ne::CudaRunner*>(h)->reset(slot); });
}

int ne_remu_length(void* h, int slot) {
  int n = -1;
  if (guarded([&] { n = static_cast<ne::CudaRunner*>(h)->length(slot); })) return -1;
  return n;
}

int ne_remu_forward(void* h, int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens,
                    float* logits, int all_logits) {
  return guarded([&] {
    static_cast<ne::CudaRunner*>(h)->forward(n_seqs, slots, tokens, lens, logits, all_logits != 0, nullptr);
  });
}

// sm_count of the emulated device (the tiled GEMM picks 128 x 128 tiles when they fill 2 x SMs) and
// the schedule of a block's fibers (0 round-robin, 1 reversed, 2 eager).
void ne_remu_configure(int sm_count, int order) {
  std::lock_guard<std::mutex> lock(ne_harness::mu);
  ne_emu::device().sm_count = sm_count;
  ne_emu::device().order = order;
}

// The launches of the last call, one line each: "name grid.x grid.y block.x" (runner.cu's kernels by
// name, norm.cu's as "norm").
int ne_remu_launches(char* buf, int cap) { return ne_harness::launches(buf, cap, "norm"); }

}  // extern "C"
