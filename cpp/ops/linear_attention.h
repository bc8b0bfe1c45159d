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

#include "normengine/ops.h"
#include "normengine/tensor.h"

namespace ne {
enum class LinAttnKind : int { Linear = 0, Mala = 1, Norm = 2 };
enum class FeatureMap : int { Elu1 = 0, Relu = 1, Identity = 2 };
struct LinAttnParams {
  LinAttnKind kind = LinAttnKind::Linear;
  FeatureMap fmap = FeatureMap::Elu1;  // Linear only (MALA: always Elu1; Norm: always Identity)
  bool causal = true;
  bool normalize = true;               // Linear only
  int out_norm = 0;                    // Norm only: 0 rms, 1 layer
  float eps = 1e-6f;
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

#if defined(NE_WITH_CUDA)
// The training kernels on CUDA tensors (cuda/linear_attention.cu): q, k [B, T, H, Dk], v [B, T, H, Dv]
// (unit stride in the last dim), o [B, T, H, Dv] contiguous in q's dtype, decay [H] float32 or null,
// states [B, H, Dk+1, Dv+1] float32 contiguous or null. Backward recomputes the states from q, k, v
// and the initial state. Enqueued on `stream`. (The CPU path of the ops is a torch composition.)
namespace cuda {
void linear_attention_forward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView* decay, const TensorView* initial_state, const TensorView& o,
                              const TensorView* final_state, void* stream);
void linear_attention_backward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView* decay, const TensorView* initial_state, const TensorView& grad_o,
                               const TensorView* grad_final_state, const TensorView& grad_q, const TensorView& grad_k,
                               const TensorView& grad_v, const TensorView* grad_initial_state, void* stream);
}  // namespace cuda
#endif
}  // namespace ne
