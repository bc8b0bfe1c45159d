// The native transformer runner: weights handed over once (zero-copy views), a KV cache per
// sequence slot, batched prefill and decode, sampling. Python's normengine.Model drives it; the C++
// benchmarks use it directly.
//
// Canonical tensor names are those of python/normengine/config.py (tok_emb.weight,
// blocks.{i}.attn.q.weight, ...). Linear weights may be float32, bfloat16 or float16 ([out, in]);
// norm weights and biases are float32; embeddings any float type.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "normengine/ops.h"

namespace ne {

struct ModelSpec {
  int vocab = 0, d_model = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, d_ff = 0;
  int max_seq_len = 0;
  int norm = 0;            // 0 LayerNorm, 1 RMSNorm, 2 CRMSNorm, -1 none (NormKind values)
  double norm_eps = 1e-5;
  int activation = 0;      // 0 gelu_tanh, 1 gelu, 2 silu, 3 relu
  bool gated_mlp = false;
  bool learned_pos = false;
  double rope_theta = 10000.0;
  // Partial rotary embeddings (GPT-NeoX / Pythia): only each head's first rope_dim values rotate, in
  // pairs (i, i + rope_dim / 2); the rest pass through. 0: all head_dim.
  int rope_dim = 0;
  // Parallel residual (GPT-NeoX): x += attention(norm1(x)) + mlp(norm2(x)), both branches reading the
  // block's input, instead of the MLP reading x after the attention's add.
  bool parallel_residual = false;
  // RoPE frequencies: rope_dim / 2 values inv_freq_i, angle = pos * inv_freq_i (float32). Empty: the
  // plain ones, 1 / theta^(2i / head_dim). Python computes them for the scaled variants (linear,
  // llama3, yarn: normengine/rope.py), as Hugging Face does in float32.
  std::vector<float> rope_inv_freq;
  // Multiplies every cos and sin (YaRN's attention factor; 1 otherwise): q and k each scaled by it.
  double rope_attn_factor = 1.0;
  // Per-head RMSNorm of q and k (Qwen3): after the projections (and their biases), before RoPE,
  // x_h <- x_h / sqrt(mean(x_h^2) + norm_eps) * g over each head's head_dim values, with gains
  // blocks.{i}.attn.q_norm.weight / k_norm.weight [head_dim] float32. Needs RoPE (not learned_pos).
  bool qk_norm = false;
  // RoPE of the sliding-window layers (Gemma 3's local layers: another theta): their own inv_freq
  // (head_dim / 2 values) and cos / sin factor. Empty: every layer uses rope_inv_freq.
  std::vector<float> rope_inv_freq_local;
  double rope_attn_factor_local = 1.0;
  // Gemma: token embeddings multiplied by emb_scale on lookup (sqrt(d_model); not the tied head);
  // attention scores by attn_scale (0: 1 / sqrt(head_dim)).
  double emb_scale = 1.0;
  double attn_scale = 0.0;
  // Sandwich norms (Gemma 2 / 3): each block's attention and MLP outputs are RMS-normalized before
  // they are added to the stream, x += RMSNorm(o) * g, with gains blocks.{i}.attn_post_norm.weight /
  // mlp_post_norm.weight [d_model] float32 (eps norm_eps).
  bool post_norms = false;
  // Logit soft-capping (Gemma 2): attention scores s -> c tanh(s / c) after scaling, before the mask and
  // softmax (attn_softcap), and the head's logits likewise (final_softcap). 0: none.
  double attn_softcap = 0.0, final_softcap = 0.0;
  bool qkv_bias = false, o_bias = false, mlp_bias = false, head_bias = false;
  // Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): n_experts > 0 makes the MLP of every layer that
  // moe_layers marks (empty: every layer) a router and n_experts gated MLPs of moe_d_ff units. For each token,
  // p = softmax(norm(x) Wr^T) over the experts; the n_experts_used largest p_e pick the experts (ties: the lower
  // index), their p_e renormalized to sum 1 when moe_norm_topk; the MLP's output is sum_e p_e expert_e(norm(x)).
  // shared_d_ff > 0 (Qwen2-MoE) adds a shared gated MLP of that width, gated per token by
  // sigmoid(norm(x) . w_sg). Tensors: blocks.{i}.moe.router.weight [n_experts, d],
  // blocks.{i}.moe.experts.{e}.gate / up [moe_d_ff, d], .down [d, moe_d_ff], blocks.{i}.moe.shared.gate / up /
  // down, blocks.{i}.moe.shared_gate.weight [1, d]. The other layers keep the dense MLP (d_ff).
  int n_experts = 0, n_experts_used = 0, moe_d_ff = 0, shared_d_ff = 0;
  bool moe_norm_topk = true;
  std::vector<int> moe_layers;
  // Attention type per layer (AttnType values); empty: every layer softmax. Softmax layers keep a KV
  // cache that grows with the context; the linear family keeps one fixed-size state per sequence:
  // [n_heads, head_dim + 1, head_dim + 1] floats (ops/linear_attention.h), whatever the length.
  std::vector<int> attention;
  // Sliding-window attention per layer (Mistral, Qwen2 / Qwen3 with use_sliding_window): window[i] = W > 0
  // makes softmax layer i's query at position p see keys p - W + 1 .. p only (W keys, itself included);
  // 0: every key 0 .. p. Empty: no layer windowed. The CPU runner keeps such a layer's K / V in a ring of
  // W + kPrefillChunk rows (when that is less than the context); the CUDA runner, whole-context caches.
  std::vector<int> window;
  int linear_feature_map = 0;     // linear layers: 0 elu+1, 1 relu, 2 identity (FeatureMap)
  bool linear_normalize = true;   // linear layers: divide by phi(q) . z
  int norm_attention_norm = 0;    // norm-attention layers: 0 RMS, 1 LayerNorm (no affine) over each head
  double linear_eps = 1e-6;
  // Arithmetic (L-Mul, ops/lmul.h): 0 exact; 1 every attention product (q.k, p.v) an L-Mul;
  // 2 every matmul of the model (projections, MLP, head too; needs float32 weights).
  int lmul_scope = 0;
  int lmul_bits = 4;
  // Matmul precision "medium": dense projections may round their operands to bfloat16 (fp32 sums) on
  // AMX-BF16 tiles, for 16+ rows at a time (ops/gemm.h gemm_f32's bf16_products). false: fp32 products.
  bool bf16_products = false;
  // KV cache in bfloat16 (rounded to nearest even as the rows are written; attention sums in fp32):
  // half the cache's memory and of the bytes a decode step reads from it. CPU runner, exact
  // arithmetic only. false: float32 cache.
  bool kv_bf16 = false;
  // KV cache in int8 with a float32 scale per row and kv head (absmax: s = max_d |x_d| / 127, x_d ~ s round(x_d / s),
  // quantized as the rows are written; attention sums in fp32): a quarter of the float32 cache's memory and of
  // the bytes a decode step reads from it. CPU and CUDA runners, exact arithmetic only; not with kv_bf16.
  bool kv_int8 = false;
};

enum class AttnType : int { Softmax = 0, Linear = 1, Mala = 2, Norm = 3 };

struct SamplingParams {
  float temperature = 0.f;  // 0: greedy (argmax)
  int top_k = 0;            // 0: all
  float top_p = 1.f;        // 1: all
  float min_p = 0.f;        // 0: all; else only tokens with p >= min_p * (the top token's p), after top_k / top_p
};

// Two-level scales of a packed weight (ops/quant_gemm.h QWeight::sub; GGUF K-quants): sub int8 [N, K / group],
// sub_zero int8 [N, K / group] or null, `super` groups a super-block; scale (and zero: the super-blocks' offsets)
// then hold one float32 per super-block, [N, K / (group * super)]. CPU runner only (the CUDA one takes them
// expanded to a scale per group: normengine's QuantizedWeight.to).
struct SubScales {
  const TensorView* sub = nullptr;
  const TensorView* sub_zero = nullptr;
  int64_t super = 0;
};

class Runner {
 public:
  // Caches hold `ctx` positions for each of `slots` sequences (ctx <= max_seq_len).
  Runner(const ModelSpec& spec, int slots, int ctx);
  ~Runner();

  // Hand over a weight; its memory must outlive the runner (the Python Model keeps it).
  void set_tensor(const std::string& name, const TensorView& t);
  // Hand over a quantized linear weight (ops/quant_gemm.h QWeight layouts; format a QFormat value):
  // data int8 [N, K] (int8 formats), uint8 [N, K/2] (int4) or uint8 [N, K] (fp8 E4M3); scale and zero
  // float32 as QWeight documents (zero null: symmetric; sub: two-level scales). Any linear weight, the head,
  // and the token embedding (rows dequantized on lookup; a tied model hands the head's tensors under both names).
  void set_quant_tensor(const std::string& name, int format, const TensorView& data, const TensorView& scale,
                        const TensorView* zero, int64_t group, const SubScales& sub = {});
  // Checks every required tensor is present (throws naming the first missing one).
  void finalize();

  // Append tokens to sequences and compute logits. For sequence i: lens[i] tokens (taken in order
  // from `tokens`), appended to slot slots[i]'s cache. logits: [rows, vocab] float32 where rows is
  // sum(lens) when all_logits, else n_seqs (the last token of each sequence). The tokens run through
  // the layers kPrefillChunk rows at a time (a sequence cut between two chunks goes on from its cache
  // in the next), so the activation buffers stay that size however long the prompt.
  void forward(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
               bool all_logits);
  static constexpr int64_t kPrefillChunk = 512;

  // True when every norm has unit gain and zero bias (folded): norm + linear then run fused
  // (norm_linear: statistics in the GEMM epilogue). Known after finalize().
  bool fused_norms() const;

  void reset(int slot);  // forget a sequence
  int length(int slot) const;
  // Keep only the first n tokens of slot's sequence (prompt caching: a new prompt that shares them goes
  // on from there). False, and nothing changed, where the caches cannot go back: a linear-family layer's
  // state (it summed the later tokens in), or a sliding-window ring whose rows of the last kept tokens'
  // keys the later ones overwrote (more than kPrefillChunk dropped).
  bool truncate(int slot, int n);
  int slots() const { return n_slots_; }
  int ctx() const { return ctx_; }
  const ModelSpec& spec() const { return spec_; }
  // Bytes of per-sequence memory: the softmax layers' KV caches (slots x ctx positions) plus the
  // linear-family layers' fixed-size states (slots x n_heads x (head_dim + 1)^2 floats).
  size_t cache_bytes() const;

 private:
  struct Layer;
  struct Impl;
  // forward on validated input of at most kPrefillChunk tokens. ends: null when every sequence's
  // last token is in this call (logits as forward's); else ends[i] says whether sequence i's piece is
  // its last, and (all_logits false) logits receives one row per piece that is.
  void run_rows(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
                bool all_logits, const bool* ends);
  ModelSpec spec_;
  int n_slots_, ctx_;
  std::unique_ptr<Impl> impl_;
};

#if defined(NE_WITH_CUDA)
// The same runner on a CUDA GPU (cuda/runner.cu): the same spec, tensor names and checks, with
// weights in device memory (zero-copy: views of CUDA tensors on `device`, kept alive by the
// caller), the softmax layers' KV caches [slots][ctx][n_kv_heads * head_dim] (float32, bfloat16 with
// spec.kv_bf16, or int8 with its scales with spec.kv_int8), the linear-family layers' states
// [slots][n_heads][(head_dim + 1)^2] float32 and the activations in device memory owned by the runner. L-Mul
// arithmetic (spec.lmul_scope) holds a row of ctx attention scores in shared memory, which bounds ctx
// (UnsupportedError beyond). slots / tokens /
// lens stay host arrays; logits is a device float32 pointer [rows, vocab]. Everything of a call is enqueued on `stream` (null: the legacy default
// stream); forward returns without waiting for the GPU, except that a mixture-of-experts layer waits for its
// router's logits (the host routes and groups the rows per expert, as the CPU runner does).
class CudaRunner {
 public:
  // device < 0: the current CUDA device. Throws DeviceError when no GPU is visible.
  CudaRunner(const ModelSpec& spec, int slots, int ctx, int device = -1);
  ~CudaRunner();
  CudaRunner(const CudaRunner&) = delete;
  CudaRunner& operator=(const CudaRunner&) = delete;

  void set_tensor(const std::string& name, const TensorView& t);
  // A packed linear weight or token embedding (as Runner::set_quant_tensor; every part on this
  // runner's device): projections run cuda::quant_linear (cuda/quant_gemm.cu), embedding rows are
  // dequantized on lookup.
  void set_quant_tensor(const std::string& name, int format, const TensorView& data, const TensorView& scale,
                        const TensorView* zero, int64_t group, const SubScales& sub = {});
  void finalize();
  void forward(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
               bool all_logits, void* stream = nullptr);
  // As Runner's: every norm's gain 1 and bias 0 (folded), every reader dense and exact: each norm runs as
  // row statistics plus its readers' GEMM epilogue (norm_linear). Known after finalize().
  bool fused_norms() const;

  void reset(int slot);
  int length(int slot) const;
  bool truncate(int slot, int n);  // as Runner's (no rings here: false only with linear-family layers)
  int slots() const { return n_slots_; }
  int ctx() const { return ctx_; }
  int device() const;
  const ModelSpec& spec() const { return spec_; }

 private:
  struct Layer;
  struct Impl;
  ModelSpec spec_;
  int n_slots_, ctx_;
  std::unique_ptr<Impl> impl_;
};
#endif

// Next token from one row of logits: greedy at temperature 0, else softmax(logits / T) restricted
// to the top_k most likely and then to the smallest set whose probability reaches top_p.
int sample_token(const float* logits, int vocab, const SamplingParams& p, std::mt19937_64& rng);

}  // namespace ne
