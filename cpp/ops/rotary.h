// Internal: the rotary-embedding kernels of the training op (cpp/ops/rotary.cpp, one instance per ISA) and their
// CUDA twin (cuda/rotary.cu). The entry point ne::rotary_embedding (ops.h) checks the arguments and fills RotaryArgs.
#pragma once
#include <cstdint>

#include "core/dispatch.h"
#include "normengine/ops.h"

namespace ne {

struct RotaryArgs {
  RowMatrix x, y;        // [rows, D]; y may be x
  const void* cos;       // [P, R] contiguous: float32 (float64 for float64 x)
  const void* sin;
  const int64_t* crow;   // [rows]: the cos / sin row of each x row
  int64_t R;             // rotated width (even, <= D); the rest of each row is copied
  int64_t n_positions;   // P: the tables' rows
  bool backward;         // the transposed rotation (the gradient)
};

struct RotaryTable {
  void (*rows[4])(const RotaryArgs&);  // by float_slot: f32, f16, bf16, f64
};

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::RotaryTable, rotary_table)

#if defined(NE_WITH_CUDA)
namespace ne {
namespace cuda {
void rotary(const RotaryArgs& a, void* stream);
}  // namespace cuda
}  // namespace ne
#endif
