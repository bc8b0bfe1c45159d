// Sampling the next token from a row of logits.
//   temperature 0: argmax (first index on ties).
//   else: p_i = softmax(logits / temperature); keep the top_k most likely (0: all), then the smallest
//   prefix (by decreasing p) whose mass reaches top_p; renormalize and draw with the caller's RNG.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "normengine/model.h"

namespace ne {

int sample_token(const float* logits, int vocab, const SamplingParams& p, std::mt19937_64& rng) {
  if (vocab < 1) throw ValueError("vocab: expected >= 1");
  if (!(p.temperature >= 0.f)) throw ValueError("temperature: expected >= 0");
  if (p.top_k < 0) throw ValueError("top_k: expected >= 0");
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) throw ValueError("top_p: expected a value in (0, 1]");
  // A NaN or +Inf logit means the forward pass overflowed or the weights hold NaN / Inf: any token
  // picked from such a row would be arbitrary (and NaN breaks the orderings below), so it is an error.
  // -Inf is a legitimate mask, as long as one candidate is left.
  int best = 0;
  bool any_finite = false;
  for (int i = 0; i < vocab; ++i) {
    const float v = logits[i];
    if (std::isnan(v) || v == INFINITY)
      throw ValueError("logits: " + std::string(std::isnan(v) ? "NaN" : "+Inf") + " at token id " + std::to_string(i) +
                       " (the model's forward pass overflowed, or its weights hold NaN / Inf); no token can be "
                       "sampled from this row");
    any_finite = any_finite || v > -INFINITY;
    if (v > logits[best]) best = i;
  }
  if (!any_finite) throw ValueError("logits: every logit is -Inf; no token can be sampled from this row");
  if (p.temperature == 0.f || p.top_k == 1) return best;
  std::vector<int> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  auto by_logit = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  int k = (p.top_k > 0 && p.top_k < vocab) ? p.top_k : vocab;
  if (k < vocab) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), by_logit);
  idx.resize(k);
  std::sort(idx.begin(), idx.end(), by_logit);
  // softmax over the kept candidates, in double
  const double mx = logits[idx[0]];
  std::vector<double> w(k);
  double sum = 0;
  for (int i = 0; i < k; ++i) sum += (w[i] = std::exp((logits[idx[i]] - mx) / p.temperature));
  if (p.top_p < 1.f) {
    double c = 0;
    int keep = k;
    for (int i = 0; i < k; ++i) {
      c += w[i] / sum;
      if (c >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
    w.resize(keep);
    idx.resize(keep);
    sum = std::accumulate(w.begin(), w.end(), 0.0);
  }
  double u = std::uniform_real_distribution<double>(0.0, sum)(rng);
  for (size_t i = 0; i < w.size(); ++i) {
    if (u < w[i]) return idx[i];
    u -= w[i];
  }
  return idx.back();
}

}  // namespace ne
