// The runner's linear-attention step (CPU): T tokens of one sequence through the recurrent form,
// continuing from and updating the sequence's state. The math is in linear_attention.h; per token
// and head:
//   S' = lambda S' + [f(k); 1] [v; 1]^T            (one rank-1 update of a (Dk+1) x (Dv+1) matrix)
//   r  = f(q)^T S'[:Dk, :]                          (Dv + 1 numbers: S^T f(q) and f(q) . z)
//   o  = readout(r, S'[Dk, :])                      (linear / MALA / norm, below)
// Memory traffic per token: the state once in and once out (4 (Dk+1)(Dv+1) bytes per head, L1/L2
// resident), independent of the position: decode memory and time never grow with the length.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/parallel.h"
#include "ops/linear_attention.h"

namespace ne {

namespace {

inline float feature(FeatureMap f, float x) {
  switch (f) {
    case FeatureMap::Elu1: return x > 0.f ? x + 1.f : std::exp(x);  // elu(x) + 1
    case FeatureMap::Relu: return x > 0.f ? x : 0.f;
    default: return x;
  }
}

}  // namespace

void linear_attention_sequence(const LinAttnSeqArgs& a) {
  const LinAttnParams& p = a.p;
  const int dk = a.dk, dv = a.dv, group = a.n_heads / a.n_kv_heads;
  const int64_t w = dv + 1;  // state row width
  const FeatureMap f = p.kind == LinAttnKind::Linear ? p.fmap
                     : p.kind == LinAttnKind::Mala   ? FeatureMap::Elu1
                                                     : FeatureMap::Identity;
  parallel_for(a.n_heads, 1, [&](int64_t h0, int64_t h1, int) {
    std::vector<float> fq(dk), fk(dk), r(w);
    for (int64_t h = h0; h < h1; ++h) {
      float* S = a.state + h * (dk + 1) * w;
      const float lam = (p.kind == LinAttnKind::Norm && a.decay) ? a.decay[h] : 1.0f;
      for (int64_t t = 0; t < a.T; ++t) {
        const float* q = a.q + t * a.ldq + h * dk;
        const float* k = a.k + t * a.ldk + (h / group) * dk;
        const float* v = a.v + t * a.ldv + (h / group) * dv;
        for (int i = 0; i < dk; ++i) {
          fq[i] = feature(f, q[i]);
          fk[i] = feature(f, k[i]);
        }
        // S' = lambda S' + [f(k); 1][v; 1]^T, and r = f(q)^T S'[:Dk] in the same pass over S'
        std::fill(r.begin(), r.end(), 0.0f);
        for (int i = 0; i <= dk; ++i) {
          float* row = S + i * w;
          const float ki = i < dk ? fk[i] : 1.0f;
          for (int j = 0; j < dv; ++j) row[j] = lam * row[j] + ki * v[j];
          row[dv] = lam * row[dv] + ki;
          if (i < dk) {
            const float qi = fq[i];
            for (int j = 0; j < w; ++j) r[j] += qi * row[j];
          }
        }
        float* o = a.o + t * a.ldo + h * dv;
        const float* vsum = S + dk * w;  // S'[Dk, :Dv] = sum v, S'[Dk, Dv] = t
        if (p.kind == LinAttnKind::Linear) {
          const float inv = p.normalize ? 1.0f / (r[dv] + p.eps) : 1.0f;
          for (int j = 0; j < dv; ++j) o[j] = r[j] * inv;
        } else if (p.kind == LinAttnKind::Mala) {
          const float n = vsum[dv], c = 1.0f / std::sqrt(static_cast<float>(dk));
          const float zq = c * r[dv] / n, beta = 1.0f + 1.0f / (zq + p.eps);
          for (int j = 0; j < dv; ++j) o[j] = beta * (c / n) * r[j] - zq * vsum[j] / n;
        } else {  // norm attention: Norm(S^T q) over the head's Dv channels, no affine
          float mu = 0.0f;
          if (p.out_norm == 1) {
            for (int j = 0; j < dv; ++j) mu += r[j];
            mu /= static_cast<float>(dv);
          }
          float ss = 0.0f;
          for (int j = 0; j < dv; ++j) ss += (r[j] - mu) * (r[j] - mu);
          const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dv) + p.eps);
          for (int j = 0; j < dv; ++j) o[j] = (r[j] - mu) * inv;
        }
      }
    }
  });
}

}  // namespace ne
