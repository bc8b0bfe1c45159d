// The per-token readouts of linear attention, MALA and norm attention and their gradients, one source
// for the CPU training kernels (cpp/ops/linear_attention_train.cpp) and the CUDA chunked kernels
// (cuda/linear_attention_chunk.cuh: __host__ __device__ under nvcc), so both read the states alike.
// r = f(q)^T S'[:Dk] and sk = S'[Dk] (sum v, count) are W = Dv + 1 values; o is Dv values (may alias r).
#pragma once
#include <math.h>

#if defined(__CUDACC__)
#define NE_LAR_HD __host__ __device__ inline
#else
#define NE_LAR_HD inline
#endif

namespace ne {
namespace la_readout {

struct Readout {
  int kind;        // 0 linear, 1 MALA, 2 norm attention (LinAttnKind values)
  bool normalize;  // linear: divide by f(q) . z
  int out_norm;    // norm attention: 0 RMS, 1 LayerNorm (no affine)
  float eps;
  int Dk, Dv;
};

// Norm attention's statistics of r[:Dv]: mu = mean(r) (LayerNorm) or 0 (RMS), inv = 1 / sqrt(mean((r - mu)^2) + eps)
NE_LAR_HD void norm_stats(const Readout& p, const float* r, float& mu, float& inv) {
  const int Dv = p.Dv;
  mu = 0.0f;
  if (p.out_norm == 1) {
    for (int j = 0; j < Dv; ++j) mu += r[j];
    mu /= (float)Dv;
  }
  float ss = 0.0f;
  for (int j = 0; j < Dv; ++j) ss += (r[j] - mu) * (r[j] - mu);
  inv = 1.0f / sqrtf(ss / (float)Dv + p.eps);
}

// o = readout(r, sk) for one token: r = f(q)^T S'[:Dk] (W values), sk = S'[Dk] (W values)
NE_LAR_HD void forward(const Readout& p, const float* r, const float* sk, float* o) {
  const int Dk = p.Dk, Dv = p.Dv;
  if (p.kind == 0) {
    // o = r[:Dv] / (r[Dv] + eps)   (or r[:Dv] unnormalized)
    const float inv = p.normalize ? 1.0f / (r[Dv] + p.eps) : 1.0f;
    for (int j = 0; j < Dv; ++j) o[j] = r[j] * inv;
  } else if (p.kind == 1) {
    // n = sk[Dv], zq = c r[Dv] / n, beta = 1 + 1 / (zq + eps), o = beta (c / n) r[:Dv] - zq sk[:Dv] / n
    const float n = sk[Dv], c = 1.0f / sqrtf((float)Dk);
    const float zq = c * r[Dv] / n, beta = 1.0f + 1.0f / (zq + p.eps);
    const float a = beta * c / n, b = zq / n;
    for (int j = 0; j < Dv; ++j) o[j] = a * r[j] - b * sk[j];
  } else {
    // o = (r - mu) / sqrt(mean((r - mu)^2) + eps), mu = mean(r) (layer) or 0 (rms)
    float mu, inv;
    norm_stats(p, r, mu, inv);
    for (int j = 0; j < Dv; ++j) o[j] = (r[j] - mu) * inv;
  }
}

// dr = d<g, o>/dr, dsk = d<g, o>/dsk for one token (g = grad of o, Dv values; dr, dsk W values)
NE_LAR_HD void backward(const Readout& p, const float* r, const float* sk, const float* g, float* dr, float* dsk) {
  const int Dk = p.Dk, Dv = p.Dv;
  for (int j = 0; j <= Dv; ++j) dsk[j] = 0.0f;
  if (p.kind == 0) {
    if (!p.normalize) {  // o = r[:Dv]: dr[:Dv] = g, dr[Dv] = 0
      for (int j = 0; j < Dv; ++j) dr[j] = g[j];
      dr[Dv] = 0.0f;
      return;
    }
    // o_j = r_j / den, den = r[Dv] + eps: dr_j = g_j / den, dr[Dv] = -sum_j g_j o_j / den
    const float inv = 1.0f / (r[Dv] + p.eps);
    float go = 0.0f;
    for (int j = 0; j < Dv; ++j) {
      dr[j] = g[j] * inv;
      go += g[j] * r[j];
    }
    dr[Dv] = -go * inv * inv;
  } else if (p.kind == 1) {
    // o_j = beta c r_j / n - zq sk_j / n, zq = c r[Dv] / n, beta = 1 + 1 / e, e = zq + eps
    //   dr_j   = g_j beta c / n
    //   gz     = sum_j g_j (-(c / n) r_j / e^2 - sk_j / n)          (d<g, o>/dzq)
    //   dr[Dv] = gz c / n,  dsk_j = -g_j zq / n,  dsk[Dv] = dn = -sum_j g_j o_j / n - gz zq / n
    const float n = sk[Dv], c = 1.0f / sqrtf((float)Dk);
    const float zq = c * r[Dv] / n, e = zq + p.eps, beta = 1.0f + 1.0f / e;
    const float a = beta * c / n, b = zq / n;
    float gz = 0.0f, go = 0.0f;
    for (int j = 0; j < Dv; ++j) {
      dr[j] = g[j] * a;
      dsk[j] = -g[j] * b;
      gz += g[j] * (-(c / n) * r[j] / (e * e) - sk[j] / n);
      go += g[j] * (a * r[j] - b * sk[j]);
    }
    dr[Dv] = gz * c / n;
    dsk[Dv] = -go / n - gz * zq / n;
  } else {
    // o = x inv, x = r - mu, inv = 1 / sqrt(mean(x^2) + eps):
    //   dr_j = inv (g_j - mean(g) [layer only] - o_j mean(g o))
    float mu, inv;
    norm_stats(p, r, mu, inv);
    float gm = 0.0f, go = 0.0f;
    for (int j = 0; j < Dv; ++j) {
      gm += g[j];
      go += g[j] * (r[j] - mu) * inv;
    }
    gm = p.out_norm == 1 ? gm / (float)Dv : 0.0f;
    go /= (float)Dv;
    for (int j = 0; j < Dv; ++j) dr[j] = inv * (g[j] - gm - (r[j] - mu) * inv * go);
    dr[Dv] = 0.0f;
  }
}

}  // namespace la_readout
}  // namespace ne
