// Rotary position embedding as a training op, forward and backward (compiled once per ISA), "rotate half"
// pairing as in Llama / transformers' apply_rotary_pos_emb. Per row x of width D, with c, s its cos / sin row
// of width R (c = [c1, c2], s = [s1, s2], halves of R / 2; transformers repeats one half, any halves work):
//   forward:   y1 = x1 c1 - x2 s1,    y2 = x2 c2 + x1 s2
//   backward:  dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1         (the transposed map)
// and y[R:] = x[R:] (partial rotary). Math in float32 lanes (double for float64 rows).
#include <cstdint>
#include <string>

#include "core/parallel.h"
#include "core/simd.h"
#include "normengine/errors.h"
#include "normengine/ops.h"
#include "ops/norm.h"
#include "ops/rotary.h"

namespace ne {
namespace NE_ISA_NS {
namespace {

using R = VF::R;
constexpr int N = VF::N;

template <class T>
void rows_f(const RotaryArgs& a) {
  const int64_t h = a.R / 2, D = a.x.cols;
  parallel_for(a.x.rows, D >= 2048 ? 1 : 2048 / (D > 0 ? D : 1), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = a.x.row<const T>(r);
      T* y = a.y.row<T>(r);
      const float* c = static_cast<const float*>(a.cos) + a.crow[r] * a.R;
      const float* s = static_cast<const float*>(a.sin) + a.crow[r] * a.R;
      for (int64_t i = 0; i < h; i += N) {
        const int k = h - i < N ? static_cast<int>(h - i) : N;
        const R x1 = loadn<VF>(x + i, k), x2 = loadn<VF>(x + h + i, k);
        const R c1 = loadn<VF>(c + i, k), c2 = loadn<VF>(c + h + i, k);
        const R s1 = loadn<VF>(s + i, k), s2 = loadn<VF>(s + h + i, k);
        if (!a.backward) {
          storen<VF>(y + i, VF::sub(VF::mul(x1, c1), VF::mul(x2, s1)), k);
          storen<VF>(y + h + i, VF::fma(x1, s2, VF::mul(x2, c2)), k);
        } else {
          storen<VF>(y + i, VF::fma(x2, s2, VF::mul(x1, c1)), k);
          storen<VF>(y + h + i, VF::sub(VF::mul(x2, c2), VF::mul(x1, s1)), k);
        }
      }
      if (y != x)
        for (int64_t i = a.R; i < D; ++i) y[i] = x[i];
    }
  });
}

void rows_f64(const RotaryArgs& a) {
  const int64_t h = a.R / 2, D = a.x.cols;
  for (int64_t r = 0; r < a.x.rows; ++r) {
    const double* x = a.x.row<const double>(r);
    double* y = a.y.row<double>(r);
    const double* c = static_cast<const double*>(a.cos) + a.crow[r] * a.R;
    const double* s = static_cast<const double*>(a.sin) + a.crow[r] * a.R;
    for (int64_t i = 0; i < h; ++i) {
      const double x1 = x[i], x2 = x[h + i];
      if (!a.backward) {
        y[i] = x1 * c[i] - x2 * s[i];
        y[h + i] = x2 * c[h + i] + x1 * s[h + i];
      } else {
        y[i] = x1 * c[i] + x2 * s[h + i];
        y[h + i] = x2 * c[h + i] - x1 * s[i];
      }
    }
    if (y != x)
      for (int64_t i = a.R; i < D; ++i) y[i] = x[i];
  }
}

}  // namespace

const RotaryTable* rotary_table() {
  static const RotaryTable table = {{rows_f<float>, rows_f<f16>, rows_f<bf16>, rows_f64}};
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne

#if defined(NE_ISA_GENERIC)
// ==================================================================================== entry point
namespace ne {

void rotary_embedding(const TensorView& x, const TensorView& cos, const TensorView& sin, const TensorView& crow,
                      const TensorView& y, bool backward, const Ctx& ctx) {
  check_float(x);
  RotaryArgs a{};
  a.x = as_rows(x);
  a.y = rows_like(y, x);
  const DType acc = x.dtype == DType::F64 ? DType::F64 : DType::F32;
  for (const TensorView* t : {&cos, &sin}) {
    check_same_device(x, *t);
    check_dtype(*t, acc);
    if (t->ndim != 2 || !t->is_contiguous())
      throw ShapeError(std::string(t->name) + ": expected a contiguous [positions, rotary dims] table, got " +
                       shape_str(*t));
  }
  check_same_shape(cos, sin);
  a.R = cos.shape[1];
  if (a.R % 2 != 0 || a.R > a.x.cols)
    throw ShapeError(std::string(cos.name) + ": its width " + std::to_string(a.R) + " must be even and at most " +
                     std::string(x.name) + "'s last dimension " + std::to_string(a.x.cols));
  check_same_device(x, crow);
  check_dtype(crow, DType::I64);
  if (crow.numel() != a.x.rows || !crow.is_contiguous())
    throw ShapeError(std::string(crow.name) + ": expected one int64 per row of " + x.name + " (" +
                     std::to_string(a.x.rows) + "), got shape " + shape_str(crow));
  a.cos = cos.data;
  a.sin = sin.data;
  a.n_positions = cos.shape[0];
  a.crow = static_cast<const int64_t*>(crow.data);
  a.backward = backward;
  if (x.device.type == DeviceType::CUDA) {
#if defined(NE_WITH_CUDA)
    return cuda::rotary(a, ctx.cuda_stream);
#else
    throw_no_cuda(x);
#endif
  }
  (void)ctx;
  // the table rows the CPU kernel will read: every crow entry inside it (a bad index must not read memory)
  const int64_t P = cos.shape[0];
  for (int64_t r = 0; r < a.x.rows; ++r)
    if (a.crow[r] < 0 || a.crow[r] >= P)
      throw ValueError(std::string(crow.name) + "[" + std::to_string(r) + "] = " + std::to_string(a.crow[r]) +
                       ": outside the " + std::to_string(P) + " rows of " + cos.name);
  NE_PICK_ISA(rotary_table)->rows[float_slot(x.dtype)](a);
}

}  // namespace ne
#endif  // NE_ISA_GENERIC
