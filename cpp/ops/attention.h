// Internal: causal softmax attention over a KV cache, and rotary position embedding (CPU kernels in
// cpp/ops/attention.cpp, one instance per ISA).
#pragma once
#include <cmath>
#include <cstdint>

#include "core/dispatch.h"
#include "core/half.h"

// The key range and soft-capping formulas below are host and device code under nvcc: the CUDA runner's
// kernels (cuda/runner.cu) use the same definitions.
#if defined(__CUDACC__)
#define NE_ATT_HD __host__ __device__ __forceinline__
#else
#define NE_ATT_HD inline
#endif

namespace ne {

// Each query row t (a token of some sequence) attends to rows first(t)..pos[t] of its own sequence's
// cache: first(t) = 0, or with a sliding window W > 0, max(0, pos[t] - W + 1) (W keys, itself included).
struct AttnArgs {
  int64_t n_tokens;
  const float* q;            // [n_tokens, n_heads * head_dim], row stride ldq
  int64_t ldq;
  float* out;                // [n_tokens, n_heads * head_dim], row stride ldo
  int64_t ldo;
  const float* const* k;     // per token: its sequence's K cache [ctx, n_kv_heads * head_dim]
  const float* const* v;     // per token: its sequence's V cache, same layout
  const int32_t* pos;        // per token: its position; keys 0..pos are visible (causal)
  int n_heads, n_kv_heads, head_dim;
  float scale;               // 1 / sqrt(head_dim)
  // bf16 caches (ModelSpec::kv_bf16): when set, these are read instead of k / v (same layout)
  const bf16* const* k16 = nullptr;
  const bf16* const* v16 = nullptr;
  // int8 caches (ModelSpec::kv_int8), same layout, with their scales [rows][n_kv_heads] per token: key row r of kv
  // head g holds k8[r][g D + d] * ks[r][g] (likewise V): when set, these are read instead of k / v
  const int8_t* const* k8 = nullptr;
  const int8_t* const* v8 = nullptr;
  const float* const* ks = nullptr;
  const float* const* vs = nullptr;
  int window = 0;            // sliding window W (0: every key 0..pos)
  int64_t ring = 0;          // R > 0: the caches are rings of R rows, key position j in row j % R
  float softcap = 0.f;       // c > 0: scores s = scale q.k become c tanh(s / c) before the softmax (Gemma 2)
};

// Soft-capping (Gemma 2): s -> c tanh(s / c), as transformers computes it in float32.
NE_ATT_HD float softcap(float s, float c) { return c * tanhf(s / c); }

// Soft-capping of n scores in place (c > 0; c = 0: none).
inline void softcap_scores(float* s, int64_t n, float c) {
  if (c > 0)
    for (int64_t i = 0; i < n; ++i) s[i] = softcap(s[i], c);
}

// Keys j0, j0 + 1, ... of a cache that are back to back in memory, at most n: all n, or up to the end of a
// ring of R rows (R 0: no ring).
inline int64_t contiguous_keys(int64_t j0, int64_t n, int64_t R) { return R > 0 && R - j0 % R < n ? R - j0 % R : n; }
// The row of key position j in a cache of ring R (0: no ring).
inline int64_t key_row(int64_t j, int64_t R) { return R > 0 ? j % R : j; }

// The first key position query position `pos` sees under window w (0: none).
NE_ATT_HD int64_t first_key(int64_t pos, int w) { return w > 0 && pos + 1 > w ? pos + 1 - w : 0; }

// Rotary embedding, "rotate half" pairing (i, i + D/2) as in Llama:
//   x'[i] = x[i] cos(a) - x[i + D/2] sin(a),  x'[i + D/2] = x[i + D/2] cos(a) + x[i] sin(a)
// with a = pos * inv_freq[i]; cos/sin come from a table [max_pos, D/2] built once per model. Partial
// rotary (rot_dim R < D): the same over the first R values with R/2 in place of D/2; the rest stay.
struct RopeArgs {
  int64_t n_tokens;
  float* x;                  // [n_tokens, n_heads * head_dim], in place
  int64_t ldx;
  int n_heads, head_dim;
  const int32_t* pos;
  const float* cos;          // [max_pos, head_dim / 2]
  const float* sin;
  // Optional per-head RMSNorm before the rotation (Qwen3's q_norm / k_norm):
  //   x_h <- x_h / sqrt(mean_i(x_h[i]^2) + norm_eps) * norm_w   over each head's head_dim values
  const float* norm_w = nullptr;  // [head_dim], or null: rotation only
  float norm_eps = 0.f;
  int rot_dim = 0;                // partial rotary: pairs (i, i + rot_dim / 2), i < rot_dim / 2; 0: head_dim
};

enum class Act : int { GeluTanh = 0, Gelu = 1, Silu = 2, Relu = 3 };

// out = act(a)  or, gated, out = act(a) * b ; rows of n, row strides lda/ldb/ldo
struct ActArgs {
  Act act;
  int64_t rows, n;
  const float* a; int64_t lda;
  const float* b; int64_t ldb;  // null: not gated
  float* out; int64_t ldo;
};

struct AttentionTable {
  void (*attention)(const AttnArgs&);
  void (*rope)(const RopeArgs&);
  void (*activation)(const ActArgs&);
  // one token's K or V into an int8 KV cache, head by head (rows of D): q = round(x / s) with
  // scale[h] = s = max |x| / 127 of its row (0 for zeros, NaN for a row holding NaN or Inf)
  void (*quantize_int8)(const float* x, int n_heads, int D, int8_t* q, float* scale);
};

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::AttentionTable, attention_table)
