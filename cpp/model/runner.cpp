// The transformer runner. One forward call processes any mix of sequences (a prefill of T tokens
// for one, a one-token decode step for many): their tokens are stacked into one activation matrix
// so every projection is a single GEMM over all of them, and only attention looks at which
// sequence (KV cache slot) and position a row belongs to.
//
// Per layer, with x the residual stream [T, d]:
//   xn = norm(x)                                   (attn_norm; LayerNorm / RMSNorm / CRMSNorm)
//   q, k, v = xn Wq^T (+bq), xn Wk^T (+bk), xn Wv^T (+bv);  RoPE(q, k) unless learned positions
//   K/V cache[slot][pos] = k, v
//   x += attention(q, cache) Wo^T (+bo)            (the add is the GEMM's accumulate epilogue)
//   xn = norm(x)                                   (mlp_norm)
//   x += act(xn Wg^T) * (xn Wu^T) Wd^T  (gated)  or  act(xn Wu^T + bu) Wd^T + bd
// then logits = norm(x) Wlm^T (+blm) for the rows asked for.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/parallel.h"
#include "normengine/model.h"
#include "ops/attention.h"
#include "ops/gemm.h"

namespace ne {

namespace {

// A weight as the kernels read it.
struct W {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;
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

// Picked per call, so force_cpu_isa() takes effect at once.
const AttentionTable& attn_kernels() { return *NE_PICK_ISA(attention_table); }

}  // namespace


struct Runner::Layer {
  W attn_norm_w, attn_norm_b, q, k, v, o, qb, kb, vb, ob;
  W mlp_norm_w, mlp_norm_b, up, gate, down, upb, gateb, downb;
  std::vector<float> kcache, vcache;  // [slots][ctx][n_kv_heads * head_dim]
  std::vector<float> csum_q, csum_k, csum_v, csum_up, csum_gate;  // fused LayerNorm: W.sum(1)
};

struct Runner::Impl {
  // Norms with unit gains and zero biases (folded into the readers, normengine.convert): every
  // norm + linear then runs as norm_linear: row statistics, and the GEMMs read the raw stream and
  // apply them in their epilogue (LayerNorm: with the readers' column sums).
  bool fused = false;
  std::vector<float> mean, rstd;
  std::vector<float> head_csum;
  std::vector<Layer> layers;
  W tok_emb, pos_emb, final_w, final_b, head, head_b;
  std::vector<int> len;  // tokens held per slot
  std::vector<float> rope_cos, rope_sin;
  // activations, grown to the largest call seen and reused
  std::vector<float> x, xn, q, k, v, att, up, gate, sel;
  std::vector<int32_t> pos;
  std::vector<const float*> kptr, vptr;
  std::vector<float> scratch;
};

Runner::Runner(const ModelSpec& s, int slots, int ctx) : spec_(s), n_slots_(slots), ctx_(ctx) {
  if (s.vocab < 1 || s.d_model < 1 || s.n_layers < 1 || s.n_heads < 1 || s.n_kv_heads < 1 || s.head_dim < 1 ||
      s.d_ff < 1 || s.max_seq_len < 1)
    throw ValueError("spec: every size must be positive");
  if (s.n_heads % s.n_kv_heads) throw ValueError("spec: n_heads must be a multiple of n_kv_heads");
  if (!s.learned_pos && s.head_dim % 2) throw ValueError("spec: RoPE needs an even head_dim");
  if (slots < 1) throw ValueError("slots: expected >= 1, got " + std::to_string(slots));
  if (ctx < 1 || ctx > s.max_seq_len)
    throw ValueError("ctx: expected 1.." + std::to_string(s.max_seq_len) + " (the model's context), got " +
                     std::to_string(ctx));
  impl_ = std::make_unique<Impl>();
  impl_->layers.resize(s.n_layers);
  const size_t cache = static_cast<size_t>(slots) * ctx * s.n_kv_heads * s.head_dim;
  for (auto& l : impl_->layers) {
    l.kcache.assign(cache, 0.f);
    l.vcache.assign(cache, 0.f);
  }
  impl_->len.assign(slots, 0);
  if (!s.learned_pos) {
    // As Hugging Face computes them, in float32: inv_freq_i = 1 / theta^(2i / D), angle = pos * inv_freq_i.
    const int half = s.head_dim / 2;
    impl_->rope_cos.resize(static_cast<size_t>(ctx) * half);
    impl_->rope_sin.resize(static_cast<size_t>(ctx) * half);
    for (int i = 0; i < half; ++i) {
      float inv = 1.0f / std::pow(static_cast<float>(s.rope_theta), static_cast<float>(2 * i) / s.head_dim);
      for (int p = 0; p < ctx; ++p) {
        float a = static_cast<float>(p) * inv;
        impl_->rope_cos[static_cast<size_t>(p) * half + i] = static_cast<float>(std::cos(static_cast<double>(a)));
        impl_->rope_sin[static_cast<size_t>(p) * half + i] = static_cast<float>(std::sin(static_cast<double>(a)));
      }
    }
  }
}

Runner::~Runner() = default;

void Runner::set_tensor(const std::string& name, const TensorView& t) {
  const ModelSpec& s = spec_;
  const int64_t d = s.d_model, dq = static_cast<int64_t>(s.n_heads) * s.head_dim,
                dkv = static_cast<int64_t>(s.n_kv_heads) * s.head_dim, f = s.d_ff;
  auto view = [&](int64_t rows, int64_t cols, bool vec, bool f32_only) {
    if (t.device.type != DeviceType::CPU)
      throw DeviceError(name + ": the runner's weights must be on the CPU, got " + t.device.str());
    if (!is_float(t.dtype) || t.dtype == DType::F64 || (f32_only && t.dtype != DType::F32))
      throw DTypeError(name + ": expected " + (f32_only ? std::string("float32") : "float32, bfloat16 or float16") +
                       ", got " + dtype_name(t.dtype));
    bool ok = vec ? (t.ndim == 1 && t.shape[0] == cols) : (t.ndim == 2 && t.shape[0] == rows && t.shape[1] == cols);
    if (!ok) {
      std::string want = vec ? "(" + std::to_string(cols) + ",)"
                             : "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
      throw ShapeError(name + ": expected shape " + want + ", got " + shape_str(t));
    }
    if ((vec && t.strides[0] != 1) || (!vec && (t.strides[1] != 1 || t.strides[0] < cols)))
      throw ShapeError(name + ": expected contiguous rows");
    W w;
    w.data = t.data;
    w.dtype = t.dtype;
    w.rows = vec ? 1 : rows;
    w.cols = cols;
    w.ld = vec ? cols : t.strides[0];
    return w;
  };
  auto mat = [&](int64_t r, int64_t c) { return view(r, c, false, false); };
  auto vecf = [&](int64_t n) { return view(1, n, true, true); };

  if (name == "tok_emb.weight") { impl_->tok_emb = mat(s.vocab, d); return; }
  if (name == "pos_emb.weight") { impl_->pos_emb = mat(s.max_seq_len, d); return; }
  if (name == "final_norm.weight") { impl_->final_w = vecf(d); return; }
  if (name == "final_norm.bias") { impl_->final_b = vecf(d); return; }
  if (name == "lm_head.weight") { impl_->head = mat(s.vocab, d); return; }
  if (name == "lm_head.bias") { impl_->head_b = vecf(s.vocab); return; }
  if (name.rfind("blocks.", 0) == 0) {
    size_t dot = name.find('.', 7);
    int i = -1;
    try {
      i = std::stoi(name.substr(7, dot - 7));
    } catch (...) {
    }
    if (i < 0 || i >= s.n_layers || dot == std::string::npos)
      throw ValueError(name + ": no such layer (the model has " + std::to_string(s.n_layers) + ")");
    Layer& L = impl_->layers[i];
    const std::string r = name.substr(dot + 1);
    if (r == "attn_norm.weight") { L.attn_norm_w = vecf(d); return; }
    if (r == "attn_norm.bias") { L.attn_norm_b = vecf(d); return; }
    if (r == "mlp_norm.weight") { L.mlp_norm_w = vecf(d); return; }
    if (r == "mlp_norm.bias") { L.mlp_norm_b = vecf(d); return; }
    if (r == "attn.q.weight") { L.q = mat(dq, d); return; }
    if (r == "attn.k.weight") { L.k = mat(dkv, d); return; }
    if (r == "attn.v.weight") { L.v = mat(dkv, d); return; }
    if (r == "attn.o.weight") { L.o = mat(d, dq); return; }
    if (r == "attn.q.bias") { L.qb = vecf(dq); return; }
    if (r == "attn.k.bias") { L.kb = vecf(dkv); return; }
    if (r == "attn.v.bias") { L.vb = vecf(dkv); return; }
    if (r == "attn.o.bias") { L.ob = vecf(d); return; }
    if (r == "mlp.up.weight") { L.up = mat(f, d); return; }
    if (r == "mlp.gate.weight") { L.gate = mat(f, d); return; }
    if (r == "mlp.down.weight") { L.down = mat(d, f); return; }
    if (r == "mlp.up.bias") { L.upb = vecf(f); return; }
    if (r == "mlp.gate.bias") { L.gateb = vecf(f); return; }
    if (r == "mlp.down.bias") { L.downb = vecf(d); return; }
  }
  throw ValueError(name + ": not a tensor of this model");
}

void Runner::finalize() {
  const ModelSpec& s = spec_;
  auto need = [](const W& w, const std::string& name) {
    if (!w.present()) throw ValueError(name + ": missing (never handed to the runner)");
  };
  const bool has_norm = s.norm >= 0, ln = s.norm == 0;
  need(impl_->tok_emb, "tok_emb.weight");
  need(impl_->head, "lm_head.weight");
  if (s.learned_pos) need(impl_->pos_emb, "pos_emb.weight");
  if (has_norm) need(impl_->final_w, "final_norm.weight");
  if (ln) need(impl_->final_b, "final_norm.bias");
  if (s.head_bias) need(impl_->head_b, "lm_head.bias");
  for (int i = 0; i < s.n_layers; ++i) {
    const Layer& L = impl_->layers[i];
    const std::string p = "blocks." + std::to_string(i) + ".";
    if (has_norm) { need(L.attn_norm_w, p + "attn_norm.weight"); need(L.mlp_norm_w, p + "mlp_norm.weight"); }
    if (ln) { need(L.attn_norm_b, p + "attn_norm.bias"); need(L.mlp_norm_b, p + "mlp_norm.bias"); }
    need(L.q, p + "attn.q.weight"); need(L.k, p + "attn.k.weight"); need(L.v, p + "attn.v.weight");
    need(L.o, p + "attn.o.weight"); need(L.up, p + "mlp.up.weight"); need(L.down, p + "mlp.down.weight");
    if (s.gated_mlp) need(L.gate, p + "mlp.gate.weight");
    if (s.qkv_bias) { need(L.qb, p + "attn.q.bias"); need(L.kb, p + "attn.k.bias"); need(L.vb, p + "attn.v.bias"); }
    if (s.o_bias) need(L.ob, p + "attn.o.bias");
    if (s.mlp_bias) {
      need(L.upb, p + "mlp.up.bias");
      need(L.downb, p + "mlp.down.bias");
      if (s.gated_mlp) need(L.gateb, p + "mlp.gate.bias");
    }
  }
  // Fused norms when every norm is the bare normalization (gains 1, biases 0).
  auto unit = [&](const W& w, const W& b) {
    for (int64_t i = 0; i < s.d_model; ++i)
      if (w.f32()[i] != 1.0f || (b.present() && b.f32()[i] != 0.0f)) return false;
    return true;
  };
  bool fused = has_norm && unit(impl_->final_w, impl_->final_b);
  for (int i = 0; fused && i < s.n_layers; ++i) {
    const Layer& L = impl_->layers[i];
    fused = unit(L.attn_norm_w, L.attn_norm_b) && unit(L.mlp_norm_w, L.mlp_norm_b);
  }
  impl_->fused = fused;
  if (fused && ln) {  // column sums c_n = sum_k W[n, k] of every reader
    auto csum = [&](const W& w, std::vector<float>& out) {
      if (!w.present()) return;
      std::vector<float> one(static_cast<size_t>(w.cols), 1.0f);
      out.assign(static_cast<size_t>(w.rows), 0.0f);
      gemm_f32(1, w.rows, w.cols, one.data(), w.cols, w.data, w.dtype, w.ld, nullptr, out.data(), w.rows, false);
    };
    for (auto& L : impl_->layers) {
      csum(L.q, L.csum_q); csum(L.k, L.csum_k); csum(L.v, L.csum_v);
      csum(L.up, L.csum_up); csum(L.gate, L.csum_gate);
    }
    csum(impl_->head, impl_->head_csum);
  }
}

bool Runner::fused_norms() const { return impl_->fused; }

void Runner::reset(int slot) {
  if (slot < 0 || slot >= n_slots_) throw ValueError("slot: out of range");
  impl_->len[slot] = 0;
}

int Runner::length(int slot) const {
  if (slot < 0 || slot >= n_slots_) throw ValueError("slot: out of range");
  return impl_->len[slot];
}

namespace {

// y[T, N] (+)= x[T, K] W^T (+ b)
void linear(const W& w, const W& b, const float* x, int64_t T, float* y, bool accumulate) {
  gemm_f32(T, w.rows, w.cols, x, w.cols, w.data, w.dtype, w.ld, b.present() ? b.f32() : nullptr, y, w.rows,
           accumulate);
}

// y[T, N] = norm(x) W^T (+ b) with norm's statistics applied in the GEMM epilogue (norm_linear).
void linear_normed(const W& w, const W& b, const float* x, int64_t T, float* y, const float* rstd,
                   const float* mean, const std::vector<float>& csum) {
  GemmEpilogue ep;
  ep.row_scale = rstd;
  ep.row_shift = mean;
  ep.col_sum = mean ? csum.data() : nullptr;
  gemm_f32(T, w.rows, w.cols, x, w.cols, w.data, w.dtype, w.ld, b.present() ? b.f32() : nullptr, y, w.rows, false,
           &ep);
}

// Per-row statistics of the stream (rstd, and mean for LayerNorm) for the fused path.
void row_stats(const ModelSpec& s, const float* x, int64_t T, float* mean, float* rstd) {
  const int64_t d = s.d_model;
  TensorView xv = TensorView::make(const_cast<float*>(x), DType::F32, {T, d}, Device{}, "x");
  TensorView mv = TensorView::make(mean, DType::F32, {T}, Device{}, "mean");
  TensorView rv = TensorView::make(rstd, DType::F32, {T}, Device{}, "rstd");
  norm_stats(static_cast<NormKind>(s.norm), xv, s.norm_eps, s.norm == 0 ? &mv : nullptr, rv);
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

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
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

  const int64_t d = s.d_model, dq = static_cast<int64_t>(s.n_heads) * s.head_dim,
                dkv = static_cast<int64_t>(s.n_kv_heads) * s.head_dim, f = s.d_ff;
  grow(m.x, T * d); grow(m.xn, T * d); grow(m.q, T * dq); grow(m.k, T * dkv); grow(m.v, T * dkv);
  grow(m.att, T * dq); grow(m.up, T * f);
  if (s.gated_mlp) grow(m.gate, T * f);
  grow(m.pos, T); grow(m.kptr, T); grow(m.vptr, T);
  grow(m.mean, T); grow(m.rstd, T);
  grow(m.scratch, static_cast<size_t>(num_threads()) * ctx_);

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
    const char* er = static_cast<const char*>(E.data) + static_cast<int64_t>(tokens[t]) * E.ld * dtype_size(E.dtype);
    for (int64_t i = 0; i < d; ++i) xr[i] = elem_f32(er, E.dtype, i);
    if (s.learned_pos) {
      const char* pr =
          static_cast<const char*>(m.pos_emb.data) + static_cast<int64_t>(m.pos[t]) * m.pos_emb.ld * dtype_size(m.pos_emb.dtype);
      for (int64_t i = 0; i < d; ++i) xr[i] += elem_f32(pr, m.pos_emb.dtype, i);
    }
  }

  const AttentionTable& K = attn_kernels();
  for (int li = 0; li < s.n_layers; ++li) {
    Layer& L = m.layers[li];
    // ---- attention
    const float* mu = s.norm == 0 ? m.mean.data() : nullptr;
    if (m.fused) {
      row_stats(s, m.x.data(), T, m.mean.data(), m.rstd.data());
      linear_normed(L.q, L.qb, m.x.data(), T, m.q.data(), m.rstd.data(), mu, L.csum_q);
      linear_normed(L.k, L.kb, m.x.data(), T, m.k.data(), m.rstd.data(), mu, L.csum_k);
      linear_normed(L.v, L.vb, m.x.data(), T, m.v.data(), m.rstd.data(), mu, L.csum_v);
    } else {
      norm_rows(s, L.attn_norm_w, L.attn_norm_b, m.x.data(), m.xn.data(), T);
      linear(L.q, L.qb, m.xn.data(), T, m.q.data(), false);
      linear(L.k, L.kb, m.xn.data(), T, m.k.data(), false);
      linear(L.v, L.vb, m.xn.data(), T, m.v.data(), false);
    }
    if (!s.learned_pos) {
      K.rope({T, m.q.data(), dq, s.n_heads, s.head_dim, m.pos.data(), m.rope_cos.data(), m.rope_sin.data()});
      K.rope({T, m.k.data(), dkv, s.n_kv_heads, s.head_dim, m.pos.data(), m.rope_cos.data(), m.rope_sin.data()});
    }
    for (int64_t t = 0; t < T; ++t) {
      const size_t base = (static_cast<size_t>(slot_of[t]) * ctx_) * dkv;
      std::memcpy(&L.kcache[base + static_cast<size_t>(m.pos[t]) * dkv], &m.k[t * dkv], sizeof(float) * dkv);
      std::memcpy(&L.vcache[base + static_cast<size_t>(m.pos[t]) * dkv], &m.v[t * dkv], sizeof(float) * dkv);
      m.kptr[t] = &L.kcache[base];
      m.vptr[t] = &L.vcache[base];
    }
    AttnArgs aa{T, m.q.data(), dq, m.att.data(), dq, m.kptr.data(), m.vptr.data(), m.pos.data(),
                s.n_heads, s.n_kv_heads, s.head_dim, 1.0f / std::sqrt(static_cast<float>(s.head_dim)),
                m.scratch.data(), ctx_};
    K.attention(aa);
    linear(L.o, L.ob, m.att.data(), T, m.x.data(), true);  // x += attn Wo^T + bo
    // ---- MLP
    if (m.fused) {
      row_stats(s, m.x.data(), T, m.mean.data(), m.rstd.data());
      linear_normed(L.up, L.upb, m.x.data(), T, m.up.data(), m.rstd.data(), mu, L.csum_up);
      if (s.gated_mlp) linear_normed(L.gate, L.gateb, m.x.data(), T, m.gate.data(), m.rstd.data(), mu, L.csum_gate);
    } else {
      norm_rows(s, L.mlp_norm_w, L.mlp_norm_b, m.x.data(), m.xn.data(), T);
      linear(L.up, L.upb, m.xn.data(), T, m.up.data(), false);
      if (s.gated_mlp) linear(L.gate, L.gateb, m.xn.data(), T, m.gate.data(), false);
    }
    if (s.gated_mlp) {
      K.activation({static_cast<Act>(s.activation), T, f, m.gate.data(), f, m.up.data(), f, m.up.data(), f});
    } else {
      K.activation({static_cast<Act>(s.activation), T, f, m.up.data(), f, nullptr, 0, m.up.data(), f});
    }
    linear(L.down, L.downb, m.up.data(), T, m.x.data(), true);  // x += act Wd^T + bd
  }

  // ---- head, on the rows asked for
  int64_t rows = all_logits ? T : n_seqs;
  const float* src = m.x.data();
  if (!all_logits) {
    grow(m.sel, rows * d);
    int64_t t = 0;
    for (int i = 0; i < n_seqs; ++i) {
      t += lens[i];
      std::memcpy(&m.sel[i * d], &m.x[(t - 1) * d], sizeof(float) * d);
    }
    src = m.sel.data();
  }
  if (m.fused) {
    row_stats(s, src, rows, m.mean.data(), m.rstd.data());
    linear_normed(m.head, m.head_b, src, rows, logits, m.rstd.data(), s.norm == 0 ? m.mean.data() : nullptr,
                  m.head_csum);
  } else {
    norm_rows(s, m.final_w, m.final_b, src, m.xn.data(), rows);
    linear(m.head, m.head_b, m.xn.data(), rows, logits, false);
  }
  for (int i = 0; i < n_seqs; ++i) m.len[slots[i]] += lens[i];
}

}  // namespace ne
