// Every op's forward/backward entry point. Each takes views of caller-owned memory (outputs too:
// nothing here allocates a tensor-sized buffer), checks its arguments (throwing ne::*Error naming the
// argument), and runs the CPU kernel for the best ISA of this machine or the CUDA kernel, chosen by
// the inputs' device.
//
// Dtype rule for the norm family: x, residual, y, dy, dx share one dtype (f32, f16, bf16, f64);
// per-channel vectors (weight, bias, their gradients) and per-row statistics (mean, rstd) are f32,
// or f64 when x is f64. All accumulation is in f32 (f64 for f64 inputs).
#pragma once
#include "normengine/tensor.h"

namespace ne {

// Where CUDA kernels run: the caller's stream (torch's current stream from Python). Ignored on CPU.
struct Ctx {
  void* cuda_stream = nullptr;
};

// ---------------------------------------------------------------- runtime
const char* cpu_isa();  // "avx512bf16", "avx512", "avx2" or "generic": the kernels in use on this CPU
void force_cpu_isa(const char* isa);  // testing: use a lower ISA's kernels ("avx2", "generic")
int num_threads();
void set_num_threads(int n);      // n <= 0: one per available core
bool built_with_cuda();
bool cuda_available();            // built with CUDA and a device is visible

// ---------------------------------------------------------------- normalization
enum class NormKind : int {
  LayerNorm = 0,  // y = (x - mean(x)) / sqrt(var(x) + eps) * w + b
  RMSNorm = 1,    // y = x / sqrt(mean(x^2) + eps) * w
  CRMSNorm = 2,   // x: first d-1 coords of a zero-mean d-vector (d = n + 1):
                  // y = x / sqrt((sum x^2 + (sum x)^2) / d + eps) * w
};

// y = norm(h) with h = x (+ residual). With `residual`, h is also written to `residual_out`
// (x + residual in x's dtype, the value the norm then reads), in one pass over memory.
// weight, bias: [n] or null. mean, rstd: [rows] or null (mean only for LayerNorm).
void norm_forward(NormKind kind, const TensorView& x, const TensorView* residual,
                  const TensorView* weight, const TensorView* bias, double eps,
                  const TensorView& y, const TensorView* residual_out, const TensorView* mean,
                  const TensorView* rstd, const Ctx& ctx = {});

// Row statistics of x alone: rstd [rows] (and mean [rows] for LayerNorm, or null), as
// norm_forward computes them, without writing the normalized rows (norm_linear's first step).
void norm_stats(NormKind kind, const TensorView& x, double eps, const TensorView* mean, const TensorView& rstd,
                const Ctx& ctx = {});

// Gradients of y = norm(h) * w + b given dy, the normalized input h and the saved rstd.
// dx = dnorm/dh . dy (+ dresidual: the gradient reaching residual_out, for the fused add).
// dweight, dbias ([n], accumulator dtype): written (not accumulated into), or null when not needed.
void norm_backward(NormKind kind, const TensorView& dy, const TensorView& h,
                   const TensorView* weight, const TensorView& rstd, const TensorView* dresidual,
                   const TensorView& dx, const TensorView* dweight, const TensorView* dbias,
                   const Ctx& ctx = {});

// ---------------------------------------------------------------- per-channel ops (Unified Norm)
// Column reductions over the rows of x [rows, n]:
//   dy == null: out1[c] = sum_r x[r,c]^2
//   dy != null: out1[c] = sum_r x[r,c] * dy[r,c],  out2[c] = sum_r dy[r,c]  (out2 may be null)
// Outputs [n] in the accumulator dtype.
void channel_moments(const TensorView& x, const TensorView* dy, const TensorView& out1,
                     const TensorView* out2, const Ctx& ctx = {});
// y[r,c] = a[c] * x[r,c] (+ b[c])
void channel_affine(const TensorView& x, const TensorView& a, const TensorView* b,
                    const TensorView& y, const Ctx& ctx = {});
// out[r,c] = a[c] * u[r,c] + b[c] * v[r,c]
void channel_lincomb(const TensorView& u, const TensorView& a, const TensorView& v,
                     const TensorView& b, const TensorView& out, const Ctx& ctx = {});

// ---------------------------------------------------------------- dense linear
// y[..., n] = sum_k x[..., k] * w[n, k] (+ bias[n])      (torch.nn.functional.linear)
// x [..., K] float32 (rows readable as one row stride: contiguous or a column slice); w [N, K]
// float32, bfloat16 or float16 with unit stride along K (any row stride >= K); bias [N] float32 or
// null; y [..., N] float32. Accumulation in float32; 16-bit weights are widened in registers.
// CPU only for now (CUDA tensors: UnsupportedError). The runner calls the raw kernel
// ne::gemm_f32 (cpp/ops/gemm.h) directly.
void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y,
            const Ctx& ctx = {});

// ---------------------------------------------------------------- norm fused into linear
// y = norm(x) w^T + bias with the norm's per-row statistics applied in the GEMM epilogue
// (cpp/ops/norm_linear.cpp): norm(x) is never written. The norm has no gain/bias (fold them into
// w and bias). x float32 [..., K]; rstd [rows] and, for LayerNorm, mean [rows] float32 outputs;
// col_sum [N] = w.sum(1) for LayerNorm (null: computed). CPU (CUDA: UnsupportedError).
// bf16_products: the "medium" matmul precision (ops/gemm.h gemm_f32): on AMX-BF16 the statistics
// normalize x as it is rounded to bf16 for the tiles, instead of in the epilogue.
void norm_linear(NormKind kind, const TensorView& x, const TensorView& w, const TensorView* bias, double eps,
                 const TensorView* col_sum, const TensorView& y, const TensorView* mean, const TensorView& rstd,
                 const Ctx& ctx = {}, bool bf16_products = false);

// ---------------------------------------------------------------- gated activations (an MLP's)
enum class Activation : int { GeluTanh = 0, Gelu = 1, Silu = 2, Relu = 3 };
// y = act(a) * b, or act(a) without b (cpp/ops/gated.cpp). a, b, y: one float dtype and shape, rows readable
// with one stride; math in float32 (float64 for float64).
void gated_activation(Activation act, const TensorView& a, const TensorView* b, const TensorView& y,
                      const Ctx& ctx = {});
// da = dy * b * act'(a) (dy * act'(a) without b), db = dy * act(a) (db may be null). act(a) recomputed.
void gated_activation_backward(Activation act, const TensorView& dy, const TensorView& a, const TensorView* b,
                               const TensorView& da, const TensorView* db, const Ctx& ctx = {});

// ---------------------------------------------------------------- rotary position embedding (training op)
// y = rotate(x) per row ("rotate half": y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 over the first R values, the rest
// copied), c / s = cos / sin row crow[r] of the [P, R] tables (float32; float64 for float64 x); backward: the
// transposed map (the gradient). x, y: one dtype and shape (y may be x); crow: int64 [rows] (cpp/ops/rotary.cpp).
void rotary_embedding(const TensorView& x, const TensorView& cos, const TensorView& sin, const TensorView& crow,
                      const TensorView& y, bool backward, const Ctx& ctx = {});

// ---------------------------------------------------------------- cross-entropy
// Per row r of logits z [rows, V] (float32 or float64) with target t = target[r] (int64 [rows]) and label
// smoothing s (cpp/ops/cross_entropy.cpp):
//   loss[r] = logsumexp(z) - (1 - s) z_t - (s / V) sum_j z_j
//   grad[r, j] = scale * row_scale[r] * (softmax(z)_j - s / V - (1 - s) [j == t])     (grad may be logits)
// A row whose target is ignore_index: loss 0, gradient row 0; another target outside [0, V): ValueError
// naming it (CPU; the CUDA kernel writes NaN there, the Python op checks first). loss, lse, row_scale:
// [rows] in z's dtype; lse (log-sum-exp per row), grad and row_scale optional.
void cross_entropy(const TensorView& logits, const TensorView& target, int64_t ignore_index, double label_smoothing,
                   const TensorView& loss, const TensorView* lse, const TensorView* grad,
                   const TensorView* row_scale, double scale, const Ctx& ctx = {});

}  // namespace ne
