// L-Mul entry points (ops/lmul.h): argument checks, x preparation, work split, ISA pick.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/parallel.h"
#include "normengine/errors.h"
#include "normengine/ops.h"
#include "ops/lmul.h"

namespace ne {
namespace isa_generic {
float lmul_scalar_impl(float a, float b, int bits);  // lmul.cpp, generic build
}

namespace {
const LmulTable& table() { return *NE_PICK_ISA(lmul_table); }
void check_bits(int bits) {
  if (bits < 1 || bits > 23)
    throw ValueError("mantissa_bits: expected 1..23 (fp32 mantissa bits kept), got " + std::to_string(bits));
}
}  // namespace

float lmul_scalar(float a, float b, int mantissa_bits) {
  check_bits(mantissa_bits);
  return isa_generic::lmul_scalar_impl(a, b, mantissa_bits);
}

void lmul_map_f32(int64_t n, const float* a, const float* b, float* out, int mantissa_bits) {
  check_bits(mantissa_bits);
  const LmulTable& t = table();
  parallel_for(n, 1 << 15, [&](int64_t i0, int64_t i1, int) { t.map(i1 - i0, a + i0, b + i0, out + i0, mantissa_bits); });
}

void lmul_gemm_f32(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* w, int64_t ldw,
                   const float* bias, float* y, int64_t ldy, bool accumulate, int mantissa_bits) {
  check_bits(mantissa_bits);
  if (M < 0 || N < 0 || K < 0) throw ShapeError("lmul_gemm: negative size");
  if (M == 0 || N == 0) return;
  const LmulTable& t = table();
  // prepared x (t(x) - C, contiguous) and its row stats
  std::vector<uint32_t> xp(static_cast<size_t>(M * K));
  std::vector<LmulRowStat> st(static_cast<size_t>(M));
  parallel_for(M, std::max<int64_t>(1, 16384 / (K + 1)), [&](int64_t m0, int64_t m1, int) {
    for (int64_t m = m0; m < m1; ++m) st[m] = t.prep_row(K, x + m * ldx, xp.data() + m * K, mantissa_bits);
  });
  LmulArgs a{M, N, K, xp.data(), st.data(), w, ldw, bias, y, ldy, accumulate, mantissa_bits};
  // split N in groups of 32 columns (a whole number of panels for every ISA)
  const int64_t groups = (N + 31) / 32;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (M * K * 32 + 1));
  parallel_for(groups, grain, [&](int64_t g0, int64_t g1, int) {
    t.gemm_cols(a, g0 * 32, std::min(N, g1 * 32));
  });
}

// Per (token, head): s_j = scale * sum_d lmul(q_d, k_jd) (d in order); p = softmax(s) (exact, fp32);
// o_d = sum_j lmul(p_j, v_jd) (j in order). Traffic: K and V of the visible prefix read once per head.
void lmul_cache_attention(const AttnArgs& a, int mantissa_bits) {
  check_bits(mantissa_bits);
  const LmulTable& t = table();
  const int D = a.head_dim, group = a.n_heads / a.n_kv_heads;
  const int64_t ldkv = static_cast<int64_t>(a.n_kv_heads) * D;
  parallel_for_upto(a.n_tokens * a.n_heads, 1, a.scratch_threads, [&](int64_t w0, int64_t w1, int tid) {
    float* s = a.scratch + static_cast<int64_t>(tid) * a.scratch_stride;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t tok = w / a.n_heads;
      const int h = static_cast<int>(w % a.n_heads), g = h / group;
      const float* q = a.q + tok * a.ldq + static_cast<int64_t>(h) * D;
      const float* K = a.k[tok] + static_cast<int64_t>(g) * D;
      const float* V = a.v[tok] + static_cast<int64_t>(g) * D;
      const int64_t L = static_cast<int64_t>(a.pos[tok]) + 1;
      float mx = -INFINITY;
      t.dots(L, D, q, K, ldkv, s, mantissa_bits);
      for (int64_t j = 0; j < L; ++j) {
        s[j] = a.scale * s[j];
        mx = s[j] > mx ? s[j] : mx;
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = 1.0f / sum;
      float* o = a.out + tok * a.ldo + static_cast<int64_t>(h) * D;
      for (int d = 0; d < D; ++d) o[d] = 0.0f;
      for (int64_t j = 0; j < L; ++j) t.axpy(D, s[j] * inv, V + j * ldkv, o, mantissa_bits);
    }
  });
}

}  // namespace ne
