// Internal: argument blocks and per-ISA kernel table of the norm family (cpp/ops/norm.cpp, one
// instance per ISA) and their CUDA twins (cuda/norm.cu). Entry points in ops.h fill these after
// checking their arguments.
#pragma once
#include <cstdint>

#include "core/dispatch.h"
#include "normengine/ops.h"

namespace ne {

// Pointers to per-channel vectors and per-row statistics are f32 (f64 for f64 tensors) and may be
// null where optional.
struct NormFwdArgs {
  NormKind kind;
  RowMatrix x, res, y, res_out;  // res.data / res_out.data null without the fused add
  const void* w;
  const void* b;
  void* mean;
  void* rstd;
  double eps;
  // norm_stats, LayerNorm: with mean_lo, mean receives each row's shift x[0] and mean_lo the rest of its
  // mean, mean(x - x[0]): the mean as an unrounded pair (norm_linear's epilogue subtracts both; x - x[0]
  // is exact for rows whose mean is large next to their spread)
  void* mean_lo;
};

struct NormBwdArgs {
  NormKind kind;
  RowMatrix dy, h, dres, dx;  // dres.data null when no gradient reaches the residual output
  const void* w;
  const void* rstd;
  void* dw;        // [n] or null
  void* db;        // [n] or null
  void* partials;  // CPU: scratch of 2 * partial_threads * n accumulators for dw / db
  int partial_threads;  // (the kernel runs on at most this many threads)
};

struct ChannelArgs {
  RowMatrix x, dy;        // moments: x (and dy, or dy.data null)
  void* out1;             // moments outputs [n]
  void* out2;
  void* partials;         // CPU: scratch of 2 * partial_threads * n accumulators
  int partial_threads;    // (the kernel runs on at most this many threads)
  RowMatrix u, v, out;    // affine: out = a*u + b ; lincomb: out = a*u + b*v  (v.data null for affine)
  const void* a;
  const void* b;
};

// Index of a float dtype in the tables: F32, F16, BF16, F64.
inline int float_slot(DType t) {
  switch (t) {
    case DType::F32: return 0;
    case DType::F16: return 1;
    case DType::BF16: return 2;
    default: return 3;
  }
}

struct NormTable {
  void (*forward[4])(const NormFwdArgs&);
  void (*backward[4])(const NormBwdArgs&);
  void (*moments[4])(const ChannelArgs&);
  void (*affine[4])(const ChannelArgs&);  // handles lincomb when v.data != null
  void (*stats[4])(const NormFwdArgs&);   // rstd (and LayerNorm mean) per row of x only
};

namespace cuda {
// cuda/norm.cu: same contracts, launched on `stream`. Declared here so the CPU entry points can
// route CUDA tensors; defined only in builds with CUDA.
void norm_forward(const NormFwdArgs& a, void* stream);
void norm_backward(const NormBwdArgs& a, void* stream);
void norm_stats(const NormFwdArgs& a, void* stream);  // a.x, a.mean (may be null), a.rstd, a.eps
void channel_moments(const ChannelArgs& a, void* stream);
void channel_affine(const ChannelArgs& a, void* stream);
}  // namespace cuda

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::NormTable, norm_table)
