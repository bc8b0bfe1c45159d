// weights.h: the runner's tensor names, their shapes under a ModelSpec, and the checks a weight
// handed to a runner passes. Shared by the CPU runner (model/runner.cpp) and the CUDA runner
// (cuda/runner.cu), whose per-model and per-layer structs use the same member names:
//   model: tok_emb, pos_emb, final_w, final_b, head, head_b, layers[i]
//   layer: attn_norm_w/_b, mlp_norm_w/_b, q k v o (+ qb kb vb ob), up gate down (+ upb gateb downb),
//          decay (norm attention), q_norm k_norm (per-head q / k RMSNorm gains), attn_post_norm
//          mlp_post_norm (sandwich norms' gains), moe (a mixture-of-experts layer's: MoeWeights)
// Names are those of normengine's canonical checkpoint layout ("blocks.{i}.attn.q.weight", ...).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "normengine/model.h"
#include "normengine/tensor.h"
#include "ops/linear_attention.h"
#include "ops/quant_gemm.h"

namespace ne {

// Where a named tensor goes in a runner, and the shape it must have: [rows, cols], or a vector of
// cols elements (vec; float32 only). quantizable: a linear weight or an embedding, which
// set_quant_tensor may hand over packed.
template <class Wt>
struct WeightSlot {
  Wt* w = nullptr;
  int64_t rows = 0, cols = 0;
  bool vec = false, quantizable = false;
};

// "blocks.{i}.rest": i, with *rest = "rest"; -1 for a name outside the blocks. An i outside the model
// (or no number) raises ValueError.
inline int layer_of(const std::string& name, const ModelSpec& s, std::string* rest) {
  if (name.rfind("blocks.", 0) != 0) return -1;
  const size_t dot = name.find('.', 7);
  int i = -1;
  try {
    i = std::stoi(name.substr(7, dot - 7));
  } catch (...) {
  }
  if (i < 0 || i >= s.n_layers || dot == std::string::npos)
    throw ValueError(name + ": no such layer (the model has " + std::to_string(s.n_layers) + ")");
  *rest = name.substr(dot + 1);
  return i;
}

// The rotary dims of each head: spec.rope_dim, or all head_dim.
inline int rope_dims(const ModelSpec& s) { return s.rope_dim > 0 ? s.rope_dim : s.head_dim; }

// A mixture-of-experts layer's weights (ModelSpec.n_experts): the router, each expert's gated MLP (eup, egate,
// edown: n_experts each, sized by the runner's constructor) and the shared expert (sup, sgate, sdown) with its
// gate (shared_gate).
template <class Wt>
struct MoeWeights {
  Wt router, shared_gate, sup, sgate, sdown;
  std::vector<Wt> eup, egate, edown;
  void resize(int n) { eup.resize(n), egate.resize(n), edown.resize(n); }
};

// Whether layer i's MLP is a mixture of experts (spec.n_experts, spec.moe_layers).
inline bool moe_layer(const ModelSpec& s, int i) {
  return s.n_experts > 0 && (s.moe_layers.empty() || s.moe_layers[i] != 0);
}

// A token's experts (ModelSpec.n_experts): p = softmax(logits[0 .. E)) in float32, the k largest p_e (ties:
// the lower index) in descending order into idx[0 .. k), their p_e into w, renormalized to sum 1 when `renorm`
// (Mixtral's top-k softmax; Qwen2-MoE / Qwen3-MoE as their norm_topk_prob says). As transformers' routers.
inline void moe_route(const float* logits, int E, int k, bool renorm, int32_t* idx, float* w) {
  float mx = logits[0];
  for (int e = 1; e < E; ++e) mx = logits[e] > mx ? logits[e] : mx;
  float sum = 0.f;
  for (int e = 0; e < E; ++e) sum += std::exp(logits[e] - mx);
  float top = 0.f;
  for (int j = 0; j < k; ++j) {  // k passes over E (k is a handful)
    int best = -1;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int i = 0; i < j && !taken; ++i) taken = idx[i] == e;
      // (NaN logits: an expert is still picked, the first untaken, so every row has k distinct experts)
      if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
    }
    idx[j] = best;
    w[j] = std::exp(logits[best] - mx) / sum;
    top += w[j];
  }
  if (renorm)
    for (int j = 0; j < k; ++j) w[j] /= top;
}

// One call's routing of T rows (ModelSpec.n_experts), as both runners group it: moe_route per row, then the
// (row, expert) pairs sorted by expert, expert e's in start[e] .. start[e + 1] in row order, with rows[p] and
// weight[p] each pair's row and weight (an expert's GEMMs run over its rows gathered in this order); and per
// row its pairs in expert index order, slot[t k + j] their positions in the grouped order and slot_w their
// weights (a row's expert outputs are added in that order, as transformers adds them expert by expert).
struct MoeRouting {
  std::vector<int32_t> expert, rows, start, fill, slot;
  std::vector<float> prob, weight, slot_w;
  void route(const float* logits, int64_t T, const ModelSpec& s) {
    const int E = s.n_experts, k = s.n_experts_used;
    const int64_t P = T * k;
    expert.resize(P), prob.resize(P), rows.resize(P), weight.resize(P), slot.resize(P), slot_w.resize(P);
    for (int64_t t = 0; t < T; ++t) moe_route(logits + t * E, E, k, s.moe_norm_topk, &expert[t * k], &prob[t * k]);
    start.assign(E + 1, 0);
    for (int64_t i = 0; i < P; ++i) ++start[expert[i] + 1];
    for (int e = 0; e < E; ++e) start[e + 1] += start[e];
    fill.assign(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < P; ++i) {  // (rows ascending within each expert)
      const int32_t at = fill[expert[i]]++;
      rows[at] = static_cast<int32_t>(i / k);
      weight[at] = prob[i];
      slot[i] = at;
      slot_w[i] = prob[i];
    }
    for (int64_t t = 0; t < T; ++t) {  // row t's k pairs into expert index order (insertion sort)
      int32_t* ex = &expert[t * k];
      for (int j = 1; j < k; ++j)
        for (int r = j; r > 0 && ex[r - 1] > ex[r]; --r) {
          std::swap(ex[r - 1], ex[r]);
          std::swap(slot[t * k + r - 1], slot[t * k + r]);
          std::swap(slot_w[t * k + r - 1], slot_w[t * k + r]);
        }
    }
  }
};

// The checks both runners' constructors make of a spec and their slots / ctx (ValueError naming the
// field). What one runner does not support is that runner's to refuse.
inline void check_spec(const ModelSpec& s, int slots, int ctx) {
  if (s.vocab < 1 || s.d_model < 1 || s.n_layers < 1 || s.n_heads < 1 || s.n_kv_heads < 1 || s.head_dim < 1 ||
      s.d_ff < 1 || s.max_seq_len < 1)
    throw ValueError("spec: every size must be positive");
  if (s.n_heads % s.n_kv_heads) throw ValueError("spec: n_heads must be a multiple of n_kv_heads");
  if (!s.learned_pos && s.head_dim % 2) throw ValueError("spec: RoPE needs an even head_dim");
  if (s.rope_dim < 0 || s.rope_dim > s.head_dim || s.rope_dim % 2)
    throw ValueError("spec.rope_dim: expected an even number of rotary dims in 0..head_dim (0: all), got " +
                     std::to_string(s.rope_dim));
  const int rh = rope_dims(s) / 2;
  if (!s.learned_pos && !s.rope_inv_freq.empty() && static_cast<int>(s.rope_inv_freq.size()) != rh)
    throw ValueError("spec.rope_inv_freq: expected rope_dim / 2 = " + std::to_string(rh) + " values, got " +
                     std::to_string(s.rope_inv_freq.size()));
  if (s.parallel_residual && s.post_norms)
    throw ValueError("spec.parallel_residual: not with post_norms (no architecture has both)");
  // a RoPE table (rope_inv_freq, or the local one) and its cos / sin factor
  auto check_table = [&](const std::vector<float>& inv, double factor, const char* name, const char* factor_name) {
    for (float f : inv)
      if (!(f >= 0.f && f < INFINITY))
        throw ValueError(std::string("spec.") + name + ": expected finite non-negative values");
    if (!(factor > 0 && factor < INFINITY))
      throw ValueError(std::string("spec.") + factor_name + ": expected a positive finite number");
  };
  check_table(s.rope_inv_freq, s.rope_attn_factor, "rope_inv_freq", "rope_attn_factor");
  if (!s.rope_inv_freq_local.empty() && (s.learned_pos || static_cast<int>(s.rope_inv_freq_local.size()) != rh))
    throw ValueError("spec.rope_inv_freq_local: expected rope_dim / 2 = " + std::to_string(rh) +
                     " values (and RoPE), got " + std::to_string(s.rope_inv_freq_local.size()));
  check_table(s.rope_inv_freq_local, s.rope_attn_factor_local, "rope_inv_freq_local", "rope_attn_factor_local");
  if (!(s.emb_scale > 0 && s.emb_scale < INFINITY))
    throw ValueError("spec.emb_scale: expected a positive finite number");
  if (!(s.attn_softcap >= 0 && s.attn_softcap < INFINITY) || !(s.final_softcap >= 0 && s.final_softcap < INFINITY))
    throw ValueError("spec.attn_softcap / final_softcap: expected finite numbers >= 0 (0: none)");
  if (!(s.attn_scale >= 0 && s.attn_scale < INFINITY))
    throw ValueError("spec.attn_scale: expected a finite number >= 0 (0: 1 / sqrt(head_dim))");
  if (s.n_experts < 0 || s.n_experts > 1 << 16)
    throw ValueError("spec.n_experts: expected 0 (dense MLPs) .. 65536, got " + std::to_string(s.n_experts));
  if (s.n_experts > 0) {
    if (s.n_experts_used < 1 || s.n_experts_used > s.n_experts)
      throw ValueError("spec.n_experts_used: expected 1.." + std::to_string(s.n_experts) + " (n_experts), got " +
                       std::to_string(s.n_experts_used));
    if (s.moe_d_ff < 1 || s.shared_d_ff < 0)
      throw ValueError("spec.moe_d_ff / shared_d_ff: expected an expert width >= 1 and a shared one >= 0");
    if (!s.gated_mlp || s.mlp_bias)
      throw ValueError("spec.n_experts: experts are gated MLPs without biases (gated_mlp, not mlp_bias)");
    if (!s.moe_layers.empty() && static_cast<int>(s.moe_layers.size()) != s.n_layers)
      throw ValueError("spec.moe_layers: expected one entry per layer (" + std::to_string(s.n_layers) + "), got " +
                       std::to_string(s.moe_layers.size()));
  }
  if (s.qk_norm && s.learned_pos) throw ValueError("spec.qk_norm: per-head q / k norms need RoPE (not learned_pos)");
  if (slots < 1) throw ValueError("slots: expected >= 1, got " + std::to_string(slots));
  if (ctx < 1 || ctx > s.max_seq_len)
    throw ValueError("ctx: expected 1.." + std::to_string(s.max_seq_len) + " (the model's context), got " +
                     std::to_string(ctx));
  if (!s.attention.empty() && static_cast<int>(s.attention.size()) != s.n_layers)
    throw ValueError("spec.attention: expected one entry per layer (" + std::to_string(s.n_layers) + "), got " +
                     std::to_string(s.attention.size()));
  if (!s.window.empty() && static_cast<int>(s.window.size()) != s.n_layers)
    throw ValueError("spec.window: expected one entry per layer (" + std::to_string(s.n_layers) + "), got " +
                     std::to_string(s.window.size()));
  for (int w : s.window)
    if (w < 0)
      throw ValueError("spec.window: expected window sizes >= 0 (0: the whole context), got " + std::to_string(w));
  for (int a : s.attention)
    if (a < 0 || a > 3) throw ValueError("spec.attention: expected 0 (softmax), 1 (linear), 2 (mala) or 3 (norm)");
  if (s.linear_feature_map < 0 || s.linear_feature_map > 2)
    throw ValueError("spec.linear_feature_map: expected 0 (elu1), 1 (relu) or 2 (identity)");
  if (s.norm_attention_norm < 0 || s.norm_attention_norm > 1)
    throw ValueError("spec.norm_attention_norm: expected 0 (rms) or 1 (layer)");
  if (s.lmul_scope < 0 || s.lmul_scope > 2) throw ValueError("spec.lmul_scope: expected 0 (off), 1 (attention) or 2 (all)");
  if (s.kv_bf16 && s.lmul_scope) throw ValueError("spec.kv_bf16: the L-Mul attention reads a float32 KV cache");
  if (s.kv_int8 && s.lmul_scope) throw ValueError("spec.kv_int8: the L-Mul attention reads a float32 KV cache");
  if (s.kv_int8 && s.kv_bf16) throw ValueError("spec.kv_int8: not with spec.kv_bf16 (one KV cache dtype)");
  if (s.lmul_scope && (s.lmul_bits < 1 || s.lmul_bits > 23))
    throw ValueError("spec.lmul_bits: expected 1..23 mantissa bits, got " + std::to_string(s.lmul_bits));
}

// RoPE's inv_freq_i, i < R / 2 (R = rope_dims: head_dim, or the partial rotary dims): the spec's own
// (the scaled variants, computed by Python), or the plain 1 / theta^(2i / R) as Hugging Face computes it
// in float32. Both runners build their cos / sin from these, so they agree bit for bit.
inline std::vector<float> rope_inv_freq(const ModelSpec& s) {
  if (!s.rope_inv_freq.empty()) return s.rope_inv_freq;
  const int R = rope_dims(s), half = R / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i)
    inv[i] = 1.0f / std::pow(static_cast<float>(s.rope_theta), static_cast<float>(2 * i) / R);
  return inv;
}

// One position's RoPE row, as Hugging Face computes it in float32: a_i = pos * inv_freq_i (float32),
// cos[i] = cos(a_i) * factor, sin[i] = sin(a_i) * factor, i < half (factor: YaRN's; 1 otherwise). Both
// runners' tables come from here, so they agree bit for bit.
inline void rope_cos_sin(const float* inv, int half, float factor, int64_t pos, float* cos_row, float* sin_row) {
  for (int i = 0; i < half; ++i) {
    const float a = static_cast<float>(pos) * inv[i];
    cos_row[i] = static_cast<float>(std::cos(static_cast<double>(a))) * factor;
    sin_row[i] = static_cast<float>(std::sin(static_cast<double>(a))) * factor;
  }
}

// Runner::truncate's and CudaRunner::truncate's argument: 0 .. len (ValueError otherwise).
inline void check_truncate(int len, int n) {
  if (n < 0 || n > len)
    throw ValueError("n: expected 0.." + std::to_string(len) + " (the slot's length), got " + std::to_string(n));
}

// Layer i's sliding window under spec s (0: none).
inline int attn_window(const ModelSpec& s, int i) { return s.window.empty() ? 0 : s.window[i]; }

// The attention scale: spec's, or 1 / sqrt(head_dim).
inline float attn_scale(const ModelSpec& s) {
  return s.attn_scale > 0 ? static_cast<float>(s.attn_scale) : 1.0f / std::sqrt(static_cast<float>(s.head_dim));
}

// Whether layer i takes the local RoPE (spec.rope_inv_freq_local: its sliding-window layers).
inline bool local_rope(const ModelSpec& s, int i) { return !s.rope_inv_freq_local.empty() && attn_window(s, i) > 0; }

// Layer i's attention type under spec s.
inline AttnType attn_type(const ModelSpec& s, int i) {
  return s.attention.empty() ? AttnType::Softmax : static_cast<AttnType>(s.attention[i]);
}

// The op a linear-family layer of type t runs under spec s (causal; ops/linear_attention.h).
inline LinAttnParams lin_attn_params(const ModelSpec& s, AttnType t) {
  LinAttnParams p;
  p.kind = t == AttnType::Linear ? LinAttnKind::Linear : t == AttnType::Mala ? LinAttnKind::Mala : LinAttnKind::Norm;
  p.fmap = static_cast<FeatureMap>(s.linear_feature_map);
  p.causal = true;
  p.normalize = s.linear_normalize;
  p.out_norm = s.norm_attention_norm;
  p.eps = static_cast<float>(s.linear_eps);
  return p;
}

// The slot of `name` in model `m` (a runner's Impl), or w = nullptr when the model has no such
// tensor. A "blocks.{i}." name with i outside the model raises ValueError.
template <class Wt, class Model>
WeightSlot<Wt> weight_slot(Model& m, const ModelSpec& s, const std::string& name) {
  const int64_t d = s.d_model, dq = static_cast<int64_t>(s.n_heads) * s.head_dim,
                dkv = static_cast<int64_t>(s.n_kv_heads) * s.head_dim, f = s.d_ff;
  auto mat = [](Wt& w, int64_t rows, int64_t cols, bool quantizable = true) {
    return WeightSlot<Wt>{&w, rows, cols, false, quantizable};
  };
  auto vec = [](Wt& w, int64_t n) { return WeightSlot<Wt>{&w, 1, n, true, false}; };
  if (name == "tok_emb.weight") return mat(m.tok_emb, s.vocab, d);
  if (name == "pos_emb.weight") return mat(m.pos_emb, s.max_seq_len, d, false);
  if (name == "final_norm.weight") return vec(m.final_w, d);
  if (name == "final_norm.bias") return vec(m.final_b, d);
  if (name == "lm_head.weight") return mat(m.head, s.vocab, d);
  if (name == "lm_head.bias") return vec(m.head_b, s.vocab);
  std::string r;
  const int i = layer_of(name, s, &r);
  if (i < 0) return {};
  auto& L = m.layers[i];
  if (r == "attn_norm.weight") return vec(L.attn_norm_w, d);
  if (r == "attn_norm.bias") return vec(L.attn_norm_b, d);
  if (r == "mlp_norm.weight") return vec(L.mlp_norm_w, d);
  if (r == "mlp_norm.bias") return vec(L.mlp_norm_b, d);
  if (r == "attn.q.weight") return mat(L.q, dq, d);
  if (r == "attn.k.weight") return mat(L.k, dkv, d);
  if (r == "attn.v.weight") return mat(L.v, dkv, d);
  if (r == "attn.o.weight") return mat(L.o, d, dq);
  if (r == "attn.q.bias") return vec(L.qb, dq);
  if (r == "attn.k.bias") return vec(L.kb, dkv);
  if (r == "attn.v.bias") return vec(L.vb, dkv);
  if (r == "attn.o.bias") return vec(L.ob, d);
  if (r == "mlp.up.weight") return mat(L.up, f, d);
  if (r == "mlp.gate.weight") return mat(L.gate, f, d);
  if (r == "mlp.down.weight") return mat(L.down, d, f);
  if (r == "mlp.up.bias") return vec(L.upb, f);
  if (r == "mlp.gate.bias") return vec(L.gateb, f);
  if (r == "mlp.down.bias") return vec(L.downb, d);
  if (r == "attn.q_norm.weight" || r == "attn.k_norm.weight") {
    if (!s.qk_norm) throw ValueError(name + ": the model has no per-head q / k norms (spec.qk_norm)");
    return vec(r[5] == 'q' ? L.q_norm : L.k_norm, s.head_dim);
  }
  if (r == "attn_post_norm.weight" || r == "mlp_post_norm.weight") {
    if (!s.post_norms) throw ValueError(name + ": the model has no post norms (spec.post_norms)");
    return vec(r[0] == 'a' ? L.attn_post_norm : L.mlp_post_norm, d);
  }
  if (r.rfind("moe.", 0) == 0) {  // mixture of experts: router, experts.{e}.*, shared.*, shared_gate
    if (!moe_layer(s, i)) throw ValueError(name + ": layer " + std::to_string(i) + " has a dense MLP, no experts");
    const int64_t fe = s.moe_d_ff, fs = s.shared_d_ff;
    if (r == "moe.router.weight") return mat(L.moe.router, s.n_experts, d, false);
    if (r == "moe.shared_gate.weight" && fs > 0) return mat(L.moe.shared_gate, 1, d, false);
    if (r == "moe.shared.up.weight" && fs > 0) return mat(L.moe.sup, fs, d);
    if (r == "moe.shared.gate.weight" && fs > 0) return mat(L.moe.sgate, fs, d);
    if (r == "moe.shared.down.weight" && fs > 0) return mat(L.moe.sdown, d, fs);
    if (r.rfind("moe.experts.", 0) == 0) {
      const size_t dot = r.find('.', 12);
      int e = -1;
      try {
        if (dot != std::string::npos && dot > 12) e = std::stoi(r.substr(12, dot - 12));
      } catch (...) {
      }
      if (e < 0 || e >= s.n_experts)
        throw ValueError(name + ": no such expert (the layer has " + std::to_string(s.n_experts) + ")");
      const std::string part = r.substr(dot + 1);
      if (part == "up.weight") return mat(L.moe.eup[e], fe, d);
      if (part == "gate.weight") return mat(L.moe.egate[e], fe, d);
      if (part == "down.weight") return mat(L.moe.edown[e], d, fe);
    }
    return {};
  }
  if (r == "attn.decay") {  // norm attention's per-head decay lambda (optional: 1 without)
    if (attn_type(s, i) != AttnType::Norm) throw ValueError(name + ": only norm-attention layers take a decay");
    return vec(L.decay, s.n_heads);
  }
  return {};
}

// A dense weight for `slot`: t's dtype (float32 / bfloat16 / float16; vectors float32), shape and
// row-contiguity checked (the device is the caller's to check), the slot's struct filled in.
template <class Wt>
void set_dense_weight(const WeightSlot<Wt>& slot, const std::string& name, const TensorView& t) {
  const int64_t rows = slot.rows, cols = slot.cols;
  const bool vec = slot.vec;
  if (!is_float(t.dtype) || t.dtype == DType::F64 || (vec && t.dtype != DType::F32))
    throw DTypeError(name + ": expected " + (vec ? std::string("float32") : "float32, bfloat16 or float16") +
                     ", got " + dtype_name(t.dtype));
  const bool ok = vec ? (t.ndim == 1 && t.shape[0] == cols) : (t.ndim == 2 && t.shape[0] == rows && t.shape[1] == cols);
  if (!ok) {
    const std::string want = vec ? "(" + std::to_string(cols) + ",)"
                                 : "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
    throw ShapeError(name + ": expected shape " + want + ", got " + shape_str(t));
  }
  if ((vec && t.strides[0] != 1) || (!vec && (t.strides[1] != 1 || t.strides[0] < cols)))
    throw ShapeError(name + ": expected contiguous rows");
  Wt w;
  w.data = t.data;
  w.dtype = t.dtype;
  w.rows = rows;
  w.cols = cols;
  w.ld = vec ? cols : t.strides[0];
  *slot.w = w;
}

// A packed weight for `slot` (set_quant_tensor): the QWeight of format (a QFormat value), its parts
// data / scale / zero (null: symmetric int4), group and two-level scales (sub, model.h) checked for the slot's
// [N, K]: dtypes, shapes, contiguity, and every part on `dev` (the runner's device).
template <class Wt>
QWeight quant_weight(const WeightSlot<Wt>& slot, const std::string& name, int format, const TensorView& data,
                     const TensorView& scale, const TensorView* zero, int64_t group, const Device& dev,
                     const SubScales& sub = {}) {
  if (!slot.w || !slot.quantizable)
    throw ValueError(name + ": not a quantizable weight of this model (linear weights and embeddings only)");
  const int64_t N = slot.rows, K = slot.cols;
  if (format < 0 || format > 3) throw ValueError(name + ": format: expected 0..3 (QFormat), got " + std::to_string(format));
  const QFormat fmt = static_cast<QFormat>(format);
  auto part = [&](const TensorView& t, DType want, const std::vector<int64_t>& shape, const char* what) {
    if (t.device != dev) throw DeviceError(name + "." + what + ": expected a tensor on " + dev.str() + ", got " + t.device.str());
    if (t.dtype != want)
      throw DTypeError(name + "." + what + ": expected " + dtype_name(want) + ", got " + dtype_name(t.dtype));
    bool ok = t.is_contiguous() && t.ndim == static_cast<int>(shape.size());
    for (size_t j = 0; ok && j < shape.size(); ++j) ok = t.shape[j] == shape[j];
    if (!ok) {
      std::string want_s = "(";
      for (size_t j = 0; j < shape.size(); ++j) want_s += (j ? ", " : "") + std::to_string(shape[j]);
      throw ShapeError(name + "." + what + ": expected a contiguous tensor of shape " + want_s + "), got " +
                       shape_str(t));
    }
  };
  // two-level scales: scale (and zero) one per super-block of S groups, the groups' own in sub (and sub_zero)
  const int64_t S = sub.sub ? sub.super : 1;
  if (sub.sub || sub.sub_zero) {
    if (!sub.sub) throw ValueError(name + ".qsubzero: two-level offsets need the sub-scales (qsub) too");
    if (dev.type != DeviceType::CPU)
      throw ValueError(name + ": two-level scales (qsub) are for the CPU runner; the CUDA one takes a scale per group");
    if (!(fmt == QFormat::Int4 || (fmt == QFormat::Int8Weight && group != 0)))
      throw ValueError(name + ".qsub: two-level scales are for int4 and grouped int8-weight");
    if (group <= 0 || K % group || S < 1 || (K / group) % S)
      throw ShapeError(name + ": super-blocks of " + std::to_string(S) + " groups do not divide the " +
                       (group > 0 ? std::to_string(K / group) : std::string("?")) + " groups of a row");
    if (!sub.sub_zero != !zero)
      throw ValueError(name + ": two-level offsets need both qsubzero and qzero (the super-blocks' offsets)");
  }
  QWeight q;
  q.format = fmt;
  q.N = N;
  q.K = K;
  q.group = group;
  switch (fmt) {
    case QFormat::Int8:
    case QFormat::Int8Weight:
      if (group != 0 && (fmt == QFormat::Int8 || (group != 16 && group != 32 && group != 64 && group != 128)))
        throw ValueError(name + ": int8 (W8A8) takes no group size, int8-weight 0 (per row), 16, 32, 64 or 128; got " +
                         std::to_string(group));
      if (group != 0 && K % group)
        throw ShapeError(name + ": in_features " + std::to_string(K) + " is not a multiple of the group size " +
                         std::to_string(group));
      part(data, DType::I8, {N, K}, "qdata");
      if (group != 0)
        part(scale, DType::F32, {N, K / group / S}, "qscale");
      else
        part(scale, DType::F32, {N}, "qscale");
      if (zero && fmt == QFormat::Int8Weight && group != 0) part(*zero, DType::F32, {N, K / group / S}, "qzero");
      else if (zero) throw ValueError(name + ": only int4 and grouped int8-weight take zero points");
      break;
    case QFormat::Int4:
      if (group != 32 && group != 64 && group != 128 && !(group == 16 && sub.sub))
        throw ValueError(name + ": int4 group size must be 32, 64 or 128 (16 with two-level scales), got " +
                         std::to_string(group));
      if (K % 32) throw ShapeError(name + ": int4 in_features must be a multiple of 32, got " + std::to_string(K));
      if (K % group)
        throw ShapeError(name + ": in_features " + std::to_string(K) + " is not a multiple of the group size " +
                         std::to_string(group));
      part(data, DType::U8, {N, K / 2}, "qdata");
      part(scale, DType::F32, {N, K / group / S}, "qscale");
      if (zero) part(*zero, DType::F32, {N, K / group / S}, "qzero");
      break;
    case QFormat::FP8:
      if (group != 0 && group != 128)
        throw ValueError(name + ": fp8 scales are per tensor (0) or 128 x 128 blocks (128), got " + std::to_string(group));
      part(data, DType::U8, {N, K}, "qdata");
      if (group == 0) part(scale, DType::F32, {1}, "qscale");
      else part(scale, DType::F32, {(N + 127) / 128, (K + 127) / 128}, "qscale");
      break;
  }
  if (zero && fmt == QFormat::FP8) throw ValueError(name + ": only int4 and grouped int8-weight take zero points");
  q.data = data.data;
  q.scale = static_cast<const float*>(scale.data);
  q.zero = zero ? static_cast<const float*>(zero->data) : nullptr;
  if (sub.sub) {
    part(*sub.sub, DType::I8, {N, K / group}, "qsub");
    if (sub.sub_zero) part(*sub.sub_zero, DType::I8, {N, K / group}, "qsubzero");
    q.sub = static_cast<const int8_t*>(sub.sub->data);
    q.sub_zero = sub.sub_zero ? static_cast<const int8_t*>(sub.sub_zero->data) : nullptr;
    q.super = S;
  }
  return q;
}

// The slot's struct for a packed weight q (its members quant and q).
template <class Wt>
void set_quant_weight(const WeightSlot<Wt>& slot, const QWeight& q) {
  Wt w;
  w.data = q.data;  // present()
  w.dtype = DType::F32;
  w.rows = q.N;
  w.cols = q.K;
  w.ld = q.K;
  w.quant = true;
  w.q = q;
  *slot.w = w;
}

// finalize(): every tensor the spec calls for was handed over; else ValueError naming the first missing.
template <class Model>
void check_weights_complete(const Model& m, const ModelSpec& s) {
  auto need = [](const auto& w, const std::string& name) {
    if (!w.present()) throw ValueError(name + ": missing (never handed to the runner)");
  };
  const bool has_norm = s.norm >= 0, ln = s.norm == 0;
  need(m.tok_emb, "tok_emb.weight");
  need(m.head, "lm_head.weight");
  if (s.learned_pos) need(m.pos_emb, "pos_emb.weight");
  if (has_norm) need(m.final_w, "final_norm.weight");
  if (ln) need(m.final_b, "final_norm.bias");
  if (s.head_bias) need(m.head_b, "lm_head.bias");
  for (int i = 0; i < s.n_layers; ++i) {
    const auto& L = m.layers[i];
    const std::string p = "blocks." + std::to_string(i) + ".";
    if (has_norm) { need(L.attn_norm_w, p + "attn_norm.weight"); need(L.mlp_norm_w, p + "mlp_norm.weight"); }
    if (ln) { need(L.attn_norm_b, p + "attn_norm.bias"); need(L.mlp_norm_b, p + "mlp_norm.bias"); }
    need(L.q, p + "attn.q.weight"); need(L.k, p + "attn.k.weight"); need(L.v, p + "attn.v.weight");
    need(L.o, p + "attn.o.weight");
    if (moe_layer(s, i)) {
      need(L.moe.router, p + "moe.router.weight");
      for (int e = 0; e < s.n_experts; ++e) {
        const std::string x = p + "moe.experts." + std::to_string(e) + ".";
        need(L.moe.egate[e], x + "gate.weight");
        need(L.moe.eup[e], x + "up.weight");
        need(L.moe.edown[e], x + "down.weight");
      }
      if (s.shared_d_ff > 0) {
        need(L.moe.sgate, p + "moe.shared.gate.weight"); need(L.moe.sup, p + "moe.shared.up.weight");
        need(L.moe.sdown, p + "moe.shared.down.weight"); need(L.moe.shared_gate, p + "moe.shared_gate.weight");
      }
    } else {
      need(L.up, p + "mlp.up.weight"); need(L.down, p + "mlp.down.weight");
      if (s.gated_mlp) need(L.gate, p + "mlp.gate.weight");
    }
    if (s.qkv_bias) { need(L.qb, p + "attn.q.bias"); need(L.kb, p + "attn.k.bias"); need(L.vb, p + "attn.v.bias"); }
    if (s.o_bias) need(L.ob, p + "attn.o.bias");
    if (s.qk_norm) { need(L.q_norm, p + "attn.q_norm.weight"); need(L.k_norm, p + "attn.k_norm.weight"); }
    if (s.post_norms) {
      need(L.attn_post_norm, p + "attn_post_norm.weight");
      need(L.mlp_post_norm, p + "mlp_post_norm.weight");
    }
    if (s.mlp_bias && !moe_layer(s, i)) {
      need(L.upb, p + "mlp.up.bias");
      need(L.downb, p + "mlp.down.bias");
      if (s.gated_mlp) need(L.gateb, p + "mlp.gate.bias");
    }
  }
}

// finalize() with lmul_scope "all": every matmul is an L-Mul of float32 operands, so every projection
// and the head must be a dense float32 weight (DTypeError naming the first that is not).
template <class Model>
void check_lmul_weights(const Model& m, const ModelSpec& s) {
  if (s.lmul_scope != 2) return;
  auto f32_only = [](const auto& w, const std::string& name) {
    if (w.present() && (w.quant || w.dtype != DType::F32))
      throw DTypeError(name + ": L-Mul in every matmul (lmul_scope all) needs float32 weights, got " +
                       (w.quant ? std::string("a quantized weight") : dtype_name(w.dtype)));
  };
  f32_only(m.head, "lm_head.weight");
  for (int i = 0; i < s.n_layers; ++i) {
    const auto& L = m.layers[i];
    const std::string p = "blocks." + std::to_string(i) + ".";
    f32_only(L.q, p + "attn.q.weight"); f32_only(L.k, p + "attn.k.weight"); f32_only(L.v, p + "attn.v.weight");
    f32_only(L.o, p + "attn.o.weight"); f32_only(L.up, p + "mlp.up.weight"); f32_only(L.gate, p + "mlp.gate.weight");
    f32_only(L.down, p + "mlp.down.weight");
    f32_only(L.moe.router, p + "moe.router.weight"); f32_only(L.moe.shared_gate, p + "moe.shared_gate.weight");
    f32_only(L.moe.sup, p + "moe.shared.up.weight"); f32_only(L.moe.sgate, p + "moe.shared.gate.weight");
    f32_only(L.moe.sdown, p + "moe.shared.down.weight");
    for (size_t e = 0; e < L.moe.eup.size(); ++e) {
      const std::string x = p + "moe.experts." + std::to_string(e) + ".";
      f32_only(L.moe.eup[e], x + "up.weight");
      f32_only(L.moe.egate[e], x + "gate.weight");
      f32_only(L.moe.edown[e], x + "down.weight");
    }
  }
}

}  // namespace ne
