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
  bool qkv_bias = false, o_bias = false, mlp_bias = false, head_bias = false;
};

struct SamplingParams {
  float temperature = 0.f;  // 0: greedy (argmax)
  int top_k = 0;            // 0: all
  float top_p = 1.f;        // 1: all
};

class Runner {
 public:
  // Caches hold `ctx` positions for each of `slots` sequences (ctx <= max_seq_len).
  Runner(const ModelSpec& spec, int slots, int ctx);
  ~Runner();

  // Hand over a weight; its memory must outlive the runner (the Python Model keeps it).
  void set_tensor(const std::string& name, const TensorView& t);
  // Checks every required tensor is present (throws naming the first missing one).
  void finalize();

  // Append tokens to sequences and compute logits. For sequence i: lens[i] tokens (taken in order
  // from `tokens`), appended to slot slots[i]'s cache. logits: [rows, vocab] float32 where rows is
  // sum(lens) when all_logits, else n_seqs (the last token of each sequence).
  void forward(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
               bool all_logits);

  // True when every norm has unit gain and zero bias (folded): norm + linear then run fused
  // (norm_linear: statistics in the GEMM epilogue). Known after finalize().
  bool fused_norms() const;

  void reset(int slot);  // forget a sequence
  int length(int slot) const;
  int slots() const { return n_slots_; }
  int ctx() const { return ctx_; }
  const ModelSpec& spec() const { return spec_; }

 private:
  struct Layer;
  struct Impl;
  ModelSpec spec_;
  int n_slots_, ctx_;
  std::unique_ptr<Impl> impl_;
};

#if defined(NE_WITH_CUDA)
// The same runner on a CUDA GPU (cuda/runner.cu): the same spec, tensor names and checks, with
// weights in device memory (zero-copy: views of CUDA tensors on `device`, kept alive by the
// caller), the KV cache [slots][ctx][n_kv_heads * head_dim] float32 and the activations in device
// memory owned by the runner. slots / tokens / lens stay host arrays; logits is a device float32
// pointer [rows, vocab]. Everything of a call is enqueued on `stream` (null: the legacy default
// stream); forward returns without waiting for the GPU.
class CudaRunner {
 public:
  // device < 0: the current CUDA device. Throws DeviceError when no GPU is visible.
  CudaRunner(const ModelSpec& spec, int slots, int ctx, int device = -1);
  ~CudaRunner();
  CudaRunner(const CudaRunner&) = delete;
  CudaRunner& operator=(const CudaRunner&) = delete;

  void set_tensor(const std::string& name, const TensorView& t);
  void finalize();
  void forward(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
               bool all_logits, void* stream = nullptr);
  // Runner's query; the CUDA runner runs norm and linear as separate kernels: always false.
  bool fused_norms() const { return false; }

  void reset(int slot);
  int length(int slot) const;
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
