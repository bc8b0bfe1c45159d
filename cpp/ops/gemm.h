// Internal: the dense linear kernel family (cpp/ops/gemm.cpp, one instance per ISA).
//
// ne::gemm_f32 is the raw contract the native runner calls directly (no views, no checks beyond the
// weight dtype): it computes, for m < M and n < N,
//
//     y[m, n] = sum_k x[m, k] * W[n, k]  (+ bias[n])  (+ y[m, n] if accumulate)
//
// x: M rows of K floats, row stride ldx;  W: N rows of K elements (torch.nn.Linear layout), row stride
// ldw, in F32, BF16 or F16 (widened to float in registers or in a small packed panel, never into a
// W-sized buffer);  bias: N floats or null;  y: M rows of N floats, row stride ldy. Accumulation in
// fp32; with `ep`, a per-row / per-column epilogue (below). Runs on the engine's thread pool; results
// are bitwise identical for any thread count. y must not overlap x or W. Strides are in elements.
// gemv_rows(M, K) (below) streams W once (GEMV); larger M packs W into a per-calling-thread scratch that is
// allocated on first use and reused (so calls from several threads at once are safe).
#pragma once
#include <cstdint>

#include "core/dispatch.h"
#include "normengine/ops.h"
#include "normengine/tensor.h"

namespace ne {

// Optional per-row / per-column epilogue (norm_linear: the norm's statistics applied after the dot
// product). With it, y[m, n] = s_m * (dot[m, n] - mu_m * c_n) + bias[n] (+ y[m, n] if accumulate),
// s = row_scale [M] (null: 1), mu = row_shift [M] (null: 0), c = col_sum [N] (needed with row_shift).
struct GemmEpilogue {
  const float* row_scale = nullptr;
  const float* row_shift = nullptr;
  const float* col_sum = nullptr;
};

// y = x W^T as described above, with
// bf16_products (the "medium" matmul precision, as torch.set_float32_matmul_precision("medium")):
// the caller allows x (after the epilogue's row statistics) and float32 W to be rounded to bfloat16,
// products exact and sums in fp32, on AMX tiles (ops/gemm_bf16_amx.cpp) when the CPU has AMX-BF16, else
// VDPBF16PS dot products when it has AVX512-BF16 (bf16_products_available), f32 or bf16 weights and
// M >= kAmxMinRows; otherwise (decode rows, no bf16 products, f16 weights) the fp32 path runs as if it were false.
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, DType wdtype,
              int64_t ldw, const float* bias, float* y, int64_t ldy, bool accumulate = false,
              const GemmEpilogue* ep = nullptr, bool bf16_products = false);

// ne::linear (ops.h) with an epilogue and the matmul precision: the same checks, then
// gemm_f32(..., ep, bf16_products). ep's arrays are the caller's responsibility (M and N floats).
// CUDA tensors (no ep): cuda::dense_linear, or cuda::bf16_linear for bfloat16 weights under bf16_products.
void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y, const Ctx& ctx,
            const GemmEpilogue* ep, bool bf16_products = false);

// linear()'s argument checks (names in the messages): x's rows, y's rows, N, K and W's row stride.
struct LinearShape {
  RowMatrix x, y;
  int64_t N, K, ldw;
};
LinearShape check_linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& y);
#if defined(NE_WITH_CUDA)
namespace cuda {
struct DenseLinearArgs;
// dense_linear's arguments for checked views (no accumulate, no epilogue)
DenseLinearArgs dense_args(const LinearShape& L, const TensorView& w, const TensorView* bias);
}  // namespace cuda
#endif

// AMX-BF16 usable here (CPU, OS, process permission, and an active ISA of avx512bf16).
bool amx_bf16_available();
// gemm_f32's bf16_products run in bf16 here: AMX-BF16, or the AVX512-BF16 dot products (an active ISA of
// avx512bf16 without AMX: AMD Zen 4, Intel Cooper Lake).
bool bf16_products_available();
// At least this many rows of x for the AMX path (fewer are GEMV-like: bound by streaming W).
constexpr int64_t kAmxMinRows = 16;

// Which rows of x take the GEMV path (stream W once, dot products: the decode step of one sequence or
// a batch) and which the register-blocked GEMM path (W packed panel by panel): up to kGemvAlwaysRows
// rows always (one AVX-512 block of x); up to kGemvMaxRows while the M rows of x fit in kGemvBatchBytes (the blocks of x after
// the first then find W's rows in L1 and x in L1 too; past that, x streams from L2 for every pair of
// W's rows and the GEMM is faster). Measured on a 2-vCPU Xeon guest (benchmarks/RESULTS.md).
constexpr int64_t kGemvAlwaysRows = 8, kGemvMaxRows = 15, kGemvBatchBytes = 32 << 10;
inline bool gemv_rows(int64_t M, int64_t K) {
  return M <= kGemvAlwaysRows || (M <= kGemvMaxRows && M * K * static_cast<int64_t>(sizeof(float)) <= kGemvBatchBytes);
}

struct GemmArgs {
  int64_t M, N, K;
  const float* x;
  int64_t ldx;
  const void* w;
  int64_t ldw;
  const float* bias;  // null: no bias
  float* y;
  int64_t ldy;
  bool accumulate;
  GemmEpilogue ep;    // all null: none
  float* pack;        // GEMM path: table.pack_floats floats per thread, 64-byte aligned,
  int pack_threads;   // for this many threads (the GEMM uses no more)
};

// Index of a weight dtype in the tables: F32, F16, BF16.
inline int gemm_wslot(DType t) { return t == DType::F32 ? 0 : t == DType::F16 ? 1 : 2; }

struct GemmTable {
  void (*gemv[3])(const GemmArgs&);  // gemv_rows(M, K)
  void (*gemm[3])(const GemmArgs&);  // any M
  int64_t pack_floats;               // scratch each thread needs for its packed W panel (floats)
};

// gemm_f32's bf16_products path (AMX-BF16 tiles, else AVX512-BF16 dot products); false (nothing written) when
// neither can take this call.
bool gemm_bf16(const GemmArgs& a, DType wdtype);

#if defined(NE_WITH_CUDA)
namespace cuda {
// The norm of fused norms (norm_linear), applied to x's rows by the GEMM that reads them, so norm(x) is
// never written: x'[m, k] = ((x[m, k] - shift[m]) - shift_lo[m]) * scale[m], a null pointer skipping its
// step. shift = c_hi, shift_lo = c_lo: the LayerNorm mean subtracted in two parts, because a float32 mean
// alone is off by up to half its ulp, as much as the whole spread of a row whose mean is large next to
// it; the statistics give the pair c_hi = x[m, 0], c_lo = mean(x - c_hi) (NormFwdArgs::mean_lo), x - c_hi
// being exact for such rows. scale = rstd. dense_linear subtracts the shift as x is read and applies the
// scale to the sums; bf16_linear applies all of it before rounding x to bfloat16.
struct RowNorm {
  const float *shift = nullptr, *shift_lo = nullptr, *scale = nullptr;
};
// The dense linear layer on the GPU (cuda/gemm.cu; device pointers, enqueued on `stream`):
//   y[m, n] (+)= sum_k x'[m, k] W[n, k] (+ b[n]),   x' = x, or with `norm` the normalized rows above
// x float32 [M, ldx]; W float32 / bfloat16 / float16 [N, K] (row stride ldw), widened in registers; fp32
// FMA sums (no TF32). M <= 16 rows: a GEMV streaming W once; more: tiled FMA GEMMs.
struct DenseLinearArgs {
  int64_t M = 0, N = 0, K = 0;
  const float* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;
  DType wdt = DType::F32;
  int64_t ldw = 0;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  bool accumulate = false;
  RowNorm norm;  // fused norms: [M] each, or null
};
// The arguments of y[M, N] = x W^T (+ b) (no accumulate, no norm epilogue: set those after).
inline DenseLinearArgs dense_args(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, DType wdt,
                                  int64_t ldw, const float* bias, float* y, int64_t ldy) {
  DenseLinearArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.x = x;
  a.ldx = ldx;
  a.w = w;
  a.wdt = wdt;
  a.ldw = ldw;
  a.bias = bias;
  a.y = y;
  a.ldy = ldy;
  return a;
}
void dense_linear(const DenseLinearArgs& a, void* stream);
// norm_linear's GEMM on the GPU, after the row statistics rstd [M] (cuda/norm.cu): y = rstd_m (x W^T) + b
// (RMSNorm, CRMSNorm), or for LayerNorm y = rstd_m ((x - mean_m) W^T) + b with the mean as the pair
// (x[m, 0], mean(x - x[m, 0])) from the statistics kernel again, into stream-ordered scratch (rstd is
// rewritten with the same values). a.norm is ignored.
void norm_linear_gemm(DenseLinearArgs a, NormKind kind, double eps, float* rstd, void* stream);
constexpr int64_t kDenseGemvMaxRows = 16;          // at most this many rows take the GEMV
constexpr int64_t kDenseMaxRows = 65535LL * 64;    // rows one call takes (the tiles' grid.y)
}  // namespace cuda
#endif

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::GemmTable, gemm_table)
