// Gated activations of an MLP, forward and backward (compiled once per ISA), elementwise over rows:
//   y  = act(a) * b                      (not gated: y = act(a))
//   da = dy * b * act'(a)                (not gated: dy * act'(a))
//   db = dy * act(a)
// act and act' from ops/activation_math.h, in float32 lanes (double for float64 tensors); 16-bit tensors are
// widened on load and rounded to nearest even on store. The backward recomputes act(a) from a: nothing but
// the inputs is kept between the passes. The runner's MLP activation (ops/attention.cpp) is the forward here too.
#include <cstdint>
#include <string>

#include "core/parallel.h"
#include "core/simd.h"
#include "normengine/errors.h"
#include "normengine/ops.h"
#include "ops/activation_math.h"
#include "ops/gated.h"
#include "ops/norm.h"

namespace ne {
namespace NE_ISA_NS {
namespace {

using actmath::R;
constexpr int N = VF::N;

int64_t grain(int64_t n) { return n >= 4096 ? 1 : 4096 / (n > 0 ? n : 1); }

template <class T>
void forward(const GatedArgs& g) {
  const Act act = static_cast<Act>(g.act);
  const int64_t n = g.a.cols;
  parallel_for(g.a.rows, grain(n), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* a = g.a.row<const T>(r);
      const T* b = g.b.data ? g.b.row<const T>(r) : nullptr;
      T* y = g.y.row<T>(r);
      for (int64_t i = 0; i < n; i += N) {
        const int k = n - i < N ? static_cast<int>(n - i) : N;
        R v = actmath::act(act, loadn<VF>(a + i, k));
        if (b) v = VF::mul(v, loadn<VF>(b + i, k));
        storen<VF>(y + i, v, k);
      }
    }
  });
}

template <class T>
void backward(const GatedArgs& g) {
  const Act act = static_cast<Act>(g.act);
  const int64_t n = g.a.cols;
  parallel_for(g.a.rows, grain(n), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* a = g.a.row<const T>(r);
      const T* b = g.b.data ? g.b.row<const T>(r) : nullptr;
      const T* dy = g.dy.row<const T>(r);
      T* da = g.da.row<T>(r);
      T* db = g.db.data ? g.db.row<T>(r) : nullptr;
      for (int64_t i = 0; i < n; i += N) {
        const int k = n - i < N ? static_cast<int>(n - i) : N;
        R y;
        const R d = actmath::act_grad(act, loadn<VF>(a + i, k), y);
        const R gy = loadn<VF>(dy + i, k);
        if (b) {
          storen<VF>(da + i, VF::mul(VF::mul(gy, loadn<VF>(b + i, k)), d), k);
          if (db) storen<VF>(db + i, VF::mul(gy, y), k);
        } else {
          storen<VF>(da + i, VF::mul(gy, d), k);
        }
      }
    }
  });
}

void forward_f64(const GatedArgs& g) {
  const Act act = static_cast<Act>(g.act);
  for (int64_t r = 0; r < g.a.rows; ++r) {
    const double* a = g.a.row<const double>(r);
    const double* b = g.b.data ? g.b.row<const double>(r) : nullptr;
    double* y = g.y.row<double>(r);
    for (int64_t i = 0; i < g.a.cols; ++i) {
      double d;
      const double v = actmath::act1(act, a[i], d);
      y[i] = b ? v * b[i] : v;
    }
  }
}

void backward_f64(const GatedArgs& g) {
  const Act act = static_cast<Act>(g.act);
  for (int64_t r = 0; r < g.a.rows; ++r) {
    const double* a = g.a.row<const double>(r);
    const double* b = g.b.data ? g.b.row<const double>(r) : nullptr;
    const double* dy = g.dy.row<const double>(r);
    double* da = g.da.row<double>(r);
    double* db = g.db.data ? g.db.row<double>(r) : nullptr;
    for (int64_t i = 0; i < g.a.cols; ++i) {
      double d;
      const double v = actmath::act1(act, a[i], d);
      da[i] = b ? dy[i] * b[i] * d : dy[i] * d;
      if (db) db[i] = dy[i] * v;
    }
  }
}

}  // namespace

const GatedTable* gated_table() {
  static const GatedTable table = {
      {forward<float>, forward<f16>, forward<bf16>, forward_f64},
      {backward<float>, backward<f16>, backward<bf16>, backward_f64},
  };
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne

#if defined(NE_ISA_GENERIC)
// ==================================================================================== entry points
namespace ne {
namespace {

void check_act(Activation act) {
  const int k = static_cast<int>(act);
  if (k < 0 || k > 3)
    throw ValueError("activation: expected 0 (gelu_tanh), 1 (gelu), 2 (silu) or 3 (relu), got " + std::to_string(k));
}
const GatedTable& table() { return *NE_PICK_ISA(gated_table); }

}  // namespace

void gated_activation(Activation act, const TensorView& a, const TensorView* b, const TensorView& y,
                      const Ctx& ctx) {
  check_act(act);
  check_float(a);
  GatedArgs g{};
  g.act = static_cast<int>(act);
  g.a = as_rows(a);
  if (b) g.b = rows_like(*b, a);
  g.y = rows_like(y, a);
  if (a.device.type == DeviceType::CUDA) {
#if defined(NE_WITH_CUDA)
    return cuda::gated_forward(g, ctx.cuda_stream);
#else
    throw_no_cuda(a);
#endif
  }
  (void)ctx;
  table().forward[float_slot(a.dtype)](g);
}

void gated_activation_backward(Activation act, const TensorView& dy, const TensorView& a, const TensorView* b,
                               const TensorView& da, const TensorView* db, const Ctx& ctx) {
  check_act(act);
  check_float(a);
  GatedArgs g{};
  g.act = static_cast<int>(act);
  g.a = as_rows(a);
  g.dy = rows_like(dy, a);
  g.da = rows_like(da, a);
  if (b) g.b = rows_like(*b, a);
  if (db) {
    if (!b) throw ShapeError(std::string(db->name) + ": a gradient for b without b");
    g.db = rows_like(*db, a);
  }
  if (a.device.type == DeviceType::CUDA) {
#if defined(NE_WITH_CUDA)
    return cuda::gated_backward(g, ctx.cuda_stream);
#else
    throw_no_cuda(a);
#endif
  }
  (void)ctx;
  table().backward[float_slot(a.dtype)](g);
}

}  // namespace ne
#endif  // NE_ISA_GENERIC
