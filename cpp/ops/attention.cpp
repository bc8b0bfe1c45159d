// Causal softmax attention over a KV cache, rotary position embedding and the MLP activations: the
// per-token kernels of the transformer runner (CPU), compiled once per ISA.
//
// Attention, for query row t of head h (kv head g = h / (n_heads / n_kv_heads), grouped-query):
//   s_j = scale * q_t . k_j            for j = 0..pos_t          (keys of t's own sequence)
//   p_j = exp(s_j - max s) / sum exp(s - max s)
//   o_t = sum_j p_j v_j
// Traffic per query: the visible K and V rows of its head once; at decode that is the cache read
// once per head group, the memory bound of attention.
#include "core/parallel.h"
#include "core/simd.h"
#include "ops/attention.h"

namespace ne {
namespace NE_ISA_NS {

namespace {

using R = VF::R;
constexpr int N = VF::N;

inline int width(int64_t n, int64_t i) { return n - i < N ? static_cast<int>(n - i) : N; }

inline float dot(const float* a, const float* b, int n) {
  R acc0 = VF::zero(), acc1 = VF::zero();
  int i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    acc0 = VF::fma(VF::load(a + i), VF::load(b + i), acc0);
    acc1 = VF::fma(VF::load(a + i + N), VF::load(b + i + N), acc1);
  }
  for (; i < n; i += N) {
    int k = width(n, i);
    acc0 = VF::fma(loadn<VF>(a + i, k), loadn<VF>(b + i, k), acc0);
  }
  return static_cast<float>(VF::reduce(VF::add(acc0, acc1)));
}

void attention(const AttnArgs& a) {
  const int D = a.head_dim, group = a.n_heads / a.n_kv_heads;
  const int64_t ldkv = static_cast<int64_t>(a.n_kv_heads) * D;
  parallel_for(a.n_tokens * a.n_heads, 1, [&](int64_t w0, int64_t w1, int tid) {
    float* s = a.scratch + static_cast<int64_t>(tid) * a.scratch_stride;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / a.n_heads;
      const int h = static_cast<int>(w % a.n_heads), g = h / group;
      const float* q = a.q + t * a.ldq + static_cast<int64_t>(h) * D;
      const float* K = a.k[t] + static_cast<int64_t>(g) * D;
      const float* V = a.v[t] + static_cast<int64_t>(g) * D;
      const int64_t L = static_cast<int64_t>(a.pos[t]) + 1;
      // scores and their max
      float mx = -__builtin_inff();
      for (int64_t j = 0; j < L; ++j) {
        float v = a.scale * dot(q, K + j * ldkv, D);
        s[j] = v;
        mx = v > mx ? v : mx;
      }
      // p = exp(s - max), sum
      R sum = VF::zero();
      const R mxv = VF::set1(mx);
      for (int64_t j = 0; j < L; j += N) {
        int k = width(L, j);
        R e = VF::keep(vexp(VF::sub(loadn<VF>(s + j, k), mxv)), k);
        storen<VF>(s + j, e, k);
        sum = VF::add(sum, e);
      }
      const float inv = static_cast<float>(1.0 / VF::reduce(sum));
      // o = sum_j p_j v_j / sum
      float* o = a.out + t * a.ldo + static_cast<int64_t>(h) * D;
      for (int d0 = 0; d0 < D; d0 += N) {
        int k = width(D, d0);
        R acc = VF::zero();
        for (int64_t j = 0; j < L; ++j) acc = VF::fma(VF::set1(s[j]), loadn<VF>(V + j * ldkv + d0, k), acc);
        storen<VF>(o + d0, VF::mul(acc, VF::set1(inv)), k);
      }
    }
  });
}

void rope(const RopeArgs& a) {
  const int half = a.head_dim / 2;
  parallel_for(a.n_tokens, 16, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = a.cos + static_cast<int64_t>(a.pos[t]) * half;
      const float* s = a.sin + static_cast<int64_t>(a.pos[t]) * half;
      for (int h = 0; h < a.n_heads; ++h) {
        float* x = a.x + t * a.ldx + static_cast<int64_t>(h) * a.head_dim;
        for (int i = 0; i < half; i += N) {
          int k = width(half, i);
          R x1 = loadn<VF>(x + i, k), x2 = loadn<VF>(x + half + i, k);
          R cv = loadn<VF>(c + i, k), sv = loadn<VF>(s + i, k);
          storen<VF>(x + i, VF::sub(VF::mul(x1, cv), VF::mul(x2, sv)), k);
          storen<VF>(x + half + i, VF::fma(x1, sv, VF::mul(x2, cv)), k);
        }
      }
    }
  });
}

// Activations, lane-wise:
//   gelu_tanh(x) = x / 2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x * sigmoid(2u), u the tanh argument
//   silu(x) = x * sigmoid(x),  sigmoid(x) = 1 / (1 + exp(-x))
//   gelu(x) = x / 2 * (1 + erf(x / sqrt 2))   (scalar erf: used by few checkpoints)
inline R sigmoid(R x) {
  R e = vexp(VF::sub(VF::zero(), x));
  alignas(64) float t[N];
  VF::store(t, VF::add(VF::set1(1.f), e));
  for (int i = 0; i < N; ++i) t[i] = 1.f / t[i];
  return VF::load(static_cast<const float*>(t));
}

inline R act(Act kind, R x) {
  switch (kind) {
    case Act::GeluTanh: {
      R u = VF::mul(VF::set1(0.7978845608028654f), VF::fma(VF::mul(VF::set1(0.044715f), x), VF::mul(x, x), x));
      return VF::mul(x, sigmoid(VF::add(u, u)));
    }
    case Act::Silu: return VF::mul(x, sigmoid(x));
    case Act::Relu: {
      alignas(64) float t[N];
      VF::store(t, x);
      for (int i = 0; i < N; ++i) t[i] = t[i] > 0.f ? t[i] : (t[i] != t[i] ? t[i] : 0.f);
      return VF::load(static_cast<const float*>(t));
    }
    case Act::Gelu: default: {
      alignas(64) float t[N];
      VF::store(t, x);
      for (int i = 0; i < N; ++i) t[i] = 0.5f * t[i] * (1.f + __builtin_erff(t[i] * 0.7071067811865476f));
      return VF::load(static_cast<const float*>(t));
    }
  }
}

void activation(const ActArgs& a) {
  parallel_for(a.rows, a.n >= 4096 ? 1 : 4096 / (a.n > 0 ? a.n : 1), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = a.a + r * a.lda;
      const float* b = a.b ? a.b + r * a.ldb : nullptr;
      float* o = a.out + r * a.ldo;
      for (int64_t i = 0; i < a.n; i += N) {
        int k = width(a.n, i);
        R y = act(a.act, loadn<VF>(x + i, k));
        if (b) y = VF::mul(y, loadn<VF>(b + i, k));
        storen<VF>(o + i, y, k);
      }
    }
  });
}

}  // namespace

const AttentionTable* attention_table() {
  static const AttentionTable table = {attention, rope, activation};
  return &table;
}

}  // namespace NE_ISA_NS
}  // namespace ne
