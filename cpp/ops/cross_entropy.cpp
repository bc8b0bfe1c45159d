// Cross-entropy of logit rows, loss and gradient in one visit of each row (compiled once per ISA).
//
// For a row z of V logits with target t and label smoothing s:
//   m    = max_j z_j
//   lse  = m + log sum_j exp(z_j - m)                                   (log-sum-exp, shifted by the max)
//   loss = lse - (1 - s) z_t - (s / V) sum_j z_j                        (= -(1-s) log p_t - (s/V) sum_j log p_j)
//   grad_j = c * (exp(z_j - m) / sum - s / V - (1 - s) [j == t])        (c = scale * row_scale[r])
// A row whose target is ignore_index has loss 0 and a zero gradient row. The gradient may overwrite the
// logits in place (pass 2 keeps exp(z_j - m) where z_j was; z_t and sum z are read before it).
#include <cmath>
#include <cstdint>
#include <string>

#include "core/parallel.h"
#include "core/simd.h"
#include "normengine/errors.h"
#include "normengine/ops.h"
#include "ops/cross_entropy.h"

namespace ne {
namespace NE_ISA_NS {
namespace {

// Row r's target t; false when the row is done here: an ignored row (loss 0, lse 0, gradient 0), or a target
// outside [0, V) (loss and gradient NaN, the row recorded in bad_row for the entry point to report).
template <class A>
bool row_target(const CeArgs& a, int64_t r, int64_t& t) {
  const int64_t V = a.z.cols;
  t = a.target[r];
  const bool ignored = t == a.ignore_index;
  if (!ignored && t >= 0 && t < V) return true;
  if (!ignored && a.bad_row) __atomic_store_n(a.bad_row, r, __ATOMIC_RELAXED);
  const A fill = ignored ? A(0) : A(NAN);
  static_cast<A*>(a.loss)[r] = fill;
  if (ignored && a.lse) static_cast<A*>(a.lse)[r] = A(0);
  if (a.grad.data) {
    A* g = a.grad.row<A>(r);
    for (int64_t j = 0; j < V; ++j) g[j] = fill;
  }
  return false;
}

// float32 rows, VF lanes
void rows_f32(const CeArgs& a, int64_t r0, int64_t r1) {
  using R = VF::R;
  constexpr int N = VF::N;
  const int64_t V = a.z.cols;
  const float s = static_cast<float>(a.smoothing);
  for (int64_t r = r0; r < r1; ++r) {
    const float* z = a.z.row<const float>(r);
    float* g = a.grad.data ? a.grad.row<float>(r) : nullptr;
    float* loss = static_cast<float*>(a.loss) + r;
    float* lse_out = a.lse ? static_cast<float*>(a.lse) + r : nullptr;
    int64_t t;
    if (!row_target<float>(a, r, t)) continue;
    // pass 1: the max (and sum z for smoothing)
    R mx = VF::set1(-INFINITY);
    double zsum = 0.0;
    float m = -INFINITY;
    {
      R acc = VF::zero();
      int64_t j = 0;
      for (; j + N <= V; j += N) {
        R v = VF::load(z + j);
        mx = VF::max(v, mx);  // (a NaN z_j is dropped here; pass 2 brings it back through exp)
        if (s != 0.f) acc = VF::add(acc, v);
      }
      alignas(64) float lanes[N];
      VF::store(lanes, mx);
      for (int i = 0; i < N; ++i) m = lanes[i] > m ? lanes[i] : m;
      for (; j < V; ++j) { m = z[j] > m ? z[j] : m; zsum += z[j]; }
      zsum += VF::reduce(acc);
      mx = VF::set1(m);
    }
    const float zt = z[t];
    // pass 2: sum exp(z - m), exp kept in g
    double esum = 0.0;
    {
      R acc = VF::zero();
      int64_t j = 0;
      for (; j + N <= V; j += N) {
        R e = vexp(VF::sub(VF::load(z + j), mx));
        acc = VF::add(acc, e);
        if (g) VF::store(g + j, e);
      }
      if (j < V) {
        const int k = static_cast<int>(V - j);
        R e = VF::keep(vexp(VF::sub(VF::load(z + j, k), mx)), k);
        acc = VF::add(acc, e);
        if (g) VF::store(g + j, e, k);
      }
      esum = VF::reduce(acc);
    }
    const double lse = m + std::log(esum);
    *loss = static_cast<float>(lse - (1.0 - s) * zt - (s != 0.f ? s / static_cast<double>(V) * zsum : 0.0));
    if (lse_out) *lse_out = static_cast<float>(lse);
    if (!g) continue;
    // pass 3: grad = c * (e / sum - s / V), then - c (1 - s) at the target
    const double c = a.scale * (a.row_scale ? static_cast<const float*>(a.row_scale)[r] : 1.0f);
    const R mulv = VF::set1(static_cast<float>(c / esum));
    const R subv = VF::set1(static_cast<float>(c * s / static_cast<double>(V)));
    int64_t j = 0;
    for (; j + N <= V; j += N) VF::store(g + j, VF::sub(VF::mul(VF::load(g + j), mulv), subv));
    if (j < V) {
      const int k = static_cast<int>(V - j);
      VF::store(g + j, VF::sub(VF::mul(VF::load(g + j, k), mulv), subv), k);
    }
    g[t] -= static_cast<float>(c * (1.0 - s));
  }
}

// float64 rows (gradcheck), one element at a time
void rows_f64(const CeArgs& a, int64_t r0, int64_t r1) {
  const int64_t V = a.z.cols;
  const double s = a.smoothing;
  for (int64_t r = r0; r < r1; ++r) {
    const double* z = a.z.row<const double>(r);
    double* g = a.grad.data ? a.grad.row<double>(r) : nullptr;
    double* loss = static_cast<double*>(a.loss) + r;
    double* lse_out = a.lse ? static_cast<double*>(a.lse) + r : nullptr;
    int64_t t;
    if (!row_target<double>(a, r, t)) continue;
    double m = -INFINITY, zsum = 0.0, esum = 0.0;
    bool nan = false;
    for (int64_t j = 0; j < V; ++j) { m = z[j] > m ? z[j] : m; zsum += z[j]; nan |= z[j] != z[j]; }
    if (nan) m = NAN;
    const double zt = z[t];
    for (int64_t j = 0; j < V; ++j) {
      const double e = std::exp(z[j] - m);
      esum += e;
      if (g) g[j] = e;
    }
    const double lse = m + std::log(esum);
    *loss = lse - (1.0 - s) * zt - s / static_cast<double>(V) * zsum;
    if (lse_out) *lse_out = lse;
    if (!g) continue;
    const double c = a.scale * (a.row_scale ? static_cast<const double*>(a.row_scale)[r] : 1.0);
    for (int64_t j = 0; j < V; ++j) g[j] = c * (g[j] / esum - s / static_cast<double>(V));
    g[t] -= c * (1.0 - s);
  }
}

}  // namespace

const CeTable* ce_table() {
  static const CeTable table = {rows_f32, rows_f64};
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne

#if defined(NE_ISA_GENERIC)
// ==================================================================================== entry point
namespace ne {

void cross_entropy(const TensorView& logits, const TensorView& target, int64_t ignore_index, double label_smoothing,
                   const TensorView& loss, const TensorView* lse, const TensorView* grad,
                   const TensorView* row_scale, double scale, const Ctx& ctx) {
  if (logits.dtype != DType::F32 && logits.dtype != DType::F64)
    throw DTypeError(std::string(logits.name) + ": expected float32 or float64 logits, got " +
                     dtype_name(logits.dtype));
  if (logits.ndim != 2)
    throw ShapeError(std::string(logits.name) + ": expected [rows, vocab], got " + shape_str(logits));
  CeArgs a{};
  a.z = as_rows(logits);
  const int64_t rows = a.z.rows, V = a.z.cols;
  if (V < 1) throw ShapeError(std::string(logits.name) + ": the vocabulary dimension is empty");
  check_same_device(logits, target);
  check_dtype(target, DType::I64);
  if (target.numel() != rows || !target.is_contiguous())
    throw ShapeError(std::string(target.name) + ": expected " + std::to_string(rows) +
                     " contiguous int64 targets (one per row of " + logits.name + "), got shape " + shape_str(target));
  auto row_vec = [&](const TensorView& v) {
    check_same_device(logits, v);
    check_dtype(v, logits.dtype);
    if (v.numel() != rows || !v.is_contiguous())
      throw ShapeError(std::string(v.name) + ": expected " + std::to_string(rows) + " contiguous elements, got shape " +
                       shape_str(v));
  };
  row_vec(loss);
  if (lse) row_vec(*lse);
  if (row_scale) row_vec(*row_scale);
  if (grad) a.grad = rows_like(*grad, logits);
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0))
    throw ValueError("label_smoothing: expected a number in [0, 1], got " + std::to_string(label_smoothing));
  a.target = static_cast<const int64_t*>(target.data);
  a.ignore_index = ignore_index;
  a.smoothing = label_smoothing;
  a.loss = loss.data;
  a.lse = lse ? lse->data : nullptr;
  a.row_scale = row_scale ? row_scale->data : nullptr;
  a.scale = scale;
  if (logits.device.type == DeviceType::CUDA) {
#if defined(NE_WITH_CUDA)
    return cuda::cross_entropy(a, ctx.cuda_stream);
#else
    throw_no_cuda(logits);
#endif
  }
  (void)ctx;
  int64_t bad = -1;
  a.bad_row = &bad;
  const CeTable& t = *NE_PICK_ISA(ce_table);
  auto fn = logits.dtype == DType::F32 ? t.rows_f32 : t.rows_f64;
  parallel_for(rows, V >= 4096 ? 1 : (4096 + V - 1) / V, [&](int64_t r0, int64_t r1, int) { fn(a, r0, r1); });
  if (bad >= 0)
    throw ValueError(std::string(target.name) + "[" + std::to_string(bad) + "] = " +
                     std::to_string(a.target[bad]) + ": outside [0, " + std::to_string(V) +
                     ") and not ignore_index (" + std::to_string(ignore_index) + ")");
}

}  // namespace ne
#endif  // NE_ISA_GENERIC
