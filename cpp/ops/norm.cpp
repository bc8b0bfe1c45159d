// Normalization kernels (CPU): LayerNorm, RMSNorm, CRMSNorm, each optionally fused with the residual
// add before it, forward and backward; and the per-channel reductions and affines that Unified
// Normalization is built from.
//
// This file is compiled once per ISA (see CMakeLists.txt); the entry points at the bottom are
// compiled only in the generic build and pick the best ISA's kernel table at run time.
//
// Work split: one row (token) at a time, rows spread over threads. A row of up to several thousand
// features stays in L1/L2 while the kernel makes its passes over it, so each kernel streams every
// tensor through memory once: forward reads x (and residual) and writes y (and x + residual);
// backward reads dy and h and writes dx. That is the traffic of a copy, the bound these kernels aim at.
#include <limits>
#include <type_traits>
#include <vector>

#include "core/aligned.h"
#include "core/parallel.h"
#include "core/simd.h"
#include "ops/norm.h"

// On a lambda that each_vector / row_sum call per vector: inlined even where it is long (bf16 tails)
// or called twice (the loop and its tail). GCC otherwise kept some out of line, a call per vector
// with every constant rebuilt in it (bf16 LayerNorm forward at 2.5 cycles an element on a Zen 1).
#define NE_INLINE __attribute__((always_inline))

namespace ne {
namespace NE_ISA_NS {

template <class V, class T>
struct NormRows {
  using R = typename V::R;
  using A = typename V::acc_t;  // float, or double for float64 tensors
  static constexpr int N = V::N;

  static int width(int64_t n, int64_t i) { return n - i < N ? static_cast<int>(n - i) : N; }

  // f(i, k) for each vector of a row of n: whole vectors with k the constant N (f inlined, its k == N tests
  // fold away and the loop body stays one straight path), then the tail, if any, with its width.
  template <class F>
  static inline __attribute__((always_inline)) void each_vector(int64_t n, F f) {
    int64_t i = 0;
    for (; i + N <= n; i += N) f(i, N);
    if (i < n) f(i, static_cast<int>(n - i));
  }

  // The row sums add float32 (or float64) vectors over blocks of kBlock elements and each block's total in
  // double: the rounding error then grows with a block (64 terms a lane), not with the row. (Summed end to
  // end in the 8 float lanes of AVX2, a 32771-wide bf16 row's LayerNorm rstd was once 1.07e-5 off float64.)
  static constexpr int64_t kBlock = 256 * N;

  // sum over the row of term(i, k), a vector whose lanes >= k are zero; four accumulators (the
  // adds' latency, not memory, would otherwise bound a row that sits in L1).
  template <class F>
  static double row_sum(int64_t n, F term) {
    double total = 0.0;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = n - b0 < kBlock ? n : b0 + kBlock;
      R a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      int64_t i = b0;
      for (; i + 4 * N <= b1; i += 4 * N) {
        a0 = V::add(a0, term(i, N));
        a1 = V::add(a1, term(i + N, N));
        a2 = V::add(a2, term(i + 2 * N, N));
        a3 = V::add(a3, term(i + 3 * N, N));
      }
      for (; i < b1; i += N) a0 = V::add(a0, term(i, width(b1, i)));
      total += V::reduce(V::add(V::add(a0, a1), V::add(a2, a3)));
    }
    return total;
  }

  // p (n float32 values) fit for V's bf16 stores (kNeedsPlainNaNs, core/simd.h): p itself, or where it holds a
  // NaN (and V needs it) a copy in buf with every NaN the default quiet one
  static const A* plain_nans(const void* p, int64_t n, AlignedVec<A>& buf) {
    const A* v = static_cast<const A*>(p);
    if (!kNeedsPlainNaNs<V> || !v) return v;
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) nan |= v[i] != v[i];
    if (!nan) return v;
    buf.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = v[i] == v[i] ? v[i] : std::numeric_limits<A>::quiet_NaN();
    return buf.data();
  }

  static R load_w(const A* w, int64_t i, int k) { return w ? loadn<V>(w + i, k) : V::set1(A(1)); }
  static R load_b(const A* b, int64_t i, int k) { return b ? loadn<V>(b + i, k) : V::zero(); }

  // f(std::bool_constant<b0>{}, ...) for the run-time flags b0, ...: a loop body that tests them per vector becomes
  // one loop per case with the tests gone (GCC did not unswitch the forward's w / b / streaming tests: five
  // branches per 16 bf16 values)
  template <bool... Bs, class F>
  static void with_bools(F&& f) { f(std::bool_constant<Bs>{}...); }
  template <bool... Bs, class F, class... Rest>
  static void with_bools(F&& f, bool b, Rest... rest) {
    if (b) with_bools<Bs..., true>(f, rest...);
    else with_bools<Bs..., false>(f, rest...);
  }
  // xhat w + b (one rounding when both), for weight / bias presence known at compile time
  template <class HW, class HB>
  static inline __attribute__((always_inline)) R affine(R xhat, const A* w, const A* b, int64_t i, int k, HW, HB) {
    if constexpr (HW::value && HB::value) return V::fma(xhat, loadn<V>(w + i, k), loadn<V>(b + i, k));
    else if constexpr (HW::value) return V::mul(xhat, loadn<V>(w + i, k));
    else if constexpr (HB::value) return V::add(xhat, loadn<V>(b + i, k));
    else return xhat;
  }

  // ---------------------------------------------------------------- row statistics
  // LayerNorm statistics, shifted. K = mean of the row's first vector (up to N values), a value
  // close to the row's mean, and
  //   delta = mean(h - K),   mean = K + delta,   var = mean((h - K)^2) - delta^2.
  // h - K is exact for values near K, so rows such as 1e4 + N(0, 1) keep every significant digit
  // (a plain sum of h, or E[h^2] - E[h]^2, loses them in float32). The one-pass variance cancels
  // only when K sits far from the mean (delta^2 > 3 var): then an exact second pass computes
  // mean((h - K - delta)^2) instead.
  static A ln_shift(const T* h, int64_t n) {
    int k = width(n, 0);
    return static_cast<A>(V::reduce(V::load(h, k)) / k);
  }
  // sum of c = h - K (kSum) and of c^2 over a row (K = 0 unless kShift), as row_sum does (blocks of kBlock, four
  // accumulator registers each: the adds' latency, not memory, would bound fewer; two VFB vectors, whose eight
  // with their loads overflowed AVX2's sixteen registers and kept one in memory), the vectors taken by load_pair
  static constexpr int kAcc = 4 / kRegsPerVec<V>;
  template <bool kShift, bool kSum>
  static void row_sums(const T* h, int64_t n, A K, double& sum, double& sq) {
    const R Kv = V::set1(K);
    sum = 0.0, sq = 0.0;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = n - b0 < kBlock ? n : b0 + kBlock;
      R s[4] = {V::zero(), V::zero(), V::zero(), V::zero()}, q[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
      int64_t i = b0;
      for (; i + kAcc * N <= b1; i += kAcc * N) {
        R c[kAcc];
        for (int j = 0; j < kAcc; j += 2) load_pair<V>(h + i + j * N, c[j], c[j + 1]);
        for (int j = 0; j < kAcc; ++j) {
          if (kShift) c[j] = V::sub(c[j], Kv);
          if (kSum) s[j] = V::add(s[j], c[j]);
          q[j] = V::fma(c[j], c[j], q[j]);
        }
      }
      for (; i < b1; i += N) {
        const int k = width(b1, i);
        const R c = kShift ? V::keep(V::sub(loadn<V>(h + i, k), Kv), k) : loadn<V>(h + i, k);
        if (kSum) s[0] = V::add(s[0], c);
        q[0] = V::fma(c, c, q[0]);
      }
      if (kSum) sum += V::reduce(V::add(V::add(s[0], s[1]), V::add(s[2], s[3])));
      sq += V::reduce(V::add(V::add(q[0], q[1]), V::add(q[2], q[3])));
    }
  }
  static void ln_stats(const T* h, int64_t n, double eps, A& K, A& delta, A& rstd) {
    K = ln_shift(h, n);
    double sum, sq;
    row_sums<true, true>(h, n, K, sum, sq);
    const double d = sum / n, m2 = sq / n;
    delta = static_cast<A>(d);
    double var = m2 - d * d;
    if (!(var * 4.0 >= m2)) {  // cancelled (or NaN): the exact second pass
      const R Kv = V::set1(K), Dv = V::set1(delta);
      var = row_sum(n, [=](int64_t j, int k) NE_INLINE {
              R c = V::keep(V::sub(V::sub(loadn<V>(h + j, k), Kv), Dv), k);
              return V::mul(c, c);
            }) / n;
    }
    rstd = static_cast<A>(1.0 / __builtin_sqrt(var + eps));
  }
  // RMSNorm: rstd = 1 / sqrt(mean(h^2) + eps)
  static A rms_rstd(const T* h, int64_t n, double eps) {
    double s, q;
    row_sums<false, false>(h, n, A(0), s, q);
    return static_cast<A>(1.0 / __builtin_sqrt(q / n + eps));
  }
  // CRMSNorm over the n = d - 1 stored coordinates; the missing one is -sum(h):
  //   rstd = 1 / sqrt((sum h^2 + (sum h)^2) / d + eps)
  static A crms_rstd(const T* h, int64_t n, double eps, double& s) {
    double q;
    row_sums<false, true>(h, n, A(0), s, q);
    return static_cast<A>(1.0 / __builtin_sqrt((q + s * s) / static_cast<double>(n + 1) + eps));
  }

  // ---------------------------------------------------------------- forward, one row
  //   h = x (+ r, stored to h_out in T, and normalized as stored)
  //   LayerNorm: y = (h - mean) * rstd * w + b      RMSNorm / CRMSNorm: y = h * rstd * w
  static constexpr int64_t kAhead = 2;  // rows prefetched ahead in forward()

  // Bytes a row matrix of T spans in memory (the last row to its last element).
  static int64_t span_bytes(const RowMatrix& m) {
    return ((m.rows - 1) * m.ld + m.cols) * static_cast<int64_t>(sizeof(T));
  }

  // y's full vectors: streamed (non-temporal) when the output is large, else plain stores
  static inline __attribute__((always_inline)) void store_y(T* p, R v, int k, bool nt) {
    if (nt && k == N) store_stream<V>(p, v);
    else storen<V>(p, v, k);
  }

  static void forward_row(const NormFwdArgs& a, int64_t r, bool nt) {
    const int64_t n = a.x.cols;
    const A* w = static_cast<const A*>(a.w);
    const A* b = static_cast<const A*>(a.b);
    const T* h = a.x.row<const T>(r);
    if (a.res.data) {
      const T* res = a.res.row<const T>(r);
      T* ho = a.res_out.row<T>(r);
      if (nt) {
        // h = x + r into a row buffer (the statistics read it from L1) and streamed to res_out
        thread_local AlignedVec<T> row;
        if (static_cast<int64_t>(row.size()) < n) row.resize(static_cast<size_t>(n));
        T* hb = row.data();
        each_vector(n, [=](int64_t i, int k) NE_INLINE {
          R v = V::add(loadn<V>(h + i, k), loadn<V>(res + i, k));
          storen<V>(hb + i, v, k);
          store_y(ho + i, v, k, true);
        });
        h = hb;
      } else {
        each_vector(n, [=](int64_t i, int k) NE_INLINE {
          storen<V>(ho + i, V::add(loadn<V>(h + i, k), loadn<V>(res + i, k)), k);
        });
        h = ho;
      }
    }
    T* y = a.y.row<T>(r);
    A rstd, mean = A(0);
    if (a.kind == NormKind::LayerNorm) {
      A K, delta;
      ln_stats(h, n, a.eps, K, delta, rstd);
      // xhat = (h - mean) rstd - rest rstd, mean = K + delta rounded to A and rest what A could not hold of it:
      // h - mean is exact near the mean (and rounds in proportion to itself away from it), the fma adds a tiny
      // correction; one subtraction fewer than (h - K - delta) rstd
      mean = static_cast<A>(static_cast<double>(K) + static_cast<double>(delta));
      const double rest = (static_cast<double>(K) - static_cast<double>(mean)) + static_cast<double>(delta);
      const R Mv = V::set1(mean), Sv = V::set1(rstd), NRv = V::set1(static_cast<A>(-rest * rstd));
      with_bools([=](auto hw, auto hb, auto ntc) {
        each_vector(n, [=](int64_t i, int k) NE_INLINE {
          R xhat = V::fma(V::sub(loadn<V>(h + i, k), Mv), Sv, NRv);
          store_y(y + i, affine(xhat, w, b, i, k, hw, hb), k, ntc);
        });
      }, w != nullptr, b != nullptr, nt);
    } else {
      double s = 0;
      rstd = a.kind == NormKind::RMSNorm ? rms_rstd(h, n, a.eps) : crms_rstd(h, n, a.eps, s);
      const R Sv = V::set1(rstd);
      with_bools([=](auto hw, auto hb, auto ntc) {
        each_vector(n, [=](int64_t i, int k) NE_INLINE {
          R xhat = V::mul(loadn<V>(h + i, k), Sv);
          store_y(y + i, affine(xhat, w, b, i, k, hw, hb), k, ntc);
        });
      }, w != nullptr, b != nullptr, nt);
    }
    if (a.mean) static_cast<A*>(a.mean)[r] = mean;
    if (a.rstd) static_cast<A*>(a.rstd)[r] = rstd;
  }

  // ---------------------------------------------------------------- backward
  // With g = dy * w and xhat the normalized row (as in forward):
  //   LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
  //   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
  //   CRMSNorm:  dh = rstd * (g - (xhat + rstd * sum(h)) * sum(g * xhat) / d)     (d = n + 1)
  //   dx = dh (+ dres);  dw += dy * xhat;  db += dy   (into this thread's partial sums)
  // Two passes over each row. Pass 1 (backward_coef) takes the sums; for LayerNorm it also finds the
  // shift that forward used, xhat = (h - K - delta) rstd with K = ln_shift(h) and delta = mean(h - K),
  // from the same shifted values c = h - K: sum(g xhat) = rstd (sum(g c) - delta sum(g)), so the row is
  // read twice, not three times. Pass 2 writes dx and accumulates dw, db, for two rows at once where it
  // can: the partial sums are then loaded and stored once per two rows (the same operations in the same
  // order as row by row, so the same bits), which was most of pass 2's cost (LayerNorm f32 8192 x 1024:
  // 4.0 ms row by row; 2.8 ms with no dw / db at all); RMSNorm (dw only) measured slower paired.
  // Paired only in the AVX-512 builds (measured on Intel Xeons): on an AVX2-only AMD EPYC the two rows'
  // six streams (h, dy, dx of each, at the same offsets mod 4 KiB) made LayerNorm's backward 2-4x slower
  // than row by row (bf16 4096 x 4096: 88 ms paired, 20 ms row by row; benchmarks/RESULTS.md).
  //
  // Pass 1 of one row: what pass 2 needs of it, dh = rstd * (g - c_mean - c_xhat * xhat) with
  // xhat = (h - K - delta) * rstd.
  struct RowCoef {
    const T *h, *dy, *dres;
    T* dx;
    R Kv, Dv, Sv, c_mean, c_xhat;
  };
  static RowCoef backward_coef(const NormBwdArgs& a, int64_t r) {
    const int64_t n = a.h.cols;
    const A* w = static_cast<const A*>(a.w);
    RowCoef c;
    c.h = a.h.row<const T>(r);
    c.dy = a.dy.row<const T>(r);
    c.dres = a.dres.data ? a.dres.row<const T>(r) : nullptr;
    c.dx = a.dx.row<T>(r);
    const T* h = c.h;
    const T* dy = c.dy;
    const A rstd = static_cast<const A*>(a.rstd)[r];
    c.Sv = V::set1(rstd);
    const bool ln = a.kind == NormKind::LayerNorm;
    const A K = ln ? ln_shift(h, n) : A(0);
    c.Kv = V::set1(K);
    // sg = sum g, sgc = sum g c, sc = sum c (c = h - K; K = 0 unless LayerNorm); blocks of kBlock in double
    double sg = 0.0, sgc = 0.0, sc = 0.0;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = n - b0 < kBlock ? n : b0 + kBlock;
      R sg0 = V::zero(), sgc0 = V::zero(), sc0 = V::zero();
      for (int64_t i = b0; i < b1; i += N) {
        int k = width(b1, i);
        R cv = V::keep(V::sub(loadn<V>(h + i, k), c.Kv), k);
        R g = V::mul(loadn<V>(dy + i, k), load_w(w, i, k));
        sg0 = V::add(sg0, g);
        sgc0 = V::fma(g, cv, sgc0);
        sc0 = V::add(sc0, cv);
      }
      sg += V::reduce(sg0), sgc += V::reduce(sgc0), sc += V::reduce(sc0);
    }
    const A delta = ln ? static_cast<A>(sc / n) : A(0);
    c.Dv = V::set1(delta);
    double sgx = static_cast<double>(rstd) * (sgc - static_cast<double>(delta) * sg);  // sum g xhat
    if (ln && !(static_cast<double>(delta) * delta * rstd * rstd <= 3.0)) {
      // K far from the mean (|delta| > sqrt(3) std, as in ln_stats) or NaN: sum g c and delta sum g
      // may cancel; take sum(g xhat) from xhat itself, as forward normalized (a third pass)
      sgx = row_sum(n, [=](int64_t i, int k) NE_INLINE {
        R xh = V::mul(V::sub(V::sub(loadn<V>(h + i, k), c.Kv), c.Dv), c.Sv);
        return V::keep(V::mul(V::mul(loadn<V>(dy + i, k), load_w(w, i, k)), xh), k);
      });
    }
    if (ln) {
      c.c_mean = V::set1(static_cast<A>(sg / n));
      c.c_xhat = V::set1(static_cast<A>(sgx / n));
    } else if (a.kind == NormKind::RMSNorm) {
      c.c_mean = V::zero();
      c.c_xhat = V::set1(static_cast<A>(sgx / n));
    } else {  // CRMSNorm: sc = sum h
      const double m = sgx / static_cast<double>(n + 1);
      c.c_mean = V::set1(static_cast<A>(rstd * sc * m));
      c.c_xhat = V::set1(static_cast<A>(m));
    }
    return c;
  }

  // dx of element i of one row (and its xhat and dy, for dw / db)
  static R backward_dx(const RowCoef& c, const A* w, int64_t i, int k, R& d, R& xh) {
    d = loadn<V>(c.dy + i, k);
    xh = V::keep(V::mul(V::sub(V::sub(loadn<V>(c.h + i, k), c.Kv), c.Dv), c.Sv), k);
    R o = V::mul(c.Sv, V::sub(V::sub(V::mul(d, load_w(w, i, k)), c.c_mean), V::mul(c.c_xhat, xh)));
    return c.dres ? V::add(o, loadn<V>(c.dres + i, k)) : o;
  }

  static void backward_rows(const NormBwdArgs& a, int64_t r, int rows, A* dw, A* db, bool nt) {
    const int64_t n = a.h.cols;
    const A* w = static_cast<const A*>(a.w);
    const RowCoef c0 = backward_coef(a, r);
    if (rows == 1) {
      each_vector(n, [=](int64_t i, int k) NE_INLINE {
        R d, xh;
        store_y(c0.dx + i, backward_dx(c0, w, i, k, d, xh), k, nt);
        if (dw) storen<V>(dw + i, V::fma(d, xh, loadn<V>(dw + i, k)), k);
        if (db) storen<V>(db + i, V::add(d, loadn<V>(db + i, k)), k);
      });
      return;
    }
    const RowCoef c1 = backward_coef(a, r + 1);
    each_vector(n, [=](int64_t i, int k) NE_INLINE {
      R d0, xh0, d1, xh1;
      store_y(c0.dx + i, backward_dx(c0, w, i, k, d0, xh0), k, nt);
      store_y(c1.dx + i, backward_dx(c1, w, i, k, d1, xh1), k, nt);
      if (dw) storen<V>(dw + i, V::fma(d1, xh1, V::fma(d0, xh0, loadn<V>(dw + i, k))), k);
      if (db) storen<V>(db + i, V::add(d1, V::add(d0, loadn<V>(db + i, k))), k);
    });
  }

  // Rows per task: enough that a thread's share is worth waking it for (~16K elements).
  static int64_t grain(int64_t cols) { return cols >= 16384 ? 1 : 16384 / (cols > 0 ? cols : 1); }

  // Sum the per-thread partials [threads][n] into out[n].
  static void reduce_partials(const A* part, int threads, int64_t n, A* out) {
    for (int64_t i = 0; i < n; i += N) {
      int k = width(n, i);
      R s = V::zero();
      for (int t = 0; t < threads; ++t) s = V::add(s, loadn<V>(part + static_cast<int64_t>(t) * n + i, k));
      storen<V>(out + i, s, k);
    }
  }
  static void zero(A* p, int64_t count) {
    for (int64_t i = 0; i < count; ++i) p[i] = A(0);
  }

  static void forward(const NormFwdArgs& args) {
    NormFwdArgs a = args;
    AlignedVec<A> wbuf, bbuf;
    a.w = plain_nans(a.w, a.x.cols, wbuf);
    a.b = plain_nans(a.b, a.x.cols, bbuf);
    // an output of 8 MiB or more is streamed past the caches (it would evict everything anyway),
    // unless its pages are fresh (worth_streaming, core/simd.h)
    const int64_t out_bytes = span_bytes(a.y);
    const bool nt = worth_streaming(a.y.data, out_bytes) &&
                    (!a.res.data || worth_streaming(a.res_out.data, span_bytes(a.res_out)));
    // large inputs with rows of a few KB: the next rows' lines are requested ahead (the row-serial
    // stats pass would otherwise wait on each row's first misses). Not with a residual: there the
    // row's first pass is the add, two plain streams the hardware prefetcher follows, and the
    // requests only cost (add_layer_norm f32 8192x1024: 3.37 ms without them, 3.73 ms with)
    const int64_t row_bytes = a.x.cols * static_cast<int64_t>(sizeof(T));
    const bool ahead = !a.res.data && out_bytes >= (int64_t(8) << 20) && row_bytes <= 8192;
    parallel_for(a.x.rows, grain(a.x.cols), [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        if (ahead && r + kAhead < r1) {
          const char* p = reinterpret_cast<const char*>(a.x.row<const T>(r + kAhead));
          for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(p + o);
        }
        forward_row(a, r, nt);
      }
      if (nt) stream_fence();
    });
  }

  // Row statistics only (norm_linear applies them in the GEMM epilogue): rstd per row, and for
  // LayerNorm the mean, without writing the normalized row.
  static void stats(const NormFwdArgs& a) {
    const int64_t n = a.x.cols;
    parallel_for(a.x.rows, grain(n), [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* h = a.x.row<const T>(r);
        A rstd, mean = A(0);
        if (a.kind == NormKind::LayerNorm) {
          A K, delta;
          ln_stats(h, n, a.eps, K, delta, rstd);
          mean = K + delta;
        } else {
          double s = 0;
          rstd = a.kind == NormKind::RMSNorm ? rms_rstd(h, n, a.eps) : crms_rstd(h, n, a.eps, s);
        }
        if (a.mean) static_cast<A*>(a.mean)[r] = mean;
        static_cast<A*>(a.rstd)[r] = rstd;
      }
    });
  }

#if defined(NE_ISA_AVX512)
  static constexpr bool kPairRows = true;
#else
  static constexpr bool kPairRows = false;
#endif

  static void backward(const NormBwdArgs& args) {
    NormBwdArgs a = args;
    AlignedVec<A> wbuf, sbuf;
    a.w = plain_nans(a.w, a.h.cols, wbuf);
    a.rstd = plain_nans(a.rstd, a.h.rows, sbuf);
    const int64_t n = a.h.cols;
    const int threads = a.partial_threads;
    A* pdw = static_cast<A*>(a.partials);
    A* pdb = pdw + static_cast<int64_t>(threads) * n;
    if (a.dw || a.db) zero(pdw, 2 * static_cast<int64_t>(threads) * n);
    // as forward(): a dx of 8 MiB or more is streamed past the caches (unless its pages are fresh),
    // and then the next rows' h and dy (and dres) are requested while these are computed (each row
    // starts new memory streams; into fresh pages the page faults dominate and prefetching gained
    // nothing measurable)
    const bool nt = worth_streaming(a.dx.data, span_bytes(a.dx)), ahead = nt;
    const int64_t row_bytes = n * static_cast<int64_t>(sizeof(T));
    parallel_for_upto(a.h.rows, grain(n), threads, [&](int64_t r0, int64_t r1, int tid) {
      A* dw = a.dw ? pdw + static_cast<int64_t>(tid) * n : nullptr;
      A* db = a.db ? pdb + static_cast<int64_t>(tid) * n : nullptr;
      // two rows at a time when dweight / dbias are accumulated (backward_rows), in the AVX-512 builds
      const int step = (dw && db && kPairRows) ? 2 : 1;
      for (int64_t r = r0; r < r1; r += step) {
        const int rows = static_cast<int>(std::min<int64_t>(step, r1 - r));
        for (int64_t q = r + rows; ahead && q < std::min(r1, r + rows + step); ++q) {
          const char* ph = reinterpret_cast<const char*>(a.h.row<const T>(q));
          const char* pd = reinterpret_cast<const char*>(a.dy.row<const T>(q));
          const char* pr = a.dres.data ? reinterpret_cast<const char*>(a.dres.row<const T>(q)) : nullptr;
          for (int64_t o = 0; o < row_bytes; o += 64) {
            __builtin_prefetch(ph + o);
            __builtin_prefetch(pd + o);
            if (pr) __builtin_prefetch(pr + o);
          }
        }
        backward_rows(a, r, rows, dw, db, nt);
      }
      if (nt) stream_fence();
    });
    if (a.dw) reduce_partials(pdw, threads, n, static_cast<A*>(a.dw));
    if (a.db) reduce_partials(pdb, threads, n, static_cast<A*>(a.db));
  }

  // ---------------------------------------------------------------- per-channel (Unified Norm)
  // moments: out1[c] = sum_r x[r,c]^2, or with dy: out1[c] = sum_r x*dy, out2[c] = sum_r dy
  static void moments(const ChannelArgs& a) {
    const int64_t n = a.x.cols;
    const int threads = a.partial_threads;
    A* p1 = static_cast<A*>(a.partials);
    A* p2 = p1 + static_cast<int64_t>(threads) * n;
    zero(p1, 2 * static_cast<int64_t>(threads) * n);
    const bool with_dy = a.dy.data != nullptr;
    parallel_for_upto(a.x.rows, grain(n), threads, [&](int64_t r0, int64_t r1, int tid) {
      A* s1 = p1 + static_cast<int64_t>(tid) * n;
      A* s2 = p2 + static_cast<int64_t>(tid) * n;
      for (int64_t r = r0; r < r1; ++r) {
        const T* x = a.x.row<const T>(r);
        const T* dy = with_dy ? a.dy.row<const T>(r) : nullptr;
        for (int64_t i = 0; i < n; i += N) {
          int k = width(n, i);
          R v = loadn<V>(x + i, k);
          if (with_dy) {
            R d = loadn<V>(dy + i, k);
            storen<V>(s1 + i, V::fma(v, d, loadn<V>(s1 + i, k)), k);
            storen<V>(s2 + i, V::add(d, loadn<V>(s2 + i, k)), k);
          } else {
            storen<V>(s1 + i, V::fma(v, v, loadn<V>(s1 + i, k)), k);
          }
        }
      }
    });
    reduce_partials(p1, threads, n, static_cast<A*>(a.out1));
    if (with_dy && a.out2) reduce_partials(p2, threads, n, static_cast<A*>(a.out2));
  }

  // out[r,c] = a[c] * u[r,c] + b[c]            (v.data == null)
  // out[r,c] = a[c] * u[r,c] + b[c] * v[r,c]
  static void affine(const ChannelArgs& a) {
    const int64_t n = a.u.cols;
    AlignedVec<A> abuf, bbuf;
    const A* ca = plain_nans(a.a, n, abuf);
    const A* cb = plain_nans(a.b, n, bbuf);
    parallel_for(a.u.rows, grain(n), [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* u = a.u.row<const T>(r);
        const T* v = a.v.data ? a.v.row<const T>(r) : nullptr;
        T* o = a.out.row<T>(r);
        for (int64_t i = 0; i < n; i += N) {
          int k = width(n, i);
          R t = v ? V::mul(load_b(cb, i, k), loadn<V>(v + i, k)) : load_b(cb, i, k);
          storen<V>(o + i, V::fma(loadn<V>(ca + i, k), loadn<V>(u + i, k), t), k);
        }
      }
    });
  }
};

template <class V, class T>
using Rows = NormRows<V, T>;

// bf16 rows: in the AVX2 build as VFB (16 values as two float vectors in unpack order, core/simd.h)
#if defined(NE_ISA_AVX2)
using VBf = VFB;
#else
using VBf = VF;
#endif

const NormTable* norm_table() {
  static const NormTable table = {
      {Rows<VF, float>::forward, Rows<VF, f16>::forward, Rows<VBf, bf16>::forward, Rows<VD, double>::forward},
      {Rows<VF, float>::backward, Rows<VF, f16>::backward, Rows<VBf, bf16>::backward, Rows<VD, double>::backward},
      {Rows<VF, float>::moments, Rows<VF, f16>::moments, Rows<VBf, bf16>::moments, Rows<VD, double>::moments},
      {Rows<VF, float>::affine, Rows<VF, f16>::affine, Rows<VBf, bf16>::affine, Rows<VD, double>::affine},
      {Rows<VF, float>::stats, Rows<VF, f16>::stats, Rows<VBf, bf16>::stats, Rows<VD, double>::stats},
  };
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne

#if defined(NE_ISA_GENERIC)
// ==================================================================================== entry points
#include <vector>

namespace ne {
namespace {

DType acc_dtype(DType t) { return t == DType::F64 ? DType::F64 : DType::F32; }

// A per-channel vector ([n], accumulator dtype, contiguous, on x's device), when given.
void check_channel_vec(const TensorView* v, const TensorView& x, int64_t n) {
  if (!v) return;
  check_same_device(x, *v);
  check_dtype(*v, acc_dtype(x.dtype));
  check_shape_1d(*v, n);
}
// A per-row statistic ([rows], accumulator dtype, contiguous, on x's device), when given.
void check_row_vec(const TensorView* v, const TensorView& x, int64_t rows) {
  if (!v) return;
  check_same_device(x, *v);
  check_dtype(*v, acc_dtype(x.dtype));
  if (v->numel() != rows || !v->is_contiguous())
    throw ShapeError(std::string(v->name) + ": expected " + std::to_string(rows) +
                     " contiguous elements (one per row of " + x.name + "), got shape " + shape_str(*v));
}
void check_eps(double eps) {
  if (!(eps >= 0.0)) throw ValueError("eps: expected a non-negative number, got " + std::to_string(eps));
}
// 2 * threads * n accumulators, reused across calls, 64-byte aligned (core/aligned.h: a plain std::vector
// split the kernels' vectors of them across cache lines; LayerNorm's backward at 8192 x 1024 took 4.5 ms
// instead of 4.0)
void* cpu_scratch(int64_t n, DType t, int threads) {
  thread_local AlignedVec<double> buf;
  const size_t need = static_cast<size_t>(2 * threads * n * dtype_size(acc_dtype(t)) + 7) / 8;
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}
// Picked per call (each getter returns a static table), so force_cpu_isa() takes effect at once.
const NormTable& cpu_norm() { return *NE_PICK_ISA(norm_table); }
bool on_cuda(const TensorView& x) { return x.device.type == DeviceType::CUDA; }

}  // namespace

void norm_forward(NormKind kind, const TensorView& x, const TensorView* residual, const TensorView* weight,
                  const TensorView* bias, double eps, const TensorView& y, const TensorView* residual_out,
                  const TensorView* mean, const TensorView* rstd, const Ctx& ctx) {
  check_float(x);
  check_eps(eps);
  NormFwdArgs a{};
  a.kind = kind;
  a.x = as_rows(x);
  const int64_t n = a.x.cols;
  if (x.ndim == 0 || n < 1) throw ShapeError(std::string(x.name) + ": expected at least one feature in the last dimension, got shape " + shape_str(x));
  if (kind == NormKind::CRMSNorm && bias) throw ValueError("bias: crms_norm takes no bias");
  a.y = rows_like(y, x);
  if (residual) {
    if (!residual_out) throw ValueError("residual_out: required with residual");
    a.res = rows_like(*residual, x);
    a.res_out = rows_like(*residual_out, x);
  }
  check_channel_vec(weight, x, n);
  check_channel_vec(bias, x, n);
  check_row_vec(mean, x, a.x.rows);
  check_row_vec(rstd, x, a.x.rows);
  a.w = weight ? weight->data : nullptr;
  a.b = bias ? bias->data : nullptr;
  a.mean = mean ? mean->data : nullptr;
  a.rstd = rstd ? rstd->data : nullptr;
  a.eps = eps;
  if (a.x.rows == 0) return;
  if (on_cuda(x)) {
#if defined(NE_WITH_CUDA)
    return cuda::norm_forward(a, ctx.cuda_stream);
#else
    throw_no_cuda(x);
#endif
  }
  (void)ctx;
  cpu_norm().forward[float_slot(x.dtype)](a);
}

void norm_stats(NormKind kind, const TensorView& x, double eps, const TensorView* mean, const TensorView& rstd,
                const Ctx& ctx) {
  check_float(x);
  check_eps(eps);
  NormFwdArgs a{};
  a.kind = kind;
  a.x = as_rows(x);
  if (x.ndim == 0 || a.x.cols < 1)
    throw ShapeError(std::string(x.name) + ": expected at least one feature in the last dimension, got shape " + shape_str(x));
  check_row_vec(mean, x, a.x.rows);
  check_row_vec(&rstd, x, a.x.rows);
  a.mean = mean ? mean->data : nullptr;
  a.rstd = rstd.data;
  a.eps = eps;
  if (a.x.rows == 0) return;
  if (on_cuda(x)) {
#if defined(NE_WITH_CUDA)
    return cuda::norm_stats(a, ctx.cuda_stream);
#else
    throw_no_cuda(x);
#endif
  }
  (void)ctx;
  cpu_norm().stats[float_slot(x.dtype)](a);
}

void norm_backward(NormKind kind, const TensorView& dy, const TensorView& h, const TensorView* weight,
                   const TensorView& rstd, const TensorView* dresidual, const TensorView& dx,
                   const TensorView* dweight, const TensorView* dbias, const Ctx& ctx) {
  check_float(h);
  NormBwdArgs a{};
  a.kind = kind;
  a.h = as_rows(h);
  const int64_t n = a.h.cols;
  if (h.ndim == 0 || n < 1) throw ShapeError(std::string(h.name) + ": expected at least one feature in the last dimension, got shape " + shape_str(h));
  a.dy = rows_like(dy, h);
  a.dx = rows_like(dx, h);
  if (dresidual) a.dres = rows_like(*dresidual, h);
  check_channel_vec(weight, h, n);
  check_row_vec(&rstd, h, a.h.rows);
  check_channel_vec(dweight, h, n);
  check_channel_vec(dbias, h, n);
  if (kind == NormKind::CRMSNorm && dbias) throw ValueError("dbias: crms_norm has no bias");
  a.w = weight ? weight->data : nullptr;
  a.rstd = rstd.data;
  a.dw = dweight ? dweight->data : nullptr;
  a.db = dbias ? dbias->data : nullptr;
  if (on_cuda(h)) {
#if defined(NE_WITH_CUDA)
    return cuda::norm_backward(a, ctx.cuda_stream);
#else
    throw_no_cuda(h);
#endif
  }
  (void)ctx;
  a.partial_threads = num_threads();
  a.partials = cpu_scratch(n, h.dtype, a.partial_threads);
  cpu_norm().backward[float_slot(h.dtype)](a);
}

void channel_moments(const TensorView& x, const TensorView* dy, const TensorView& out1, const TensorView* out2,
                     const Ctx& ctx) {
  check_float(x);
  ChannelArgs a{};
  a.x = as_rows(x);
  const int64_t n = a.x.cols;
  if (dy) a.dy = rows_like(*dy, x);
  check_channel_vec(&out1, x, n);
  check_channel_vec(out2, x, n);
  a.out1 = out1.data;
  a.out2 = out2 ? out2->data : nullptr;
  if (on_cuda(x)) {
#if defined(NE_WITH_CUDA)
    return cuda::channel_moments(a, ctx.cuda_stream);
#else
    throw_no_cuda(x);
#endif
  }
  (void)ctx;
  a.partial_threads = num_threads();
  a.partials = cpu_scratch(n, x.dtype, a.partial_threads);
  cpu_norm().moments[float_slot(x.dtype)](a);
}

static void channel_affine_impl(const TensorView& u, const TensorView& a_, const TensorView* v,
                                const TensorView* b_, const TensorView& out, const Ctx& ctx) {
  check_float(u);
  ChannelArgs a{};
  a.u = as_rows(u);
  const int64_t n = a.u.cols;
  if (v) a.v = rows_like(*v, u);
  a.out = rows_like(out, u);
  check_channel_vec(&a_, u, n);
  check_channel_vec(b_, u, n);
  a.a = a_.data;
  a.b = b_ ? b_->data : nullptr;
  if (on_cuda(u)) {
#if defined(NE_WITH_CUDA)
    return cuda::channel_affine(a, ctx.cuda_stream);
#else
    throw_no_cuda(u);
#endif
  }
  (void)ctx;
  cpu_norm().affine[float_slot(u.dtype)](a);
}

void channel_affine(const TensorView& x, const TensorView& a, const TensorView* b, const TensorView& y,
                    const Ctx& ctx) {
  channel_affine_impl(x, a, nullptr, b, y, ctx);
}

void channel_lincomb(const TensorView& u, const TensorView& a, const TensorView& v, const TensorView& b,
                     const TensorView& out, const Ctx& ctx) {
  channel_affine_impl(u, a, &v, &b, out, ctx);
}

}  // namespace ne
#endif  // NE_ISA_GENERIC
