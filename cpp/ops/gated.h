// Internal: the gated-activation kernels (cpp/ops/gated.cpp, one instance per ISA) and their CUDA twins
// (cuda/activation.cu). The entry points ne::gated_activation / gated_activation_backward (ops.h) check the
// arguments and fill GatedArgs.
#pragma once
#include <cstdint>

#include "core/dispatch.h"
#include "normengine/ops.h"

namespace ne {

struct GatedArgs {
  int act;               // Activation
  RowMatrix a, b;        // b.data null: not gated
  RowMatrix y;           // forward output
  RowMatrix dy, da, db;  // backward (db.data null: no gradient for b)
};

struct GatedTable {
  void (*forward[4])(const GatedArgs&);   // by float_slot: f32, f16, bf16, f64
  void (*backward[4])(const GatedArgs&);
};

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::GatedTable, gated_table)

#if defined(NE_WITH_CUDA)
namespace ne {
namespace cuda {
void gated_forward(const GatedArgs& a, void* stream);
void gated_backward(const GatedArgs& a, void* stream);
}  // namespace cuda
}  // namespace ne
#endif
