// Linear and magnitude-aware attention: the runner's per-sequence step (CPU), and the contract of
// the training kernels. Every op of the family shares one state layout per (batch, head):
//
//   S'_t = lambda S'_{t-1} + [f(k_t); 1] [v_t; 1]^T            [Dk + 1, Dv + 1] float32
//
// so S'[:Dk, :Dv] = S = sum f(k) v^T, S'[:Dk, Dv] = z = sum f(k), S'[Dk, :Dv] = sum v and
// S'[Dk, Dv] = t (tokens seen); f = phi (elu+1 / relu / identity) for linear attention and MALA,
// identity for norm attention; lambda = decay[h] for norm attention, 1 otherwise. Readouts:
//   linear:  o_t = S^T phi(q_t) / (phi(q_t) . z + eps)           (or S^T phi(q_t) unnormalized)
//   MALA:    n = t, c = Dk^-1/2, zq = c phi(q_t) . z / n, beta = 1 + 1 / (zq + eps),
//            o_t = beta (c / n) S^T phi(q_t) - zq (sum v) / n    (the engine's causal form of MALA)
//   norm:    o_t = Norm(S^T q_t) over the Dv channels of the head (RMS or LayerNorm, no affine)
// Python: normengine.ops.linear_attention / mala_attention / norm_attention; the pure-torch
// formulas: normengine.reference.linear_attention.
#pragma once
#include <cstdint>

#include "core/dispatch.h"
#include "normengine/ops.h"
#include "normengine/tensor.h"

namespace ne {
enum class LinAttnKind : int { Linear = 0, Mala = 1, Norm = 2 };
enum class FeatureMap : int { Elu1 = 0, Relu = 1, Identity = 2 };
// Which algorithm the CUDA kernels run (the CPU training kernels are always chunked): Chunk, the
// chunkwise-parallel form (cuda/linear_attention_chunk.cu; falls back to Recurrent only where no chunk
// fits in shared memory), or Recurrent, the token-serial version-1 kernels (cuda/linear_attention.cu).
enum class LinAttnAlgorithm : int { Chunk = 0, Recurrent = 1 };
struct LinAttnParams {
  LinAttnKind kind = LinAttnKind::Linear;
  FeatureMap fmap = FeatureMap::Elu1;  // Linear only (MALA: always Elu1; Norm: always Identity)
  bool causal = true;
  bool normalize = true;               // Linear only
  int out_norm = 0;                    // Norm only: 0 rms, 1 layer
  float eps = 1e-6f;
  LinAttnAlgorithm algorithm = LinAttnAlgorithm::Chunk;  // CUDA kernels only (see above)
};
// The runner's raw entry: T consecutive tokens of ONE sequence, causal, continuing from and updating `state`
// ([n_heads, dk+1, dv+1] float32). q [T, n_heads*dk] (row stride ldq), k [T, n_kv_heads*dk], v [T, n_kv_heads*dv]
// (query head h reads kv head h / (n_heads / n_kv_heads)), o [T, n_heads*dv]. Token by token (the recurrent form:
// O(T (Dk+1)(Dv+1)) per head, which for decode is the whole cost); multithreaded over heads.
struct LinAttnSeqArgs {
  LinAttnParams p;
  int64_t T; int n_heads, n_kv_heads, dk, dv;
  const float* q; int64_t ldq;
  const float* k; int64_t ldk;
  const float* v; int64_t ldv;
  const float* decay;  // [n_heads] or null
  float* state;
  float* o; int64_t ldo;
};
void linear_attention_sequence(const LinAttnSeqArgs& a);

// The training kernels on CPU tensors (chunkwise-parallel, C = 64 tokens per chunk, float32
// accumulation; cpp/ops/linear_attention_entry.cpp + the per-ISA kernels of
// cpp/ops/linear_attention_train.cpp). The contract of ne::cuda::linear_attention_forward/backward
// below: q, k [B, T, H, Dk], v [B, T, H, Dv] float32 / bfloat16 / float16 with unit stride in the last
// dim (any strides elsewhere), o / grad_* [B, T, H, *] in q's dtype (unit last-dim stride), decay [H]
// float32 or null (norm attention, causal only), states [B, H, Dk+1, Dv+1] float32 contiguous or null.
// Backward keeps only q, k, v and the initial state: it recomputes one state per chunk in a forward
// sweep, then walks the chunks backwards carrying the gradient of the state. Multithreaded over B*H.
void linear_attention_forward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView* decay, const TensorView* initial_state, const TensorView& o,
                              const TensorView* final_state);
void linear_attention_backward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView* decay, const TensorView* initial_state, const TensorView& grad_o,
                               const TensorView* grad_final_state, const TensorView& grad_q, const TensorView& grad_k,
                               const TensorView& grad_v, const TensorView* grad_initial_state);

// Internal: the per-ISA kernel table of the CPU training kernels (checked arguments, one element type
// for q, k, v, o and the gradients; strides in elements over (b, t, h), unit stride in the last dim).
struct LinAttnTrainArgs {
  LinAttnParams p;
  int64_t B = 0, T = 0;
  int H = 0, Dk = 0, Dv = 0;
  DType dtype = DType::F32;
  struct View { void* data = nullptr; int64_t sb = 0, st = 0, sh = 0; };
  View q, k, v;
  View o;                              // forward output
  View go, gq, gk, gv;                 // backward
  const float* decay = nullptr;        // [H] or null
  const float* init = nullptr;         // [B, H, Dk+1, Dv+1] or null (zeros)
  float* fin = nullptr;                // forward: final state, or null
  const float* gfin = nullptr;         // backward: gradient of the final state, or null (zeros)
  float* ginit = nullptr;              // backward: gradient of the initial state, or null
};
struct LinAttnTrainTable {
  // (batch * H + head) pairs [bh0, bh1), each independent of the others
  void (*forward)(const LinAttnTrainArgs& a, int64_t bh0, int64_t bh1);
  void (*backward)(const LinAttnTrainArgs& a, int64_t bh0, int64_t bh1);
};

#if defined(NE_WITH_CUDA)
// The training kernels on CUDA tensors (cuda/linear_attention.cu): q, k [B, T, H, Dk], v [B, T, H, Dv]
// (unit stride in the last dim), o [B, T, H, Dv] contiguous in q's dtype, decay [H] float32 or null,
// states [B, H, Dk+1, Dv+1] float32 contiguous or null. Backward recomputes the states from q, k, v
// and the initial state. Enqueued on `stream`. (CPU tensors: ne::linear_attention_forward/backward above.)
namespace cuda {
void linear_attention_forward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView* decay, const TensorView* initial_state, const TensorView& o,
                              const TensorView* final_state, void* stream);
void linear_attention_backward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView* decay, const TensorView* initial_state, const TensorView& grad_o,
                               const TensorView* grad_final_state, const TensorView& grad_q, const TensorView& grad_k,
                               const TensorView& grad_v, const TensorView* grad_initial_state, void* stream);

// The CUDA runner's entry (cuda/runner.cu), the twin of linear_attention_sequence for every sequence of
// a call at once: the rows of n_seqs sequences stacked as the runner stacks them, sequence i holding
// rows last[i-1] + 1 .. last[i] (last[-1] = -1), causal, each sequence continuing from and updating
// the state of its slot, state + (slot * n_heads + h) (dk+1) (dv+1) floats for head h, where slot =
// slot_of_row[first row]. A sequence whose first row has pos == 0 starts from a zero state instead
// (so resetting a slot needs no device work). GQA: query head h reads kv head h / (n_heads /
// n_kv_heads). last, slot_of_row and pos are device int32 arrays; everything float32, device memory.
// Token by token (the recurrent kernel), except, when the host arrays are given and there is no GQA,
// sequences of kChunkMinRows rows or more: those take the chunkwise-parallel kernels of the training
// op (cuda/linear_attention_chunk.cu), from and back into the slot's state, one launch each.
struct LinAttnRowsArgs {
  LinAttnParams p;
  int n_seqs = 0, n_heads = 0, n_kv_heads = 0, dk = 0, dv = 0;
  const int32_t* last = nullptr;         // [n_seqs]
  const int32_t* slot_of_row = nullptr;  // [rows]
  const int32_t* pos = nullptr;          // [rows]
  const float* q = nullptr; int64_t ldq = 0;
  const float* k = nullptr; int64_t ldk = 0;
  const float* v = nullptr; int64_t ldv = 0;
  const float* decay = nullptr;  // [n_heads] or null
  float* state = nullptr;
  float* o = nullptr; int64_t ldo = 0;
  // host copies (all or none): each sequence's rows, slot and first position
  const int32_t* host_lens = nullptr;
  const int32_t* host_slots = nullptr;
  const int32_t* host_pos0 = nullptr;
};
constexpr int kChunkMinRows = 64;
void linear_attention_rows(const LinAttnRowsArgs& a, void* stream);
}  // namespace cuda
#endif
}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::LinAttnTrainTable, linear_attention_train_table)
