// The MLP activations lane-wise, and their derivatives, for the kernel files of one ISA (included inside
// nothing: it opens ne::NE_ISA_NS itself): the gated-activation kernels of ops/gated.cpp, which serve the
// training ops and the runner's activation pass (ops/attention.cpp) alike.
//   gelu_tanh(x) = x / 2 * (1 + tanh(u)) = x * sigmoid(2u),   u = sqrt(2/pi) (x + 0.044715 x^3)
//     d/dx = t + x * 2 t (1 - t) * sqrt(2/pi) (1 + 3 * 0.044715 x^2),   t = sigmoid(2u)
//   silu(x) = x * s,  s = sigmoid(x) = 1 / (1 + exp(-x));   d/dx = s (1 + x (1 - s))
//   gelu(x) = x / 2 * (1 + erf(x / sqrt 2));                d/dx = Phi(x) + x phi(x)   (scalar erf / exp)
//   relu(x) = max(x, 0) (NaN stays NaN);                    d/dx = [x > 0]
#pragma once
#include "core/simd.h"
#include "ops/attention.h"

namespace ne {
namespace NE_ISA_NS {
namespace actmath {

using R = VF::R;
constexpr int N = VF::N;
constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kA = 0.044715f;

inline R sigmoid(R x) {
  R e = vexp(VF::sub(VF::zero(), x));
  alignas(64) float t[N];
  VF::store(t, VF::add(VF::set1(1.f), e));
  for (int i = 0; i < N; ++i) t[i] = 1.f / t[i];
  return VF::load(static_cast<const float*>(t));
}

// f lane-wise through memory (the few activations without a vector form)
template <class F>
inline R lanes(R x, F f) {
  alignas(64) float t[N];
  VF::store(t, x);
  for (int i = 0; i < N; ++i) t[i] = f(t[i]);
  return VF::load(static_cast<const float*>(t));
}

inline R act(Act kind, R x) {
  switch (kind) {
    case Act::GeluTanh: {
      R u = VF::mul(VF::set1(kC), VF::fma(VF::mul(VF::set1(kA), x), VF::mul(x, x), x));
      return VF::mul(x, sigmoid(VF::add(u, u)));
    }
    case Act::Silu: return VF::mul(x, sigmoid(x));
    case Act::Relu: return lanes(x, [](float v) { return v > 0.f ? v : (v != v ? v : 0.f); });
    case Act::Gelu: default:
      return lanes(x, [](float v) { return 0.5f * v * (1.f + __builtin_erff(v * 0.7071067811865476f)); });
  }
}

// act(x) into y, and d act / dx returned
inline R act_grad(Act kind, R x, R& y) {
  const R one = VF::set1(1.f);
  switch (kind) {
    case Act::GeluTanh: {
      R x2 = VF::mul(x, x);
      R u = VF::mul(VF::set1(kC), VF::fma(VF::mul(VF::set1(kA), x), x2, x));
      R t = sigmoid(VF::add(u, u));
      y = VF::mul(x, t);
      R du = VF::mul(VF::set1(kC), VF::fma(VF::set1(3.f * kA), x2, one));  // du/dx
      R dt = VF::mul(VF::mul(VF::add(t, t), VF::sub(one, t)), du);      // d sigmoid(2u)/dx
      return VF::fma(x, dt, t);
    }
    case Act::Silu: {
      R s = sigmoid(x);
      y = VF::mul(x, s);
      return VF::mul(s, VF::fma(x, VF::sub(one, s), one));
    }
    case Act::Relu:
      y = act(kind, x);
      return lanes(x, [](float v) { return v > 0.f ? 1.f : (v != v ? v : 0.f); });
    case Act::Gelu: default:
      y = act(kind, x);
      return lanes(x, [](float v) {
        return 0.5f * (1.f + __builtin_erff(v * 0.7071067811865476f)) +
               v * 0.3989422804014327f * __builtin_expf(-0.5f * v * v);
      });
  }
}

// The same in double, one value (the float64 entry points: gradcheck)
inline double act1(Act kind, double x, double& d) {
  switch (kind) {
    case Act::GeluTanh: {
      const double c = 0.7978845608028654, a = 0.044715;
      const double u = c * (x + a * x * x * x), t = 1.0 / (1.0 + __builtin_exp(-2.0 * u));
      d = t + x * 2.0 * t * (1.0 - t) * c * (1.0 + 3.0 * a * x * x);
      return x * t;
    }
    case Act::Silu: {
      const double s = 1.0 / (1.0 + __builtin_exp(-x));
      d = s * (1.0 + x * (1.0 - s));
      return x * s;
    }
    case Act::Relu:
      d = x > 0.0 ? 1.0 : (x != x ? x : 0.0);
      return x > 0.0 ? x : (x != x ? x : 0.0);
    case Act::Gelu: default:
      d = 0.5 * (1.0 + __builtin_erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * __builtin_exp(-0.5 * x * x);
      return 0.5 * x * (1.0 + __builtin_erf(x * 0.7071067811865476));
  }
}

}  // namespace actmath
}  // namespace NE_ISA_NS
}  // namespace ne
