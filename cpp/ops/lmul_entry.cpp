// L-Mul entry points (ops/lmul.h): argument checks, x preparation, work split, ISA pick.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
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
// s[0 .. L) <- softmax(scale * s), exact fp32, in key order (the max, then the exps and their sum,
// then each times 1 / sum).
void softmax_row(float* s, int64_t L, float scale, float softcap_c = 0.f) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    s[j] = scale * s[j];
    if (softcap_c > 0) s[j] = softcap(s[j], softcap_c);
    mx = s[j] > mx ? s[j] : mx;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < L; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < L; ++j) s[j] *= inv;
}

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
                   const float* bias, float* y, int64_t ldy, bool accumulate, int mantissa_bits, bool w_kn) {
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
  LmulArgs a{M, N, K, xp.data(), st.data(), w, ldw, bias, y, ldy, accumulate, mantissa_bits, w_kn};
  // split N in groups of 32 columns (a whole number of panels for every ISA)
  const int64_t groups = (N + 31) / 32;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (M * K * 32 + 1));
  parallel_for(groups, grain, [&](int64_t g0, int64_t g1, int) {
    t.gemm_cols(a, g0 * 32, std::min(N, g1 * 32));
  });
}

namespace {
// One query row (token t, head h) on its own: s_j = scale * sum_d lmul(q_d, k_jd) (d in order) for the
// visible keys J <= j <= pos (J = first_key: 0, or the sliding window's start); p = softmax(s) (exact,
// fp32); o_d = sum_j lmul(p_j, v_jd) (j in order). K, V: the kv head's rows of keys J0, J0 + 1, ... (J0 <=
// J), `ld` floats apart. s: room for pos + 1 - J floats. The definition the blocked path below reproduces
// bit for bit.
void attend_one(const AttnArgs& a, int64_t tok, int h, const float* K, const float* V, int64_t ld, int64_t J0,
                float* s, int bits) {
  const LmulTable& t = table();
  const int D = a.head_dim;
  const float* q = a.q + tok * a.ldq + static_cast<int64_t>(h) * D;
  const int64_t J = first_key(a.pos[tok], a.window), L = static_cast<int64_t>(a.pos[tok]) + 1 - J;
  t.dots(L, D, q, K + (J - J0) * ld, ld, s, bits);
  float* o = a.out + tok * a.ldo + static_cast<int64_t>(h) * D;
  for (int d = 0; d < D; ++d) o[d] = 0.0f;
  softmax_row(s, L, a.scale, a.softcap);
  for (int64_t j = 0; j < L; ++j) t.axpy(D, s[j], V + (J - J0 + j) * ld, o, bits);
}
}  // namespace

// Blocked over queries. Each work item is one KV head g and a block of consecutive tokens that read the
// same cache (a prefill's rows, or one decode token): its rows are the block's queries of the `group`
// heads that share g (row i * group + hh: token t0 + i, head g * group + hh), and it does two L-Mul GEMMs
// (gemm_cols: integer-add products on register tiles, the fast products wherever the exponent ranges
// allow; K and V prepared once for all the rows):
//   S = Q K^T           keys J0 .. Lmax - 1 (Lmax = the block's last position + 1, J0 = its first row's
//                       first_key: 0 without a sliding window); a row's scores outside its own keys
//                       are computed and ignored
//   P = softmax(scale S) per row over its visible keys, P_j = 0 outside them
//   O = P V             V read in place as the [K, N] operand (LmulArgs::w_kn)
// Same bits as attend_one: the GEMMs sum each output in k order starting from +0, as dots / axpy do,
// and a masked P_j = 0 adds a signed zero, which changes no sum (a float sum is -0 only when both addends
// are). Except 0 * Inf = NaN: a block whose masked keys hold an Inf / NaN in V takes attend_one.
void lmul_cache_attention(const AttnArgs& a, int mantissa_bits) {
  check_bits(mantissa_bits);
  const LmulTable& t = table();
  const int D = a.head_dim, G = a.n_kv_heads, group = a.n_heads / a.n_kv_heads;
  const int64_t ldkv = static_cast<int64_t>(G) * D;
  // tokens per block: about 32 rows (the causal waste grows with it, the reuse of each packed K / V
  // block too)
  const int64_t qb = std::max(1, 32 / group);
  std::vector<std::pair<int64_t, int64_t>> blocks;  // runs of consecutive tokens over one cache, cut every qb
  for (int64_t t0 = 0; t0 < a.n_tokens;) {
    int64_t t1 = t0 + 1;
    while (t1 < a.n_tokens && t1 - t0 < qb && a.k[t1] == a.k[t0] && a.v[t1] == a.v[t0]) ++t1;
    blocks.emplace_back(t0, t1);
    t0 = t1;
  }
  // Work items handed out one at a time, last blocks first: a causal prefill's later blocks see more
  // keys, and fixed contiguous ranges would leave one thread with most of the work.
  const int64_t items = static_cast<int64_t>(blocks.size()) * G;
  std::atomic<int64_t> next{0};
  parallel_for(items, 1, [&](int64_t, int64_t, int) {
    std::vector<uint32_t> xp;
    std::vector<LmulRowStat> st;
    std::vector<float> S, O, Kg, Vg;
    for (int64_t w = items - 1 - next.fetch_add(1); w >= 0; w = items - 1 - next.fetch_add(1)) {
      const int64_t t0 = blocks[w / G].first, n = blocks[w / G].second - t0, rows = n * group;
      const int g = static_cast<int>(w % G);
      int64_t Lmax = 0, Lmin = INT64_MAX, J0 = INT64_MAX, J1 = 0;  // rows' key ranges [J, L): J0 / J1 min / max J
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = a.pos[t0 + i], J = first_key(p, a.window);
        Lmax = std::max<int64_t>(Lmax, p + 1);
        Lmin = std::min<int64_t>(Lmin, p + 1);
        J0 = std::min(J0, J);
        J1 = std::max(J1, J);
      }
      // from here on, keys are counted from J0: K and V start at key J0 (rows ld floats apart), the block
      // sees W = Lmax - J0 keys. A ring cache (a.ring) whose keys J0 .. Lmax - 1 wrap around its end: they
      // are gathered back to back first.
      const int64_t W = Lmax - J0;
      const float* K = a.k[t0] + static_cast<int64_t>(g) * D + key_row(J0, a.ring) * ldkv;
      const float* V = a.v[t0] + static_cast<int64_t>(g) * D + key_row(J0, a.ring) * ldkv;
      int64_t ld = ldkv;
      if (contiguous_keys(J0, W, a.ring) < W) {
        Kg.resize(static_cast<size_t>(W * D));
        Vg.resize(static_cast<size_t>(W * D));
        for (int64_t j = 0; j < W; ++j) {
          const int64_t r = key_row(J0 + j, a.ring) * ldkv + static_cast<int64_t>(g) * D;
          std::memcpy(&Kg[j * D], a.k[t0] + r, sizeof(float) * D);
          std::memcpy(&Vg[j * D], a.v[t0] + r, sizeof(float) * D);
        }
        K = Kg.data(), V = Vg.data(), ld = D;
      }
      S.resize(static_cast<size_t>(rows * W));
      // does a key some row must not see hold an Inf / NaN in V?
      bool masked_special = false;
      for (int64_t j = 0; j < W && !masked_special; ++j)
        if (j + J0 < J1 || j + J0 >= Lmin)
          for (int d = 0; d < D; ++d) masked_special |= !std::isfinite(V[j * ld + d]);
      if (masked_special) {
        for (int64_t i = 0; i < n; ++i)
          for (int hh = 0; hh < group; ++hh)
            attend_one(a, t0 + i, g * group + hh, K, V, ld, J0, S.data(), mantissa_bits);
        continue;
      }
      // The head's K and V slices are 4 D bytes of every row of the cache, rows apart by the whole width:
      // a strided read that the hardware prefetchers do not follow. Requested here all at once, they
      // arrive with as many misses in flight as the core allows.
      for (int64_t j = 0; j < W; ++j)
        for (int d = 0; d < D; d += 16) {
          __builtin_prefetch(K + j * ld + d);
          __builtin_prefetch(V + j * ld + d);
        }
      xp.resize(static_cast<size_t>(rows * std::max<int64_t>(D, W)));
      st.resize(static_cast<size_t>(rows));
      O.resize(static_cast<size_t>(rows * D));
      // S = Q K^T (the block's q rows of heads g * group .. are adjacent in q)
      for (int64_t m = 0; m < rows; ++m)
        st[m] = t.prep_row(D, a.q + (t0 + m / group) * a.ldq + (static_cast<int64_t>(g) * group + m % group) * D,
                           xp.data() + m * D, mantissa_bits);
      const LmulArgs qk{rows, W, D, xp.data(), st.data(), K, ld, nullptr, S.data(), W, false, mantissa_bits};
      t.gemm_cols(qk, 0, W);
      // P, then its prepared rows: row m's keys are [J - J0, L - J0) of the block's
      for (int64_t m = 0; m < rows; ++m) {
        float* s = S.data() + m * W;
        const int64_t p = a.pos[t0 + m / group], lo = first_key(p, a.window) - J0, hi = p + 1 - J0;
        softmax_row(s + lo, hi - lo, a.scale, a.softcap);
        std::fill(s, s + lo, 0.0f);
        std::fill(s + hi, s + W, 0.0f);
        st[m] = t.prep_row(W, s, xp.data() + m * W, mantissa_bits);
      }
      // O = P V, then each token's group * D outputs into place
      const LmulArgs pv{rows, D, W, xp.data(), st.data(), V, ld, nullptr, O.data(), D, false, mantissa_bits, true};
      t.gemm_cols(pv, 0, D);
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(a.out + (t0 + i) * a.ldo + static_cast<int64_t>(g) * group * D, O.data() + i * group * D,
                    sizeof(float) * static_cast<size_t>(group * D));
    }
  });
}

}  // namespace ne
