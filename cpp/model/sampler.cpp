// Sampling the next token from a row of logits l[0..V).
//   temperature 0 (or top_k 1): argmax, the first index on ties.
//   else: the candidates in order of decreasing logit (ties: lower index first); keep the first
//   top_k (0: all); w_i = exp((l_i - max l) / temperature) over the kept ones; keep the shortest
//   prefix whose mass sum w / sum_kept w reaches top_p (1: all); draw i with probability w_i / sum w
//   from the caller's generator.
// A NaN or +Inf logit is an error (an overflowed forward pass); -Inf is a mask (weight 0).
//
// Cost per token over a vocabulary of V (GPT-2: 50257): one vector pass for the maximum (and the
// NaN / +Inf check), then
//   greedy:                  the first index of the maximum (a scan that stops there);
//   top_k = k <= V / 256:    one pass keeping the k best in a heap (a logit at most the k-th best so
//                            far costs one compare), k exps in double;
//   no cut (top_k 0, top_p 1): one vector pass of exps, and the draw walks the weights in index
//                            order (the distribution does not depend on the order);
//   otherwise:               one vector pass of exps and a counting sort of the candidates by
//                            log-weight into 4096 buckets; only the bucket where the top_k cut or the
//                            top_p cut falls is sorted.
// Before, every sampled token sorted all V candidates (4 ms at V = 50257, half a GPT-2 bf16 decode
// step) and greedy was a branchy scalar loop (0.15 ms).
//
// This file is compiled once per ISA (the two row kernels); the entry point, compiled only in the
// generic build, picks the best ISA's kernels at run time.
#include <cmath>
#include <cstdint>

#include "core/aligned.h"
#include "core/dispatch.h"
#include "core/simd.h"

namespace ne {

struct SamplerTable {
  // max over x[0..n), and whether any x_i is NaN or +-Inf (then the caller rescans in scalar code)
  float (*max_and_flag)(const float* x, int64_t n, bool* nonfinite);
  // w_i = exp((x_i - mx) * scale) (0 below float's range); returns sum_i w_i
  double (*exp_weights)(const float* x, int64_t n, float mx, float scale, float* w);
};

namespace NE_ISA_NS {
namespace {

using R = VF::R;
constexpr int L = VF::N;

float lanes_max(R v) {
  alignas(64) float t[L];
  VF::store(t, v);
  float m = t[0];
  for (int i = 1; i < L; ++i) m = t[i] > m ? t[i] : m;
  return m;
}

float max_and_flag(const float* x, int64_t n, bool* nonfinite) {
  // (x - x) is 0 for a finite x and NaN for NaN or +-Inf: one sum of them flags all three
  R m = VF::set1(-__builtin_inff()), z = VF::zero();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const R v = VF::load(x + i);
    m = VF::max(v, m);
    z = VF::add(z, VF::sub(v, v));
  }
  float mx = lanes_max(m), zs = static_cast<float>(VF::reduce(z));
  for (; i < n; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    zs += x[i] - x[i];
  }
  *nonfinite = zs != 0.f;  // NaN != 0
  return mx;
}

double exp_weights(const float* x, int64_t n, float mx, float scale, float* w) {
  const R vm = VF::set1(mx), vs = VF::set1(scale);
  double sum = 0;
  int64_t i = 0;
  for (; i < n; i += L) {
    const int k = static_cast<int>(n - i < L ? n - i : L);
    const R e = VF::keep(vexp(VF::mul(VF::sub(loadn<VF>(x + i, k), vm), vs)), k);
    storen<VF>(w + i, e, k);
    sum += static_cast<double>(VF::reduce(e));
  }
  return sum;
}

}  // namespace

const SamplerTable* sampler_table() {
  static const SamplerTable table = {max_and_flag, exp_weights};
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::SamplerTable, sampler_table)

#if defined(NE_ISA_GENERIC)
// ==================================================================================== entry point
#include <algorithm>
#include <cfloat>
#include <string>
#include <vector>

#include "normengine/model.h"

namespace ne {
namespace {

// Candidate a before candidate b: higher logit, then lower index.
struct Before {
  const float* l;
  bool operator()(int a, int b) const { return l[a] > l[b] || (l[a] == l[b] && a < b); }
};

[[noreturn]] void bad_logit(const float* l, int i) {
  throw ValueError("logits: " + std::string(std::isnan(l[i]) ? "NaN" : "+Inf") + " at token id " +
                   std::to_string(i) +
                   " (the model's forward pass overflowed, or its weights hold NaN / Inf); no token can be "
                   "sampled from this row");
}

// The row's maximum; throws on the first NaN / +Inf (in index order) and on a row of only -Inf.
float checked_max(const SamplerTable& kt, const float* l, int V) {
  bool nonfinite = false;
  float mx = kt.max_and_flag(l, V, &nonfinite);
  if (nonfinite) {  // NaN, +Inf or a -Inf mask somewhere: find out which, in order
    mx = -INFINITY;
    for (int i = 0; i < V; ++i) {
      if (std::isnan(l[i]) || l[i] == INFINITY) bad_logit(l, i);
      mx = l[i] > mx ? l[i] : mx;
    }
  }
  if (mx == -INFINITY) throw ValueError("logits: every logit is -Inf; no token can be sampled from this row");
  return mx;
}

// Draw one of the candidates idx(0) .. idx(n - 1), candidate j with probability w(j) / sum, walking
// them in that order.
template <class I, class W>
int draw(int n, I idx, W w, double sum, std::mt19937_64& rng) {
  double u = std::uniform_real_distribution<double>(0.0, sum)(rng);
  int last = idx(0);
  for (int j = 0; j < n; ++j) {
    const double wi = w(j);
    if (wi > 0) {
      if (u < wi) return idx(j);
      u -= wi;
      last = idx(j);
    }
  }
  return last;  // u ran past the end by rounding: the last candidate with weight
}

// The top_p cut over candidates j = from .. to - 1 in order (weights w(j) out of `sum`), after a
// prefix of mass c (fraction of sum) and weight `kept`: true, with *end = one past the candidate
// whose mass reaches top_p, when it is among them (c and kept then include it).
template <class W>
bool reaches_top_p(int from, int to, W w, double sum, float top_p, double& c, double& kept, int* end) {
  for (int j = from; j < to; ++j) {
    c += w(j) / sum;
    kept += w(j);
    if (c >= top_p) {
      *end = j + 1;
      return true;
    }
  }
  return false;
}

// min_p (after the top_k / top_p cuts, as transformers' MinPLogitsWarper): of candidates 0 .. n - 1 with
// weights w(j), draw only those whose weight is at least min_p times the largest (the top token's, exp(0) up to
// the exp kernel's rounding).
template <class I, class W>
int draw_min_p(int n, I idx, W w, float min_p, std::mt19937_64& rng) {
  double top = 0;
  for (int j = 0; j < n; ++j) top = w(j) > top ? w(j) : top;
  const double cut = min_p * top;
  const auto wm = [&](int j) { return w(j) >= cut ? w(j) : 0.0; };
  double sum = 0;
  for (int j = 0; j < n; ++j) sum += wm(j);
  return draw(n, idx, wm, sum, rng);
}

// Small top_k (k * 256 <= V): the k best in one pass with a heap of the k best so far (its top the
// worst of them; a later index with an equal logit is never better, so only l_i > worst enters),
// sorted; weights in double.
int sample_small_top_k(const float* l, int V, int k, double T, float mx, float top_p, float min_p,
                       std::mt19937_64& rng) {
  const Before before{l};
  std::vector<int> h;
  h.reserve(k);
  for (int i = 0; i < k; ++i) h.push_back(i);
  std::make_heap(h.begin(), h.end(), before);  // a max-heap under `before`: top = the worst kept
  for (int i = k; i < V; ++i) {
    if (l[i] > l[h.front()]) {
      std::pop_heap(h.begin(), h.end(), before);
      h.back() = i;
      std::push_heap(h.begin(), h.end(), before);
    }
  }
  std::sort(h.begin(), h.end(), before);
  std::vector<double> w(k);
  double sum = 0;
  for (int i = 0; i < k; ++i)  // a -Inf mask weighs 0 (also at temperature Inf, where its quotient is NaN)
    sum += (w[i] = l[h[i]] == -INFINITY ? 0.0 : std::exp((static_cast<double>(l[h[i]]) - mx) / T));
  int n = k;
  double c = 0, kept = 0;  // the shortest prefix whose mass reaches top_p
  if (top_p < 1.f && reaches_top_p(0, k, [&](int j) { return w[j]; }, sum, top_p, c, kept, &n)) sum = kept;
  if (min_p > 0.f) return draw_min_p(n, [&](int j) { return h[j]; }, [&](int j) { return w[j]; }, min_p, rng);
  return draw(n, [&](int j) { return h[j]; }, [&](int j) { return w[j]; }, sum, rng);
}

// Any top_k and top_p over float weights wf (sum S) without sorting the row: the candidates with
// weight are counting-sorted into kBuckets buckets of log-weight (mx - l) / T, a monotone key, so
// bucket order is candidate order up to ties within a bucket. The top_k cut and the top_p cut each
// fall inside one bucket, and only that bucket's members are sorted (by `Before`); the candidates
// kept are then a prefix of the bucket-major order.
int sample_bucketed(const float* l, int V, int k, float mx, float scale, const float* wf, float top_p, float min_p,
                    std::mt19937_64& rng) {
  constexpr int kBuckets = 4096;
  constexpr float kSpan = 88.f;  // exp(-88) is below float's range: those weights are 0
  const float to_bucket = scale * (kBuckets / kSpan);
  thread_local std::vector<uint16_t> bid;
  thread_local std::vector<int> order;
  bid.resize(V);
  std::vector<int> start(kBuckets + 2, 0);
  std::vector<double> mass(kBuckets + 1, 0.0);
  for (int i = 0; i < V; ++i) {
    int b = kBuckets;  // no weight: never drawn, and after every candidate with weight
    if (wf[i] > 0) {
      const float t = (mx - l[i]) * to_bucket;
      b = t < static_cast<float>(kBuckets - 1) ? static_cast<int>(t) : kBuckets - 1;
    }
    bid[i] = static_cast<uint16_t>(b);
    ++start[b + 1];
    mass[b] += wf[i];
  }
  for (int b = 0; b <= kBuckets; ++b) start[b + 1] += start[b];
  order.resize(V);
  {
    std::vector<int> at(start.begin(), start.end() - 1);
    for (int i = 0; i < V; ++i) order[at[bid[i]]++] = i;  // index order within each bucket
  }
  const Before before{l};
  int* o = order.data();
  // top_k: the first min(k, candidates with weight) of the order
  int n = std::min(k, start[kBuckets]);
  double sum = 0;
  for (int b = 0; b < kBuckets && start[b] < n; ++b) {
    if (start[b + 1] <= n) {
      sum += mass[b];
    } else {  // the cut falls in this bucket: its best members first
      std::sort(o + start[b], o + start[b + 1], before);
      for (int j = start[b]; j < n; ++j) sum += wf[o[j]];
    }
  }
  const auto wo = [&](int j) { return static_cast<double>(wf[o[j]]); };
  if (top_p < 1.f) {  // the shortest prefix of those n whose mass reaches top_p
    double c = 0, kept = 0;
    for (int b = 0; b < kBuckets && start[b] < n; ++b) {
      const int e = std::min(start[b + 1], n);
      const bool whole = e == start[b + 1];  // (else the top_k cut bucket: sorted already)
      if (whole && c + mass[b] / sum < top_p) {  // the cut is past this bucket
        c += mass[b] / sum;
        kept += mass[b];
        continue;
      }
      if (whole) std::sort(o + start[b], o + e, before);
      if (reaches_top_p(start[b], e, wo, sum, top_p, c, kept, &n)) sum = kept;
      break;
    }
  }
  if (min_p > 0.f) return draw_min_p(n, [&](int j) { return o[j]; }, wo, min_p, rng);
  return draw(n, [&](int j) { return o[j]; }, wo, sum, rng);
}

}  // namespace

int sample_token(const float* logits, int vocab, const SamplingParams& p, std::mt19937_64& rng) {
  if (vocab < 1) throw ValueError("vocab: expected >= 1");
  if (!(p.temperature >= 0.f)) throw ValueError("temperature: expected >= 0");
  if (p.top_k < 0) throw ValueError("top_k: expected >= 0");
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) throw ValueError("top_p: expected a value in (0, 1]");
  if (!(p.min_p >= 0.f && p.min_p <= 1.f)) throw ValueError("min_p: expected a value in [0, 1]");
  const SamplerTable& kt = *NE_PICK_ISA(sampler_table);
  const float* l = logits;
  const int V = vocab;
  const float mx = checked_max(kt, l, V);
  if (p.temperature == 0.f || p.top_k == 1) return static_cast<int>(std::find(l, l + V, mx) - l);

  const int k = (p.top_k > 0 && p.top_k < V) ? p.top_k : V;
  if (static_cast<int64_t>(k) * 256 <= V)
    return sample_small_top_k(l, V, k, p.temperature, mx, p.top_p, p.min_p, rng);
  // the weights of the whole row by the vector kernel (float exp, ~2 ulp), summed in double
  thread_local std::vector<float> wf;
  wf.resize(V);
  // 1 / temperature within float's normal range: at temperature Inf a zero scale would turn a -Inf
  // mask's -Inf * 0 into NaN; FLT_MIN keeps it -Inf (weight 0) and every finite logit at weight ~1
  const float scale = static_cast<float>(
      std::min(std::max(1.0 / p.temperature, static_cast<double>(FLT_MIN)), static_cast<double>(FLT_MAX)));
  const double sum = kt.exp_weights(l, V, mx, scale, wf.data());
  if (k == V && p.top_p >= 1.f) {  // no cut: draw in index order (the distribution is the same)
    const auto w = [&](int j) { return static_cast<double>(wf[j]); };
    if (p.min_p > 0.f) return draw_min_p(V, [](int j) { return j; }, w, p.min_p, rng);
    return draw(V, [](int j) { return j; }, w, sum, rng);
  }
  return sample_bucketed(l, V, k, mx, scale, wf.data(), p.top_p, p.min_p, rng);
}

}  // namespace ne
#endif  // NE_ISA_GENERIC
