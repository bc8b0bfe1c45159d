// The transformer runner. One forward call processes any mix of sequences (a prefill of T tokens
// for one, a one-token decode step for many): their tokens are stacked into one activation matrix
// so every projection is a single GEMM over all of them, and only attention looks at which
// sequence (KV cache slot) and position a row belongs to.
//
// Per layer, with x the residual stream [T, d]:
//   xn = norm(x)                                   (attn_norm; LayerNorm / RMSNorm / CRMSNorm)
//   q, k, v = xn Wq^T (+bq), xn Wk^T (+bk), xn Wv^T (+bv)
//   (Qwen3: q, k = per-head RMSNorm(q), (k));  RoPE(q, k) unless learned positions (inv_freq plain
//   or scaled: linear / llama3 / YaRN, computed by normengine/rope.py; YaRN scales cos and sin; Gemma 3's
//   sliding-window layers their own table)
//   K/V cache[slot][pos] = k, v;  attention over keys 0 .. pos (or, in a sliding-window layer, the last W,
//   its cache a ring of W + kPrefillChunk rows: position p in row p % rows)
//   x += attention(q, cache) Wo^T (+bo)            (the add is the GEMM's accumulate epilogue;
//                                                   Gemma 2 / 3: x += RMSNorm(attention Wo^T) g, and so for the MLP)
//   xn = norm(x)                                   (mlp_norm; parallel residual (GPT-NeoX): of the block's
//                                                   input x, the attention's output added with the MLP's)
//   x += act(xn Wg^T) * (xn Wu^T) Wd^T  (gated)  or  act(xn Wu^T + bu) Wd^T + bd
// then logits = norm(x) Wlm^T (+blm) for the rows asked for.
//
// Variants, chosen per model when it is loaded (normengine.load):
// - attention type per layer (spec.attention): softmax layers read and extend a KV cache; linear,
//   MALA and norm-attention layers (ops/linear_attention.h) carry one fixed-size state per sequence,
//   [n_heads, head_dim + 1, head_dim + 1] floats, updated in place (prefill: chunked, decode:
//   recurrent), so their memory never grows with the length. RoPE, when the model uses it, rotates q
//   and k before the feature map, as for softmax layers.
// - quantized linear weights (set_quant_tensor, ops/quant_gemm.h): each projection runs the
//   format's GEMM (int8 W8A8, int8 weights, int4 groups, fp8 blocks); an embedding held quantized
//   is dequantized one looked-up row at a time.
// - L-Mul arithmetic (spec.lmul_scope, ops/lmul.h): attention products only, or every matmul.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/parallel.h"
#include "model/weights.h"
#include "normengine/model.h"
#include "ops/attention.h"
#include "ops/gemm.h"
#include "ops/linear_attention.h"
#include "ops/lmul.h"
#include "ops/norm_linear.h"
#include "ops/quant_elem.h"
#include "ops/quant_gemm.h"

namespace ne {

namespace {

// Scratch of the mixture-of-experts layers (moe_mlp), grown to the largest call and reused: router logits
// [T, E], the routing (weights.h MoeRouting), an expert's gathered rows / gate / up / output, the shared
// expert's gate [T], the layer's output y [T, d].
struct MoeScratch {
  MoeRouting route;
  std::vector<float> logits, ex, eg, eu, ey, gate, y;
};

// A weight as the kernels read it: dense (data, dtype, ld) or quantized (quant, q).
struct W {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;
  bool quant = false;
  QWeight q;
  bool present() const { return data != nullptr; }
  const float* f32() const { return static_cast<const float*>(data); }
};

float elem_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return 0.f;
  }
}

// Row n of a weight as float32 (embedding lookups): dense rows widened, quantized rows dequantized
// exactly as the GEMMs read them.
void weight_row(const W& w, int64_t n, float* out) {
  if (!w.quant) {
    const char* r = static_cast<const char*>(w.data) + n * w.ld * static_cast<int64_t>(dtype_size(w.dtype));
    for (int64_t i = 0; i < w.cols; ++i) out[i] = elem_f32(r, w.dtype, i);
    return;
  }
  for (int64_t k = 0; k < w.q.K; ++k) out[k] = quant_elem(w.q, n, k);
}

// Picked per call, so force_cpu_isa() takes effect at once.
const AttentionTable& attn_kernels() { return *NE_PICK_ISA(attention_table); }

// How the dense projections multiply: lmul_bits > 0, every product an L-Mul (lmul_scope "all");
// bf16, products of bfloat16-rounded operands where AMX-BF16 can take them (matmul precision
// "medium", gemm_f32's bf16_products).
struct Arith {
  int lmul_bits = 0;
  bool bf16 = false;
};

// y[T, N] (+)= x[T, K] W^T (+ b) (with an optional norm epilogue), by the weight's kind: dense
// (gemm_f32), quantized (quant_gemm_f32: the format's own activation handling), or, when
// ar.lmul_bits > 0, every product an L-Mul (lmul_gemm_f32; float32 weights, no epilogue).
void linear(const W& w, const W& b, const float* x, int64_t T, float* y, bool accumulate, Arith ar = {},
            const GemmEpilogue* ep = nullptr) {
  const float* bias = b.present() ? b.f32() : nullptr;
  if (w.quant) {
    quant_gemm_f32(T, x, w.cols, w.q, bias, y, w.rows, accumulate, ep, ar.bf16);
  } else if (ar.lmul_bits > 0) {
    lmul_gemm_f32(T, w.rows, w.cols, x, w.cols, w.f32(), w.ld, bias, y, w.rows, accumulate, ar.lmul_bits);
  } else {
    gemm_f32(T, w.rows, w.cols, x, w.cols, w.data, w.dtype, w.ld, bias, y, w.rows, accumulate, ep, ar.bf16);
  }
}

}  // namespace


struct Runner::Layer {
  AttnType type = AttnType::Softmax;
  W attn_norm_w, attn_norm_b, q, k, v, o, qb, kb, vb, ob, decay, q_norm, k_norm, attn_post_norm, mlp_post_norm;
  W mlp_norm_w, mlp_norm_b, up, gate, down, upb, gateb, downb;
  MoeWeights<W> moe;  // a mixture-of-experts layer's (spec.n_experts, moe_layer)
  std::vector<float> kcache, vcache;  // softmax: [slots][rows][n_kv_heads * head_dim] (rows: ring, or ctx)
  int64_t ring = 0;   // a sliding-window layer's rows per slot when fewer than ctx (position p in row p % ring)
  std::vector<bf16> kcache16, vcache16;  // the same in bfloat16 (spec.kv_bf16), instead
  std::vector<int8_t> kcache8, vcache8;  // or in int8 (spec.kv_int8), with scales [slots][rows][n_kv_heads]
  std::vector<float> kscale8, vscale8;
  std::vector<float> state;           // linear family: [slots][n_heads][(head_dim + 1)^2]
  // Projections that read the same input and whose weights lie back to back in memory run as one
  // GEMM (one pass over the input, one longer stream of weights): qkv = [q; k; v] (rows dq + 2 dkv),
  // gate_up = [gate; up] (rows 2 d_ff). Present only when the weights (and biases) are adjacent.
  W qkv, qkvb, gate_up, gate_upb;
  std::vector<float> csum_qkv, csum_gate_up;
  std::vector<float> csum_q, csum_k, csum_v, csum_up, csum_gate;  // fused LayerNorm: W.sum(1)
};

struct Runner::Impl {
  // Norms with unit gains and zero biases (folded into the readers, normengine.convert): every
  // norm + linear then runs as norm_linear: row statistics, and the GEMMs read the raw stream and
  // apply them in their epilogue (LayerNorm: with the readers' column sums).
  bool fused = false;       // the blocks' norms run as statistics inside their readers' GEMMs
  bool fused_head = false;  // the final norm likewise (unit gain: folded); else an explicit pass
  std::vector<float> mean, rstd;
  std::vector<float> head_csum;
  std::vector<Layer> layers;
  W tok_emb, pos_emb, final_w, final_b, head, head_b;
  std::vector<int> len;  // tokens held per slot
  // RoPE: inv_freq per pair, and the cos / sin of each row of the current call (built per call from
  // the rows' positions, so nothing here grows with the context)
  std::vector<float> rope_inv, rope_cos, rope_sin;
  std::vector<float> rope_cos_local, rope_sin_local;  // the sliding layers' (spec.rope_inv_freq_local)
  std::vector<int32_t> rope_row;
  bool any_softmax = true;
  // activations, grown to the largest call seen and reused
  std::vector<float> x, xn, q, k, v, att, up, gate, sel, qkv, gu;
  MoeScratch moe;  // mixture-of-experts layers' buffers
  std::vector<int32_t> pos;
  std::vector<const float*> kptr, vptr;
  std::vector<const bf16*> kptr16, vptr16;
  std::vector<const int8_t*> kptr8, vptr8;
  std::vector<const float*> ksp8, vsp8;
};

Runner::Runner(const ModelSpec& s, int slots, int ctx) : spec_(s), n_slots_(slots), ctx_(ctx) {
  check_spec(s, slots, ctx);
  impl_ = std::make_unique<Impl>();
  impl_->layers.resize(s.n_layers);
  for (int i = 0; i < s.n_layers; ++i) {
    Layer& l = impl_->layers[i];
    l.type = attn_type(s, i);
    if (moe_layer(s, i)) l.moe.resize(s.n_experts);
    // A sliding-window layer keeps only the keys a query can still see, in a ring: a call appends at most
    // kPrefillChunk rows of one sequence, whose first query reads back W - 1 keys, so W + kPrefillChunk
    // rows never overwrite a key still to be read.
    const int w = attn_window(s, i);
    l.ring = w > 0 && w + kPrefillChunk < ctx ? w + kPrefillChunk : 0;
    const size_t cache = static_cast<size_t>(slots) * (l.ring ? l.ring : ctx) * s.n_kv_heads * s.head_dim;
    if (l.type == AttnType::Softmax && s.kv_bf16) {
      l.kcache16.assign(cache, bf16{0});
      l.vcache16.assign(cache, bf16{0});
    } else if (l.type == AttnType::Softmax && s.kv_int8) {
      l.kcache8.assign(cache, int8_t{0});
      l.vcache8.assign(cache, int8_t{0});
      l.kscale8.assign(cache / s.head_dim, 0.f);
      l.vscale8.assign(cache / s.head_dim, 0.f);
    } else if (l.type == AttnType::Softmax) {
      l.kcache.assign(cache, 0.f);
      l.vcache.assign(cache, 0.f);
    } else {
      l.state.assign(static_cast<size_t>(slots) * s.n_heads * (s.head_dim + 1) * (s.head_dim + 1), 0.f);
    }
  }
  impl_->len.assign(slots, 0);
  impl_->any_softmax = false;
  for (const auto& l : impl_->layers) impl_->any_softmax |= l.type == AttnType::Softmax;
  if (!s.learned_pos) impl_->rope_inv = rope_inv_freq(s);
}

Runner::~Runner() = default;

void Runner::set_tensor(const std::string& name, const TensorView& t) {
  const ModelSpec& s = spec_;
  if (t.device.type != DeviceType::CPU)
    throw DeviceError(name + ": the runner's weights must be on the CPU, got " + t.device.str());
  const WeightSlot<W> slot = weight_slot<W>(*impl_, s, name);
  if (!slot.w) throw ValueError(name + ": not a tensor of this model");
  set_dense_weight(slot, name, t);
}

void Runner::set_quant_tensor(const std::string& name, int format, const TensorView& data, const TensorView& scale,
                              const TensorView* zero, int64_t group, const SubScales& sub) {
  const WeightSlot<W> slot = weight_slot<W>(*impl_, spec_, name);
  QWeight q = quant_weight(slot, name, format, data, scale, zero, group, Device{DeviceType::CPU, 0}, sub);
  // int4 whose zero points are all one value (a GGUF Q4_0 weight's are 8): the kernels take that value instead of
  // reading the array (a sixth of what a decode step streams of the weight at groups of 32), the same sums
  if (q.format == QFormat::Int4 && q.zero && !q.sub) {
    const int64_t n = q.N * (q.K / q.group);
    const float z0 = q.zero[0];
    bool same = std::isfinite(z0);
    for (int64_t i = 1; same && i < n; ++i) same = q.zero[i] == z0;
    if (same) {
      q.zero = nullptr;
      q.zero_point = z0;
    }
  }
  set_quant_weight(slot, q);
}

void Runner::finalize() {
  const ModelSpec& s = spec_;
  check_weights_complete(*impl_, s);
  check_lmul_weights(*impl_, s);
  const bool has_norm = s.norm >= 0, ln = s.norm == 0;
  // Fused norms when every norm is the bare normalization (gains 1, biases 0).
  auto unit = [&](const W& w, const W& b) {
    for (int64_t i = 0; i < s.d_model; ++i)
      if (w.f32()[i] != 1.0f || (b.present() && b.f32()[i] != 0.0f)) return false;
    return true;
  };
  // Back-to-back weights (and biases) run as one GEMM: [q; k; v] and [gate; up].
  auto follows = [](const W& a, const W& b) {  // b starts where a ends, same layout
    if (!a.present() || !b.present() || a.quant || b.quant || a.dtype != b.dtype || a.ld != b.ld || a.cols != b.cols)
      return false;
    return static_cast<const char*>(a.data) + a.rows * a.ld * static_cast<int64_t>(dtype_size(a.dtype)) == b.data;
  };
  auto vec_follows = [](const W& a, const W& b) {
    return a.present() && b.present() && static_cast<const float*>(a.data) + a.cols == b.data;
  };
  auto join = [](const W& a, int64_t rows) {
    W w = a;
    w.rows = rows;
    w.cols = a.cols;
    return w;
  };
  auto join_vec = [](const W& a, int64_t n) {
    W w = a;
    w.cols = n;
    return w;
  };
  for (auto& L : impl_->layers) {
    L.qkv = L.qkvb = L.gate_up = L.gate_upb = W{};
    if (follows(L.q, L.k) && follows(L.k, L.v) &&
        (!L.qb.present() || (vec_follows(L.qb, L.kb) && vec_follows(L.kb, L.vb)))) {
      L.qkv = join(L.q, L.q.rows + L.k.rows + L.v.rows);
      if (L.qb.present()) L.qkvb = join_vec(L.qb, L.q.rows + L.k.rows + L.v.rows);
    }
    if (s.gated_mlp && follows(L.gate, L.up) &&
        (L.upb.present() == L.gateb.present()) && (!L.gateb.present() || vec_follows(L.gateb, L.upb))) {
      L.gate_up = join(L.gate, L.gate.rows + L.up.rows);
      if (L.gateb.present()) L.gate_upb = join_vec(L.gateb, L.gate.rows + L.up.rows);
    }
  }
  // L-Mul GEMMs have no norm epilogue: with lmul_scope all, norms run as their own pass. So do they
  // before W8A8 / fp8 weights: those formats quantize the layer's input, which is the normalized row
  // (quantizing the raw row and normalizing in the epilogue would round another vector; the CUDA
  // runner, which always normalizes first, then computes the same).
  // The head is fused on its own: a tied head keeps the final norm's affine (not folded into the
  // shared embedding) and normalizes in a separate O(d) pass per row.
  auto quant_act = [](const W& w) {
    return w.present() && w.quant && (w.q.format == QFormat::Int8 || w.q.format == QFormat::FP8);
  };
  bool fused = has_norm && s.lmul_scope != 2;
  impl_->fused_head = fused && unit(impl_->final_w, impl_->final_b) && !quant_act(impl_->head);
  for (int i = 0; fused && i < s.n_layers; ++i) {
    const Layer& L = impl_->layers[i];
    // (a mixture-of-experts layer normalizes its MLP's input on its own: its rows are gathered per expert)
    fused = unit(L.attn_norm_w, L.attn_norm_b) && !quant_act(L.q) && !quant_act(L.k) && !quant_act(L.v) &&
            (moe_layer(s, i) || (unit(L.mlp_norm_w, L.mlp_norm_b) && !quant_act(L.up) && !quant_act(L.gate)));
  }
  impl_->fused = fused;
  // fused LayerNorm: column sums c_n = sum_k W[n, k] of every reader
  auto csum = [&](const W& w, std::vector<float>& out) {
    if (!w.present()) return;
    std::vector<float> one(static_cast<size_t>(w.cols), 1.0f);
    out.assign(static_cast<size_t>(w.rows), 0.0f);
    linear(w, W{}, one.data(), 1, out.data(), false);  // quantized: sums of the weights as the GEMM sees them
  };
  if (fused && ln)
    for (auto& L : impl_->layers) {
      csum(L.q, L.csum_q); csum(L.k, L.csum_k); csum(L.v, L.csum_v);
      csum(L.up, L.csum_up); csum(L.gate, L.csum_gate);
      csum(L.qkv, L.csum_qkv); csum(L.gate_up, L.csum_gate_up);
    }
  if (impl_->fused_head && ln) csum(impl_->head, impl_->head_csum);
}

bool Runner::fused_norms() const { return impl_->fused; }

size_t Runner::cache_bytes() const {
  size_t n = 0;
  for (const auto& L : impl_->layers)
    n += (L.kcache.size() + L.vcache.size() + L.state.size() + L.kscale8.size() + L.vscale8.size()) * sizeof(float) +
         (L.kcache16.size() + L.vcache16.size()) * sizeof(bf16) + L.kcache8.size() + L.vcache8.size();
  return n;
}

void Runner::reset(int slot) {
  if (slot < 0 || slot >= n_slots_) throw ValueError("slot: out of range");
  impl_->len[slot] = 0;
  for (auto& L : impl_->layers)
    if (!L.state.empty()) {
      const size_t per = L.state.size() / n_slots_;
      std::fill(L.state.begin() + slot * per, L.state.begin() + (slot + 1) * per, 0.0f);
    }
}

int Runner::length(int slot) const {
  if (slot < 0 || slot >= n_slots_) throw ValueError("slot: out of range");
  return impl_->len[slot];
}

bool Runner::truncate(int slot, int n) {
  const int len = length(slot);
  check_truncate(len, n);
  for (int i = 0; i < spec_.n_layers && n < len; ++i) {
    const Layer& L = impl_->layers[i];
    if (!L.state.empty()) return false;  // a linear-family state has the dropped tokens summed in
    // the next query (position n) reads keys from n - W + 1 on; positions past n wrote their rows over
    // those of positions ring apart: intact while len - n <= ring - W
    if (L.ring && len - n > L.ring - attn_window(spec_, i)) return false;
  }
  impl_->len[slot] = n;
  return true;
}

namespace {

// y[T, N] = norm(x) W^T (+ b) with norm's statistics applied in the GEMM epilogue (norm_linear).
void linear_normed(const W& w, const W& b, const float* x, int64_t T, float* y, const float* rstd,
                   const float* mean, const std::vector<float>& csum, Arith ar) {
  GemmEpilogue ep;
  ep.row_scale = rstd;
  ep.row_shift = mean;
  ep.col_sum = mean ? csum.data() : nullptr;
  linear(w, b, x, T, y, false, ar, &ep);
}

// Per-row statistics of the stream (rstd, and mean for LayerNorm) for the fused path. Returns the rows
// the readers' GEMMs read: x itself, or (LayerNorm, some row's mean large next to its spread) a copy in
// `centred` with those rows centred and their mean set to 0 (center_far_rows, ops/norm_linear.h). The
// fused path passes the normalized-rows buffer xn, which only the unfused path writes otherwise.
const float* row_stats(const ModelSpec& s, const float* x, int64_t T, float* mean, float* rstd,
                       std::vector<float>& centred) {
  const int64_t d = s.d_model;
  TensorView xv = TensorView::make(const_cast<float*>(x), DType::F32, {T, d}, Device{}, "x");
  TensorView mv = TensorView::make(mean, DType::F32, {T}, Device{}, "mean");
  TensorView rv = TensorView::make(rstd, DType::F32, {T}, Device{}, "rstd");
  norm_stats(static_cast<NormKind>(s.norm), xv, s.norm_eps, s.norm == 0 ? &mv : nullptr, rv);
  return s.norm == 0 ? center_far_rows(x, T, d, d, mean, rstd, centred) : x;
}

void norm_rows(const ModelSpec& s, const W& w, const W& b, const float* x, float* y, int64_t T) {
  const int64_t d = s.d_model;
  if (s.norm < 0) {
    if (y != x) std::memcpy(y, x, sizeof(float) * T * d);
    return;
  }
  TensorView xv = TensorView::make(const_cast<float*>(x), DType::F32, {T, d}, Device{}, "x");
  TensorView yv = TensorView::make(y, DType::F32, {T, d}, Device{}, "y");
  TensorView wv = TensorView::make(const_cast<void*>(w.data), DType::F32, {d}, Device{}, "weight");
  TensorView bv = TensorView::make(const_cast<void*>(b.data), DType::F32, {d}, Device{}, "bias");
  norm_forward(static_cast<NormKind>(s.norm), xv, nullptr, &wv, b.present() ? &bv : nullptr, s.norm_eps, yv,
               nullptr, nullptr, nullptr);
}

// Sandwich norms: x[t] += y[t] / sqrt(mean(y[t]^2) + eps) * g, rows of d (the sum of squares in double).
void add_post_norm(const float* y, const float* g, int64_t T, int64_t d, double eps, float* x) {
  parallel_for(T, 1, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* yr = y + t * d;
      float* xr = x + t * d;
      double ss = 0.0;
      for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(yr[i]) * yr[i];
      const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
      for (int64_t i = 0; i < d; ++i) xr[i] += yr[i] * r * g[i];
    }
  });
}

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// y[T, d] = a mixture-of-experts MLP of the normalized rows xn[T, d] (ModelSpec.n_experts):
//   p = softmax(xn Wr^T) over the E experts; row t's top-k experts e with weights w_e (moe_route)
//   y[t] = sum_e w_e down_e(act(gate_e xn[t]) * up_e xn[t])   (+ sigmoid(xn[t] . w_sg) shared(xn[t]))
// The rows are grouped by expert, so each expert's three GEMMs run once, over its rows gathered; experts no
// row picked are never read (a decode step reads k experts' weights per token, not E). The outputs are added
// expert by expert in index order, then the shared expert's, as transformers adds them.
void moe_mlp(const ModelSpec& s, const MoeWeights<W>& mw, const float* xn, int64_t T, float* y, MoeScratch& sc,
             Arith ar, const AttentionTable& K) {
  const int E = s.n_experts;
  const int64_t d = s.d_model, fe = s.moe_d_ff, fs = s.shared_d_ff, fmax = std::max(fe, fs);
  const Act act = static_cast<Act>(s.activation);
  grow(sc.logits, T * E); grow(sc.ex, T * d); grow(sc.eg, T * fmax); grow(sc.eu, T * fmax); grow(sc.ey, T * d);
  linear(mw.router, W{}, xn, T, sc.logits.data(), false, ar);
  MoeRouting& r = sc.route;
  r.route(sc.logits.data(), T, s);
  std::fill(y, y + T * d, 0.f);
  float *ex = sc.ex.data(), *eg = sc.eg.data(), *eu = sc.eu.data(), *ey = sc.ey.data();
  for (int e = 0; e < E; ++e) {
    const int64_t n = r.start[e + 1] - r.start[e];
    if (n == 0) continue;
    const int32_t* rows = &r.rows[r.start[e]];
    const float* w = &r.weight[r.start[e]];
    for (int64_t j = 0; j < n; ++j) std::memcpy(ex + j * d, xn + rows[j] * d, sizeof(float) * d);
    linear(mw.egate[e], W{}, ex, n, eg, false, ar);
    linear(mw.eup[e], W{}, ex, n, eu, false, ar);
    K.activation({act, n, fe, eg, fe, eu, fe, eu, fe});
    linear(mw.edown[e], W{}, eu, n, ey, false, ar);
    for (int64_t j = 0; j < n; ++j) {  // (a row appears once per expert)
      float* yr = y + rows[j] * d;
      const float* er = ey + j * d;
      for (int64_t i = 0; i < d; ++i) yr[i] += w[j] * er[i];
    }
  }
  if (fs > 0) {  // the shared expert, on every row, gated by sigmoid(xn . w_sg)
    grow(sc.gate, T);
    linear(mw.sgate, W{}, xn, T, eg, false, ar);
    linear(mw.sup, W{}, xn, T, eu, false, ar);
    K.activation({act, T, fs, eg, fs, eu, fs, eu, fs});
    linear(mw.sdown, W{}, eu, T, ey, false, ar);
    linear(mw.shared_gate, W{}, xn, T, sc.gate.data(), false, ar);
    parallel_for(T, 1, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t) {
        const float g = 1.0f / (1.0f + std::exp(-sc.gate[t]));
        for (int64_t i = 0; i < d; ++i) y[t * d + i] += g * ey[t * d + i];
      }
    });
  }
}

}  // namespace

void Runner::forward(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
                     bool all_logits) {
  const ModelSpec& s = spec_;
  Impl& m = *impl_;
  if (n_seqs < 1) throw ValueError("n_seqs: expected at least one sequence");
  // ---- validate everything before touching any state
  int64_t T = 0;
  std::vector<int> seen(n_slots_, 0);
  for (int i = 0; i < n_seqs; ++i) {
    if (slots[i] < 0 || slots[i] >= n_slots_)
      throw ValueError("slot " + std::to_string(slots[i]) + ": out of range [0, " + std::to_string(n_slots_) + ")");
    if (seen[slots[i]]++) throw ValueError("slot " + std::to_string(slots[i]) + ": appears twice in one call");
    if (lens[i] < 1) throw ValueError("lens: every sequence needs at least one token");
    if (m.len[slots[i]] + lens[i] > ctx_)
      throw ValueError("sequence in slot " + std::to_string(slots[i]) + ": " + std::to_string(m.len[slots[i]]) +
                       " + " + std::to_string(lens[i]) + " tokens exceed the context of " + std::to_string(ctx_));
    T += lens[i];
  }
  for (int64_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= s.vocab)
      throw ValueError("token id " + std::to_string(tokens[t]) + " at index " + std::to_string(t) +
                       ": out of range [0, " + std::to_string(s.vocab) + ")");
  if (T <= kPrefillChunk) {
    run_rows(n_seqs, slots, tokens, lens, logits, all_logits, nullptr);
    return;
  }
  // Chunks of kPrefillChunk tokens, cut across sequences; a piece that ends its sequence gives that
  // sequence's logits row (all_logits: every piece gives its rows, in order).
  std::vector<int32_t> cs, cl;
  std::unique_ptr<bool[]> ends(new bool[static_cast<size_t>(n_seqs)]);
  int64_t t0 = 0;
  for (int i = 0, done = 0; i < n_seqs;) {
    cs.clear();
    cl.clear();
    const int first = i;  // the first sequence this chunk may end
    int64_t n = 0;
    while (i < n_seqs && n < kPrefillChunk) {
      const int take = static_cast<int>(std::min<int64_t>(lens[i] - done, kPrefillChunk - n));
      cs.push_back(slots[i]);
      cl.push_back(take);
      n += take;
      done += take;
      ends[cs.size() - 1] = done == lens[i];
      if (done == lens[i]) ++i, done = 0;
    }
    // the sequences ending here are consecutive: first (or first + 1 when the chunk's first piece
    // does not end its sequence) onwards
    const int64_t row0 = all_logits ? t0 : (ends[0] ? first : first + 1);
    run_rows(static_cast<int>(cs.size()), cs.data(), tokens + t0, cl.data(), logits + row0 * s.vocab, all_logits,
             ends.get());
    t0 += n;
  }
}

void Runner::run_rows(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
                      bool all_logits, const bool* ends) {
  const ModelSpec& s = spec_;
  Impl& m = *impl_;
  int64_t T = 0;
  for (int i = 0; i < n_seqs; ++i) T += lens[i];
  const int64_t d = s.d_model, dq = static_cast<int64_t>(s.n_heads) * s.head_dim,
                dkv = static_cast<int64_t>(s.n_kv_heads) * s.head_dim, f = s.d_ff;
  const int64_t dqkv = dq + 2 * dkv;
  grow(m.x, T * d); grow(m.xn, T * d); grow(m.q, T * dq); grow(m.k, T * dkv); grow(m.v, T * dkv);
  grow(m.att, T * dq); grow(m.up, T * f); grow(m.qkv, T * dqkv);
  if (s.gated_mlp) { grow(m.gate, T * f); grow(m.gu, T * 2 * f); }
  grow(m.pos, T); grow(m.kptr, T); grow(m.vptr, T); grow(m.kptr16, T); grow(m.vptr16, T);
  grow(m.kptr8, T); grow(m.vptr8, T); grow(m.ksp8, T); grow(m.vsp8, T);
  grow(m.mean, T); grow(m.rstd, T);

  // ---- token (and position) embeddings; each token's slot and position
  std::vector<int32_t> slot_of(T);
  {
    int64_t t = 0;
    for (int i = 0; i < n_seqs; ++i)
      for (int j = 0; j < lens[i]; ++j, ++t) {
        slot_of[t] = slots[i];
        m.pos[t] = m.len[slots[i]] + j;
      }
  }
  const W& E = m.tok_emb;
  for (int64_t t = 0; t < T; ++t) {
    float* xr = m.x.data() + t * d;
    weight_row(E, tokens[t], xr);
    if (s.emb_scale != 1.0) {  // Gemma: embeddings times sqrt(d)
      const float c = static_cast<float>(s.emb_scale);
      for (int64_t i = 0; i < d; ++i) xr[i] *= c;
    }
    if (s.learned_pos) {
      const char* pr =
          static_cast<const char*>(m.pos_emb.data) + static_cast<int64_t>(m.pos[t]) * m.pos_emb.ld * dtype_size(m.pos_emb.dtype);
      for (int64_t i = 0; i < d; ++i) xr[i] += elem_f32(pr, m.pos_emb.dtype, i);
    }
  }

  if (!s.learned_pos) {  // cos / sin of every row's angles pos * inv_freq_i (float32 angle, as HF)
    const int half = rope_dims(s) / 2;
    const float attn_factor = static_cast<float>(s.rope_attn_factor);  // YaRN's; 1 otherwise
    grow(m.rope_row, T);
    auto table = [&](const std::vector<float>& inv, float factor, std::vector<float>& cs, std::vector<float>& sn) {
      grow(cs, T * half);
      grow(sn, T * half);
      for (int64_t t = 0; t < T; ++t) rope_cos_sin(inv.data(), half, factor, m.pos[t], &cs[t * half], &sn[t * half]);
    };
    for (int64_t t = 0; t < T; ++t) m.rope_row[t] = static_cast<int32_t>(t);
    table(m.rope_inv, attn_factor, m.rope_cos, m.rope_sin);
    if (!s.rope_inv_freq_local.empty())
      table(s.rope_inv_freq_local, static_cast<float>(s.rope_attn_factor_local), m.rope_cos_local, m.rope_sin_local);
  }
  const AttentionTable& K = attn_kernels();
  const Arith ar{s.lmul_scope == 2 ? s.lmul_bits : 0, s.bf16_products};  // how the projections multiply
  for (int li = 0; li < s.n_layers; ++li) {
    Layer& L = m.layers[li];
    // ---- attention
    const float* mu = s.norm == 0 ? m.mean.data() : nullptr;
    // q, k, v rows: three buffers, or column blocks of one [T, dq + 2 dkv] buffer (fused qkv)
    const bool fqkv = L.qkv.present();
    float* qp = fqkv ? m.qkv.data() : m.q.data();
    float* kp = fqkv ? m.qkv.data() + dq : m.k.data();
    float* vp = fqkv ? m.qkv.data() + dq + dkv : m.v.data();
    const int64_t ldq = fqkv ? dqkv : dq, ldkv = fqkv ? dqkv : dkv;
    if (m.fused) {
      const float* xs = row_stats(s, m.x.data(), T, m.mean.data(), m.rstd.data(), m.xn);
      if (fqkv) {
        linear_normed(L.qkv, L.qkvb, xs, T, m.qkv.data(), m.rstd.data(), mu, L.csum_qkv, ar);
      } else {
        linear_normed(L.q, L.qb, xs, T, m.q.data(), m.rstd.data(), mu, L.csum_q, ar);
        linear_normed(L.k, L.kb, xs, T, m.k.data(), m.rstd.data(), mu, L.csum_k, ar);
        linear_normed(L.v, L.vb, xs, T, m.v.data(), m.rstd.data(), mu, L.csum_v, ar);
      }
    } else {
      norm_rows(s, L.attn_norm_w, L.attn_norm_b, m.x.data(), m.xn.data(), T);
      if (fqkv) {
        linear(L.qkv, L.qkvb, m.xn.data(), T, m.qkv.data(), false, ar);
      } else {
        linear(L.q, L.qb, m.xn.data(), T, m.q.data(), false, ar);
        linear(L.k, L.kb, m.xn.data(), T, m.k.data(), false, ar);
        linear(L.v, L.vb, m.xn.data(), T, m.v.data(), false, ar);
      }
    }
    if (!s.learned_pos) {
      // the tables hold this call's rows: index them by row
      // (Qwen3: each head's RMSNorm first, in the same pass)
      const float* qn = s.qk_norm ? L.q_norm.f32() : nullptr;
      const float* kn = s.qk_norm ? L.k_norm.f32() : nullptr;
      const float eps = static_cast<float>(s.norm_eps);
      const bool local = local_rope(s, li);
      const float* cs = local ? m.rope_cos_local.data() : m.rope_cos.data();
      const float* sn = local ? m.rope_sin_local.data() : m.rope_sin.data();
      K.rope({T, qp, ldq, s.n_heads, s.head_dim, m.rope_row.data(), cs, sn, qn, eps, rope_dims(s)});
      K.rope({T, kp, ldkv, s.n_kv_heads, s.head_dim, m.rope_row.data(), cs, sn, kn, eps, rope_dims(s)});
    }
    if (L.type == AttnType::Softmax) {
      for (int64_t t = 0; t < T; ++t) {
        const size_t base = (static_cast<size_t>(slot_of[t]) * (L.ring ? L.ring : ctx_)) * dkv;
        const size_t row = base + static_cast<size_t>(key_row(m.pos[t], L.ring)) * dkv;
        if (s.kv_bf16) {
          for (int64_t i = 0; i < dkv; ++i) {
            L.kcache16[row + i] = from_f32<bf16>(kp[t * ldkv + i]);
            L.vcache16[row + i] = from_f32<bf16>(vp[t * ldkv + i]);
          }
          m.kptr16[t] = &L.kcache16[base];
          m.vptr16[t] = &L.vcache16[base];
        } else if (s.kv_int8) {
          const size_t srow = row / s.head_dim;  // the row's scales: [slot][key row][n_kv_heads]
          K.quantize_int8(kp + t * ldkv, s.n_kv_heads, s.head_dim, &L.kcache8[row], &L.kscale8[srow]);
          K.quantize_int8(vp + t * ldkv, s.n_kv_heads, s.head_dim, &L.vcache8[row], &L.vscale8[srow]);
          m.kptr8[t] = &L.kcache8[base];
          m.vptr8[t] = &L.vcache8[base];
          m.ksp8[t] = &L.kscale8[base / s.head_dim];
          m.vsp8[t] = &L.vscale8[base / s.head_dim];
        } else {
          std::memcpy(&L.kcache[row], kp + t * ldkv, sizeof(float) * dkv);
          std::memcpy(&L.vcache[row], vp + t * ldkv, sizeof(float) * dkv);
          m.kptr[t] = &L.kcache[base];
          m.vptr[t] = &L.vcache[base];
        }
      }
      AttnArgs aa{T, qp, ldq, m.att.data(), dq, m.kptr.data(), m.vptr.data(), m.pos.data(),
                  s.n_heads, s.n_kv_heads, s.head_dim, attn_scale(s)};
      if (s.kv_bf16) aa.k16 = m.kptr16.data(), aa.v16 = m.vptr16.data();
      if (s.kv_int8) aa.k8 = m.kptr8.data(), aa.v8 = m.vptr8.data(), aa.ks = m.ksp8.data(), aa.vs = m.vsp8.data();
      aa.window = attn_window(s, li);
      aa.ring = L.ring;
      aa.softcap = static_cast<float>(s.attn_softcap);
      if (s.lmul_scope > 0) lmul_cache_attention(aa, s.lmul_bits);
      else K.attention(aa);
    } else {
      // Linear family: each sequence's rows continue from, and update, its slot's fixed-size state.
      const LinAttnParams p = lin_attn_params(s, L.type);
      const size_t per_slot = static_cast<size_t>(s.n_heads) * (s.head_dim + 1) * (s.head_dim + 1);
      int64_t t0 = 0;
      for (int i = 0; i < n_seqs; ++i) {
        LinAttnSeqArgs la;
        la.p = p;
        la.T = lens[i];
        la.n_heads = s.n_heads;
        la.n_kv_heads = s.n_kv_heads;
        la.dk = la.dv = s.head_dim;
        la.q = qp + t0 * ldq; la.ldq = ldq;
        la.k = kp + t0 * ldkv; la.ldk = ldkv;
        la.v = vp + t0 * ldkv; la.ldv = ldkv;
        la.decay = L.decay.present() ? L.decay.f32() : nullptr;
        la.state = L.state.data() + static_cast<size_t>(slots[i]) * per_slot;
        la.o = m.att.data() + t0 * dq; la.ldo = dq;
        linear_attention_sequence(la);
        t0 += lens[i];
      }
    }
    // x += in W^T + b, the GEMM's accumulate epilogue; sandwich norms: x += RMSNorm(in W^T + b) g (xn is free
    // when a branch ends)
    auto add_to_stream = [&](const W& w, const W& b, const float* in, const W& post) {
      if (s.post_norms) {
        linear(w, b, in, T, m.xn.data(), false, ar);
        add_post_norm(m.xn.data(), post.f32(), T, d, s.norm_eps, m.x.data());
      } else {
        linear(w, b, in, T, m.x.data(), true, ar);
      }
    };
    // x += attn Wo^T + bo (parallel residual: the MLP reads this same x; att is added after it)
    if (!s.parallel_residual) add_to_stream(L.o, L.ob, m.att.data(), L.attn_post_norm);
    // ---- MLP
    if (moe_layer(s, li)) {  // a mixture of experts: its own norm pass (its rows are gathered per expert)
      norm_rows(s, L.mlp_norm_w, L.mlp_norm_b, m.x.data(), m.xn.data(), T);
      grow(m.moe.y, T * d);
      float* y = m.moe.y.data();
      moe_mlp(s, L.moe, m.xn.data(), T, y, m.moe, ar, K);
      if (s.parallel_residual) add_to_stream(L.o, L.ob, m.att.data(), L.attn_post_norm);
      if (s.post_norms) {
        add_post_norm(y, L.mlp_post_norm.f32(), T, d, s.norm_eps, m.x.data());
      } else {
        float* x = m.x.data();
        parallel_for(T, 1, [&](int64_t t0, int64_t t1, int) {
          for (int64_t i = t0 * d; i < t1 * d; ++i) x[i] += y[i];
        });
      }
      continue;
    }
    const bool fgu = L.gate_up.present();  // [gate; up] in one GEMM: gu = [T, 2 d_ff], gate first
    if (m.fused) {
      const float* xs = row_stats(s, m.x.data(), T, m.mean.data(), m.rstd.data(), m.xn);
      if (fgu) {
        linear_normed(L.gate_up, L.gate_upb, xs, T, m.gu.data(), m.rstd.data(), mu, L.csum_gate_up, ar);
      } else {
        linear_normed(L.up, L.upb, xs, T, m.up.data(), m.rstd.data(), mu, L.csum_up, ar);
        if (s.gated_mlp) linear_normed(L.gate, L.gateb, xs, T, m.gate.data(), m.rstd.data(), mu, L.csum_gate, ar);
      }
    } else {
      norm_rows(s, L.mlp_norm_w, L.mlp_norm_b, m.x.data(), m.xn.data(), T);
      if (fgu) {
        linear(L.gate_up, L.gate_upb, m.xn.data(), T, m.gu.data(), false, ar);
      } else {
        linear(L.up, L.upb, m.xn.data(), T, m.up.data(), false, ar);
        if (s.gated_mlp) linear(L.gate, L.gateb, m.xn.data(), T, m.gate.data(), false, ar);
      }
    }
    if (fgu) {
      K.activation({static_cast<Act>(s.activation), T, f, m.gu.data(), 2 * f, m.gu.data() + f, 2 * f, m.up.data(), f});
    } else if (s.gated_mlp) {
      K.activation({static_cast<Act>(s.activation), T, f, m.gate.data(), f, m.up.data(), f, m.up.data(), f});
    } else {
      K.activation({static_cast<Act>(s.activation), T, f, m.up.data(), f, nullptr, 0, m.up.data(), f});
    }
    if (s.parallel_residual) add_to_stream(L.o, L.ob, m.att.data(), L.attn_post_norm);
    add_to_stream(L.down, L.downb, m.up.data(), L.mlp_post_norm);  // x += act Wd^T + bd
  }

  // ---- head, on the rows asked for: every row, or the last row of each sequence that ends here
  int64_t rows = all_logits ? T : 0;
  const float* src = m.x.data();
  if (!all_logits) {
    grow(m.sel, static_cast<int64_t>(n_seqs) * d);
    int64_t t = 0;
    for (int i = 0; i < n_seqs; ++i) {
      t += lens[i];
      if (!ends || ends[i]) std::memcpy(&m.sel[rows++ * d], &m.x[(t - 1) * d], sizeof(float) * d);
    }
    src = m.sel.data();
  }
  if (rows == 0) {
    // no sequence ends in this chunk
  } else if (m.fused_head) {
    const float* xs = row_stats(s, src, rows, m.mean.data(), m.rstd.data(), m.xn);
    linear_normed(m.head, m.head_b, xs, rows, logits, m.rstd.data(), s.norm == 0 ? m.mean.data() : nullptr,
                  m.head_csum, ar);
  } else {
    norm_rows(s, m.final_w, m.final_b, src, m.xn.data(), rows);
    linear(m.head, m.head_b, m.xn.data(), rows, logits, false, ar);
  }
  if (rows > 0 && s.final_softcap > 0) {  // Gemma 2: logits -> c tanh(logits / c)
    const float c = static_cast<float>(s.final_softcap);
    parallel_for(rows, 1, [&](int64_t r0, int64_t r1, int) {
      softcap_scores(logits + r0 * s.vocab, (r1 - r0) * s.vocab, c);
    });
  }
  for (int i = 0; i < n_seqs; ++i) m.len[slots[i]] += lens[i];
}

}  // namespace ne
