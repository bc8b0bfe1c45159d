// Weight quantization for the packed formats of ops/quant_gemm.h (int8 per output channel, int4 per
// group along K): the arithmetic of normengine.ops.quantize_weight (python/normengine/ops/quant.py),
// in float64 like it, threaded over rows. Loading a large checkpoint with quant= spends its time here.
//
// int8:  s = max_k |w[n, k]| / 127,  q = round_half_even(w / s) clamped to [-127, 127]  (s = 0: q = 0);
//        int8-weight with groups: the same per group of g columns (s[n, k / g])
// int4, per group of g columns (16 levels, two per byte: low nibble k = 2j, high k = 2j + 1):
//   symmetric:  for c in {1.0, 0.975, ..., 0.8}: s_c = amax * c / 7.5,
//               err_c = sum_k ((clamp(floor(w / s_c), -8, 7) + 0.5) s_c - w)^2;
//               s = the first s_c of least err, q = clamp(floor(w / s), -8, 7) + 8   (w ~ (q - 7.5) s)
//   asymmetric: lo = min(min w, 0), hi = max(max w, 0); for (a, b) in {1, .95, .9, .85, .8}^2:
//               s = (hi b - lo a) / 15, z = clamp(round(-lo a / s), 0, 15),
//               q = clamp(round(w / s) + z, 0, 15), err = sum_k ((q - z) s - w)^2; the first (s, z)
//               of least err                                                        (w ~ (q - z) s)
// A zero scale (an all-zero group) divides by 1 instead. "The first of least err": a later candidate
// replaces the best only if its error is smaller by more than a relative 1e-12 (kBetter). Sums run in
// order over the group, the Python reference sums with torch's reductions; candidates whose errors
// tie exactly (it happens: fp16 groups, clip pairs that scale s and every level alike) differ in the
// last bits between the two, and without the margin the two would pick different scales (whose float32
// roundings then differ).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/half.h"
#include "core/parallel.h"
#include "normengine/errors.h"
#include "ops/quant_gemm.h"

namespace ne {
namespace {

// Round to nearest, ties to even (torch.round), for |x| < 2^51: adding and subtracting 1.5 * 2^52
// leaves x rounded to an integer in the default rounding mode; plain arithmetic, where libm's
// nearbyint is a call on baseline x86-64 (measured: 1.6x faster asymmetric int4 search). floor stays
// libm's (the arithmetic form with its compare measured 2x slower there).
inline double round_even(double x) { return (x + 6755399441055744.0) - 6755399441055744.0; }
inline double clamp(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }
constexpr double kBetter = 1.0 - 1e-12;  // err < best * kBetter: better beyond rounding

template <class T>
bool row_to_f64(const T* w, int64_t K, double* out) {
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    out[k] = static_cast<double>(to_f32(w[k]));
    finite &= std::isfinite(out[k]);
  }
  return finite;
}

void int8_row(const double* w, int64_t K, int8_t* q, float* s) {
  double amax = 0.0;
  for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(w[k]));
  const double sb = amax / 127.0, safe = sb > 0.0 ? sb : 1.0;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(clamp(round_even(w[k] / safe), -127.0, 127.0));
  *s = static_cast<float>(sb);
}

// One group of g weights -> g levels 0..15 in lv, its scale (and zero point).
void int4_group(const double* w, int g, bool symmetric, uint8_t* lv, float* s, float* z) {
  if (symmetric) {
    double amax = 0.0;
    for (int k = 0; k < g; ++k) amax = std::fmax(amax, std::fabs(w[k]));
    double best_err = 0.0, best_s = 0.0;
    for (int i = 0; i < 9; ++i) {
      const double sc = amax * (1.0 - 0.025 * i) / 7.5, safe = sc > 0.0 ? sc : 1.0;
      double err = 0.0;
      for (int k = 0; k < g; ++k) {
        const double e = (clamp(std::floor(w[k] / safe), -8.0, 7.0) + 0.5) * safe - w[k];
        err += e * e;
      }
      if (i == 0 || err < best_err * kBetter) best_err = err, best_s = sc;
    }
    const double safe = best_s > 0.0 ? best_s : 1.0;
    for (int k = 0; k < g; ++k) lv[k] = static_cast<uint8_t>(clamp(std::floor(w[k] / safe), -8.0, 7.0) + 8.0);
    *s = static_cast<float>(best_s);
    return;
  }
  static constexpr double kClips[5] = {1.0, 0.95, 0.9, 0.85, 0.8};
  double lo = 0.0, hi = 0.0;
  for (int k = 0; k < g; ++k) lo = std::fmin(lo, w[k]), hi = std::fmax(hi, w[k]);
  double best_err = 0.0, best_s = 0.0, best_z = 0.0;
  bool first = true;
  for (double a : kClips)
    for (double b : kClips) {
      const double sc = (hi * b - lo * a) / 15.0, safe = sc > 0.0 ? sc : 1.0;
      const double zc = clamp(round_even(-lo * a / safe), 0.0, 15.0);
      double err = 0.0;
      for (int k = 0; k < g; ++k) {
        const double qc = clamp(round_even(w[k] / safe) + zc, 0.0, 15.0);
        const double e = (qc - zc) * safe - w[k];
        err += e * e;
      }
      if (first || err < best_err * kBetter) best_err = err, best_s = sc, best_z = zc;
      first = false;
    }
  const double safe = best_s > 0.0 ? best_s : 1.0;
  for (int k = 0; k < g; ++k) lv[k] = static_cast<uint8_t>(clamp(round_even(w[k] / safe) + best_z, 0.0, 15.0));
  *s = static_cast<float>(best_s);
  *z = static_cast<float>(best_z);
}

template <class T>
void quantize_rows(const T* w, int64_t ldw, int64_t N, int64_t K, QFormat fmt, int group, bool symmetric,
                   void* data, float* scale, float* zero, std::atomic<bool>* finite) {
  parallel_for(N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t n0, int64_t n1, int) {
    thread_local std::vector<double> row;
    thread_local std::vector<uint8_t> lv;
    row.resize(static_cast<size_t>(K));
    lv.resize(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      if (!row_to_f64(w + n * ldw, K, row.data())) {
        finite->store(false, std::memory_order_relaxed);
        continue;
      }
      if (fmt == QFormat::Int4) {
        const int64_t G = K / group;
        for (int64_t gi = 0; gi < G; ++gi)
          int4_group(row.data() + gi * group, group, symmetric, lv.data() + gi * group, scale + n * G + gi,
                     zero ? zero + n * G + gi : nullptr);
        uint8_t* q = static_cast<uint8_t*>(data) + n * (K / 2);
        for (int64_t j = 0; j < K / 2; ++j) q[j] = static_cast<uint8_t>(lv[2 * j] | (lv[2 * j + 1] << 4));
      } else if (group > 0) {  // int8-weight with a scale per group of columns
        const int64_t G = K / group;
        for (int64_t gi = 0; gi < G; ++gi)
          int8_row(row.data() + gi * group, group, static_cast<int8_t*>(data) + n * K + gi * group, scale + n * G + gi);
      } else {
        int8_row(row.data(), K, static_cast<int8_t*>(data) + n * K, scale + n);
      }
    }
  });
}

}  // namespace

bool quantize_weight_rows(const void* w, DType wdtype, int64_t ldw, int64_t N, int64_t K, QFormat fmt, int group,
                          bool symmetric, void* data, float* scale, float* zero) {
  if (fmt != QFormat::Int4 && fmt != QFormat::Int8 && fmt != QFormat::Int8Weight)
    throw ValueError("quantize_weight_rows: int8, int8-weight or int4 only");
  if (fmt == QFormat::Int4 && (group != 32 && group != 64 && group != 128))
    throw ValueError("quantize_weight_rows: int4 group size must be 32, 64 or 128");
  if (fmt == QFormat::Int8 && group != 0) throw ValueError("quantize_weight_rows: int8 (W8A8) takes no group size");
  if (fmt == QFormat::Int8Weight && group != 0 && group != 16 && group != 32 && group != 64 && group != 128)
    throw ValueError("quantize_weight_rows: int8-weight group size must be 0 (per row), 16, 32, 64 or 128");
  if ((fmt == QFormat::Int4 || group > 0) && K % group)
    throw ShapeError("quantize_weight_rows: K is not a multiple of the group size");
  if (fmt == QFormat::Int4 && !symmetric && !zero) throw ValueError("quantize_weight_rows: asymmetric int4 needs zero");
  std::atomic<bool> finite{true};
  switch (wdtype) {
    case DType::F32: quantize_rows(static_cast<const float*>(w), ldw, N, K, fmt, group, symmetric, data, scale, zero, &finite); break;
    case DType::BF16: quantize_rows(static_cast<const bf16*>(w), ldw, N, K, fmt, group, symmetric, data, scale, zero, &finite); break;
    case DType::F16: quantize_rows(static_cast<const f16*>(w), ldw, N, K, fmt, group, symmetric, data, scale, zero, &finite); break;
    default: throw DTypeError("w: expected float32, bfloat16 or float16");
  }
  return finite.load();
}

}  // namespace ne
