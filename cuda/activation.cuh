// The MLP activations on the GPU, and their derivatives (the CPU's ops/activation_math.h): kind 0 gelu_tanh,
// 1 gelu (erf), 2 silu, 3 relu. Shared by the runner's activation pass (cuda/runner.cu) and the training ops'
// gated activations (cuda/activation.cu). A is float or double.
#pragma once
#include <cmath>

namespace ne {
namespace cuda {

template <class A>
__device__ __forceinline__ A act_fn(int kind, A x) {
  switch (kind) {
    case 0: {
      const A u = A(0.7978845608028654) * fma(A(0.044715) * x, x * x, x);
      return x / (A(1) + exp(-A(2) * u));
    }
    case 1: return A(0.5) * x * (A(1) + erf(x * A(0.7071067811865476)));
    case 2: return x / (A(1) + exp(-x));
    default: return x > A(0) ? x : (x != x ? x : A(0));
  }
}

// act(x) into y; d act / dx returned
template <class A>
__device__ __forceinline__ A act_grad(int kind, A x, A& y) {
  switch (kind) {
    case 0: {
      const A c = A(0.7978845608028654), a = A(0.044715);
      const A u = c * fma(a * x, x * x, x), t = A(1) / (A(1) + exp(-A(2) * u));
      y = x * t;
      return t + x * A(2) * t * (A(1) - t) * c * (A(1) + A(3) * a * x * x);
    }
    case 1:
      y = act_fn(kind, x);
      return A(0.5) * (A(1) + erf(x * A(0.7071067811865476))) + x * A(0.3989422804014327) * exp(-A(0.5) * x * x);
    case 2: {
      const A s = A(1) / (A(1) + exp(-x));
      y = x * s;
      return s * (A(1) + x * (A(1) - s));
    }
    default:
      y = act_fn(kind, x);
      return x > A(0) ? A(1) : (x != x ? x : A(0));
  }
}

}  // namespace cuda
}  // namespace ne
