// Internal: the cross-entropy row kernel (cpp/ops/cross_entropy.cpp, one instance per ISA) and its CUDA twin
// (cuda/cross_entropy.cu). The entry point ne::cross_entropy (ops.h) checks the arguments and fills CeArgs.
#pragma once
#include <cstdint>

#include "core/dispatch.h"
#include "normengine/ops.h"

namespace ne {

struct CeArgs {
  RowMatrix z;           // logits [rows, V], float32 or float64
  const int64_t* target;  // [rows]
  int64_t ignore_index;
  double smoothing;      // label smoothing s in [0, 1]
  void* loss;            // [rows], z's dtype
  void* lse;             // [rows] or null
  RowMatrix grad;        // [rows, V] or data null; may be z itself
  const void* row_scale;  // [rows] (z's dtype) or null
  double scale;
  int64_t* bad_row;      // CPU: set to the first row whose target is out of range (else left at -1)
};

struct CeTable {
  void (*rows_f32)(const CeArgs& a, int64_t r0, int64_t r1);
  void (*rows_f64)(const CeArgs& a, int64_t r0, int64_t r1);
};

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::CeTable, ce_table)

#if defined(NE_WITH_CUDA)
namespace ne {
namespace cuda {
// The same rows on the GPU (one block per row); an out-of-range target gives a NaN loss and a NaN gradient
// row there (the Python op checks targets before launching).
void cross_entropy(const CeArgs& a, void* stream);
}  // namespace cuda
}  // namespace ne
#endif
