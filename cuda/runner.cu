// The transformer runner on a CUDA GPU: ne::CudaRunner, the twin of the CPU ne::Runner
// (cpp/model/runner.cpp) with the same contract, the same math and the same buffers, in device memory.
// One forward call stacks the tokens of any mix of sequences (prefill and decode) into one
// activation matrix x [T, d]; per layer:
//   xn = norm(x)                                  (ne::norm_forward -> cuda/norm.cu)
//   q, k, v = xn Wq^T (+bq), xn Wk^T (+bk), xn Wv^T (+bv)           (linear: gemv / tiled GEMM)
//   (Qwen3: q, k = per-head RMSNorm(q), (k));  RoPE(q, k) unless learned positions;
//   K/V cache[slot][pos] = k, v                                       (rope_cache_kernel)
//   att = softmax(q K^T / sqrt(D)) V over keys 0..pos, GQA            (attention_kernel)
//     (a sliding-window layer, spec.window: over keys pos - W + 1 .. pos only)
//     or, in a linear / MALA / norm attention layer (spec.attention), att = the op's readout of the
//     slot's fixed-size state after each token's update (cuda::linear_attention_rows, no KV cache)
//   x += att Wo^T (+bo)                           (the GEMM's accumulate epilogue: beta = 1; parallel
//                                                  residual (GPT-NeoX): after the MLP, which reads the same x)
//   xn = norm(x);  up = xn Wu^T (+bu);  gated: up = act(xn Wg^T (+bg)) * up, else up = act(up)
//   x += up Wd^T (+bd)
//   (a mixture-of-experts layer, spec.n_experts: the router's logits to the host, which routes and groups the
//   rows per expert as the CPU runner; each expert's GEMMs over its rows gathered (gather_rows_kernel); each
//   row's experts, and the shared expert, added into x by moe_combine_kernel)
// then logits = norm(x) Wlm^T (+blm) on all rows or on each sequence's last row (gather_rows_kernel).
//
// Everything of one call runs on the caller's stream; the only host work is checking the
// arguments and one small host-to-device copy of the per-token indices (token, position, slot) from
// a pinned staging buffer (and, per mixture-of-experts layer, the router's logits back and the routing over:
// the one place a call waits for the GPU). Weights are the caller's device memory (zero-copy); the KV cache, the
// RoPE table and the activations are allocated once (activations grow only when a larger call comes).
//
// Linear layers: y[M, N] (+)= x[M, K] W[N, K]^T (+ b) through cuda::dense_linear (cuda/gemm.cu: a GEMV
// for decode, tiled FMA GEMMs for prefill, fp32 sums), cuda::quant_linear for packed weights,
// cuda::bf16_linear (tensor cores) for bfloat16 weights under matmul_precision "medium", and
// cuda::lmul_linear under lmul_scope "all".
// Fused norms (fused_norms(): every norm's gain 1 and bias 0, folded into its readers by
// normengine.convert, and no L-Mul): a norm followed by linear layers runs as norm_linear, the row
// statistics (cuda::norm_stats) then the readers' GEMMs with the norm epilogue (LayerNorm's mean
// subtracted as x is read, rstd scaling the sums; for the tensor cores' bf16 readers, x normalized as it
// is rounded to bf16): the normalized activation is never written.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "activation.cuh"
#include "common.cuh"
#include "normengine/model.h"
#include "model/weights.h"
#include "ops/lmul.h"
#include "ops/lmul_bits.h"
#include "ops/norm.h"
#include "ops/quant_elem.h"

namespace ne {
namespace cuda {

// A weight as the kernels read it (device memory owned by the caller). Outside the anonymous
// namespace: CudaRunner's members hold it.
struct DevW {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;
  bool quant = false;  // a packed weight (set_quant_tensor): q holds it, device pointers
  QWeight q;
  bool present() const { return data != nullptr; }
  const float* f32() const { return static_cast<const float*>(data); }
};

namespace {

// ============================================================================ device helpers

constexpr int kDtF32 = static_cast<int>(DType::F32), kDtF16 = static_cast<int>(DType::F16);

// Element i of a float32 / float16 / bfloat16 array, as float (dt: a DType value).
__device__ __forceinline__ float load_any(const void* p, int dt, int64_t i) {
  if (dt == kDtF32) return static_cast<const float*>(p)[i];
  if (dt == kDtF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// ============================================================================ per-token kernels

// x[t, :] = E[tok[t], :] (+ P[pos[t], :]): one block per token, threads along d. E dense, or packed
// (quant: a quantized, tied embedding, its elements read by ops/quant_elem.h as the CPU runner's are).
struct EmbedParams {
  const void* emb;
  int emb_dt;
  int64_t emb_ld;
  bool quant = false;
  QWeight q;
  const void* pos_emb;  // null without learned positions
  int pos_dt;
  int64_t pos_ld;
  const int32_t* tok;
  const int32_t* pos;
  float* x;
  int64_t d;
  float emb_scale;  // Gemma's sqrt(d); 1 otherwise
};

__global__ void embed_kernel(const EmbedParams p) {
  const int64_t t = blockIdx.x;
  const int64_t er = static_cast<int64_t>(p.tok[t]) * p.emb_ld, pr = static_cast<int64_t>(p.pos[t]) * p.pos_ld;
  float* x = p.x + t * p.d;
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x) {
    float v = p.quant ? quant_elem(p.q, p.tok[t], i) : load_any(p.emb, p.emb_dt, er + i);
    if (p.emb_scale != 1.0f) v *= p.emb_scale;
    if (p.pos_emb) v += load_any(p.pos_emb, p.pos_dt, pr + i);
    x[i] = v;
  }
}

// Rotary embedding of q (in place) and k, and the K/V cache write of token t (one block per token):
//   x'[i] = x[i] cos - x[i + D/2] sin,  x'[i + D/2] = x[i + D/2] cos + x[i] sin   (per head, i < D/2)
// with cos/sin = table[pos[t], i] (built on the host in float32 exactly as the CPU runner does).
// K' goes straight to kcache[slot][pos], V is copied to vcache[slot][pos]. Without RoPE (cos null),
// K is copied as is. TC: the caches' element type, float, or __nv_bfloat16 (spec.kv_bf16: each value
// rounded to nearest even once, as the CPU runner's bf16 cache), or int8_t (spec.kv_int8: K' is written back
// over K, then each head's row of K' and of V quantized by one warp as the CPU runner's quantize_int8 does:
// s = max |x| / 127 into kscale / vscale [slots][ctx][n_kv_heads], round(x / s) into the cache). A
// linear-family layer (kcache null) keeps no cache: K' is written back over K, as Q' over Q.
struct RopeCacheParams {
  float* q;
  float* k;  // rotated in place when kcache is null (a linear-family layer: no cache)
  const float* v;
  int64_t ldq, ldkv;
  const int32_t* pos;
  const int32_t* slot;
  const float* cos;  // [ctx, D/2] or null (learned positions)
  const float* sin;
  void* kcache;      // [slots][ctx][n_kv_heads * D] of TC, or null: RoPE of q and k in place only
  void* vcache;
  float* kscale;     // int8 caches: [slots][ctx][n_kv_heads] (else unused)
  float* vscale;
  int64_t ctx;
  int n_heads, n_kv_heads, head_dim;
  // Per-head RMSNorm of q and k before the rotation (Qwen3; null: none), with the model's norm_eps:
  //   x_h <- x_h / sqrt(mean(x_h^2) + eps) * g   (q heads with q_norm, k heads with k_norm)
  const float* q_norm;
  const float* k_norm;
  float norm_eps;
  int rot_dim;  // rotary dims per head (partial rotary: the first rot_dim; the rest pass through)
};

template <class TC> __device__ __forceinline__ TC to_cache(float x);
template <> __device__ __forceinline__ float to_cache<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 to_cache<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
// An int8 row needs its scale first: quantize_row_int8 writes it whole, and rope_cache_kernel<int8_t> never
// writes a value alone (its `direct` is false); reaching this is a bug.
template <> __device__ __forceinline__ int8_t to_cache<int8_t>(float) {
  __trap();
  return 0;
}
__device__ __forceinline__ float from_cache(float x) { return x; }
__device__ __forceinline__ float from_cache(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float from_cache(int8_t x) { return static_cast<float>(x); }

// One warp: a head's row x[0 .. D) into an int8 cache row q with its scale (ops/attention.cpp quantize_row_int8):
// s = max |x| / 127, q = round(x / s) to nearest even, clamped to +-127; zeros: s = 0; NaN or Inf: s = NaN, q = 0.
__device__ void quantize_row_int8(const float* x, int D, int8_t* q, float* scale, int lane) {
  float amax = 0.f, bad = 0.f;  // bad: 1 where this lane saw NaN or Inf
  for (int i = lane; i < D; i += 32) {
    bad = fabsf(x[i]) <= 3.402823466e38f ? bad : 1.f;  // (false for NaN and Inf)
    amax = fmaxf(amax, fabsf(x[i]));
  }
  for (int off = 16; off; off >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    bad = fmaxf(bad, __shfl_xor_sync(0xffffffffu, bad, off));
  }
  const bool finite = bad == 0.f;
  const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
  for (int i = lane; i < D; i += 32)  // (rintf: to nearest even, as the CPU's nearbyint)
    q[i] = static_cast<int8_t>(rintf(fminf(127.f, fmaxf(-127.f, x[i] * inv))));
  if (lane == 0) *scale = !finite ? NAN : amax > 0.f ? amax / 127.f : 0.f;
}

template <class TC>
__global__ void rope_cache_kernel(const RopeCacheParams p) {
  const int64_t t = blockIdx.x;
  const int D = p.head_dim, half = p.rot_dim / 2;
  const int64_t pos = p.pos[t], dkv = static_cast<int64_t>(p.n_kv_heads) * D;
  const int64_t row = (static_cast<int64_t>(p.slot[t]) * p.ctx + pos) * dkv;
  constexpr bool q8 = std::is_same<TC, int8_t>::value;
  const bool cached = p.kcache != nullptr;
  const bool direct = cached && !q8;  // K' and V written to the cache as they are made (else quantized after)
  TC* kdst = cached ? static_cast<TC*>(p.kcache) + row : nullptr;
  TC* vdst = cached ? static_cast<TC*>(p.vcache) + row : nullptr;
  float* k = p.k + t * p.ldkv;
  const float* v = p.v + t * p.ldkv;
  float* q = p.q + t * p.ldq;
  if (p.q_norm) {  // one warp per head: sum of squares by shuffles, then the scaled row in place
    const int lane = threadIdx.x % 32;
    for (int h = threadIdx.x / 32; h < p.n_heads + p.n_kv_heads; h += blockDim.x / 32) {
      const bool is_q = h < p.n_heads;
      float* x = is_q ? q + h * D : k + (h - p.n_heads) * D;
      const float* g = is_q ? p.q_norm : p.k_norm;
      float ss = 0.f;
      for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
      for (int off = 16; off; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      const float r = 1.0f / sqrtf(ss / static_cast<float>(D) + p.norm_eps);
      for (int i = lane; i < D; i += 32) x[i] = x[i] * r * g[i];
    }
    __syncthreads();
  }
  if (p.cos) {
    const float* cs = p.cos + pos * half;
    const float* sn = p.sin + pos * half;
    for (int e = threadIdx.x; e < p.n_heads * half; e += blockDim.x) {
      const int h = e / half, i = e % half;
      float* x = q + h * D;
      const float c = cs[i], s = sn[i], x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c - x2 * s;
      x[i + half] = x2 * c + x1 * s;
    }
    for (int e = threadIdx.x; e < p.n_kv_heads * half; e += blockDim.x) {
      const int h = e / half, i = e % half;
      float* x = k + h * D;
      const float c = cs[i], s = sn[i], x1 = x[i], x2 = x[i + half];
      const float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
      if (direct) {
        kdst[h * D + i] = to_cache<TC>(y1);
        kdst[h * D + i + half] = to_cache<TC>(y2);
      } else {
        x[i] = y1;
        x[i + half] = y2;
      }
    }
    if (direct && p.rot_dim < D)  // partial rotary: the dims past rot_dim go to the cache as they are
      for (int e = threadIdx.x; e < p.n_kv_heads * (D - p.rot_dim); e += blockDim.x) {
        const int h = e / (D - p.rot_dim), i = p.rot_dim + e % (D - p.rot_dim);
        kdst[h * D + i] = to_cache<TC>(k[h * D + i]);
      }
  } else if (direct) {
    for (int64_t e = threadIdx.x; e < dkv; e += blockDim.x) kdst[e] = to_cache<TC>(k[e]);
  }
  if (direct)
    for (int64_t e = threadIdx.x; e < dkv; e += blockDim.x) vdst[e] = to_cache<TC>(v[e]);
  if constexpr (q8) {
    if (!cached) return;
    __syncthreads();  // K' complete in k
    const int64_t srow = (static_cast<int64_t>(p.slot[t]) * p.ctx + pos) * p.n_kv_heads;
    for (int h = threadIdx.x / 32; h < 2 * p.n_kv_heads; h += blockDim.x / 32) {
      const bool is_k = h < p.n_kv_heads;
      const int g = is_k ? h : h - p.n_kv_heads;
      quantize_row_int8((is_k ? k : v) + g * D, D, reinterpret_cast<int8_t*>(is_k ? kdst : vdst) + g * D,
                        (is_k ? p.kscale : p.vscale) + srow + g, static_cast<int>(threadIdx.x % 32));
    }
  }
}

// ---------------------------------------------------------------------------- attention_kernel
// Query row t, head h (kv head g = h / (n_heads / n_kv_heads)); keys and values j = J .. pos[t] of
// the token's own slot (J = 0, or with a sliding window W, max(0, pos[t] - W + 1)):
//   s_j = scale * q . k_j,   o = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)
// One block of kAttnWarps warps per (token, head) (blockIdx.x = t * n_heads + h). Warp w takes the
// groups of 4 keys w*4 + i*(4 * warps): per key, its lanes hold head dims lane, lane+32, ... (DPL
// of them, D <= 32 DPL) of q, k_j and the output, the dot product is a warp sum, and the warp keeps
// an online softmax (running max m, sum l, output acc rescaled by exp(m_old - m_new)). The warps'
// (m, l, acc) are merged through shared memory at the end. Any context length: no per-key storage.
// Traffic: the visible K and V rows of the head once per query head.
constexpr int kAttnWarps = 8;
constexpr int kAttnKeys = 4;  // keys a warp has in flight at once

struct AttnParams {
  const float* q;
  float* out;
  int64_t ldq, ldo;
  const void* kcache;  // of TC (float, or __nv_bfloat16 with spec.kv_bf16: read widened to float; or int8_t
  const void* vcache;  // with spec.kv_int8: times kscale / vscale [slots][ctx][n_kv_heads] of its row and kv head)
  const float* kscale;
  const float* vscale;
  const int32_t* pos;
  const int32_t* slot;
  int64_t ctx;
  int n_heads, n_kv_heads, head_dim;
  float scale;
  int window;  // sliding window W (0: every key 0 .. pos)
  float softcap;  // c > 0: scores s -> c tanh(s / c) before the softmax (Gemma 2)
};


template <int DPL, class TC>
__global__ void __launch_bounds__(kAttnWarps * 32) attention_kernel(const AttnParams p) {
  __shared__ float s_m[kAttnWarps], s_l[kAttnWarps];
  __shared__ float s_acc[kAttnWarps][DPL * 32];
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t t = blockIdx.x / p.n_heads;
  const int h = static_cast<int>(blockIdx.x % p.n_heads);
  const int g = h / (p.n_heads / p.n_kv_heads);
  const int D = p.head_dim;
  const int64_t dkv = static_cast<int64_t>(p.n_kv_heads) * D;
  const int64_t L = static_cast<int64_t>(p.pos[t]) + 1;  // keys J .. L - 1 visible
  const int64_t J = first_key(p.pos[t], p.window);
  const int64_t base = static_cast<int64_t>(p.slot[t]) * p.ctx * dkv + static_cast<int64_t>(g) * D;
  const TC* K = static_cast<const TC*>(p.kcache) + base;
  const TC* V = static_cast<const TC*>(p.vcache) + base;
  // int8 caches: key j's scales at sc[j * n_kv_heads] (else unit scales, never read)
  constexpr bool q8 = std::is_same<TC, int8_t>::value;
  const int64_t sbase = (static_cast<int64_t>(p.slot[t]) * p.ctx) * p.n_kv_heads + g;
  const float* KS = q8 ? p.kscale + sbase : nullptr;
  const float* VS = q8 ? p.vscale + sbase : nullptr;

  float qr[DPL];
  const float* q = p.q + t * p.ldq + static_cast<int64_t>(h) * D;
#pragma unroll
  for (int i = 0; i < DPL; ++i) qr[i] = lane + 32 * i < D ? q[lane + 32 * i] : 0.f;

  float m = -INFINITY, l = 0.f, acc[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) acc[i] = 0.f;

  for (int64_t j0 = J + static_cast<int64_t>(warp) * kAttnKeys; j0 < L; j0 += kAttnWarps * kAttnKeys) {
    float s[kAttnKeys];
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) {
      float d = 0.f;
      if (j0 + u < L) {
        const TC* kr = K + (j0 + u) * dkv;
#pragma unroll
        for (int i = 0; i < DPL; ++i)
          if (lane + 32 * i < D) d = fmaf(qr[i], from_cache(kr[lane + 32 * i]), d);
      }
      s[u] = d;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < kAttnKeys; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], off);
    float mx = m;
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) {
      if (q8 && j0 + u < L) s[u] *= KS[(j0 + u) * p.n_kv_heads];  // s = q . k8 times the row's scale
      s[u] = j0 + u < L ? p.scale * s[u] : -INFINITY;
      if (p.softcap > 0.f && j0 + u < L) s[u] = softcap(s[u], p.softcap);
      mx = fmaxf(mx, s[u]);
    }
    // mx is finite: key j0 < L is valid. exp(-inf) = 0 drops the invalid keys and the empty start.
    const float corr = expf(m - mx);
    float pr[kAttnKeys], psum = 0.f;
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) {
      pr[u] = expf(s[u] - mx);
      psum += pr[u];
    }
    l = l * corr + psum;
    if (q8)  // p v8 times the V row's scale: p scaled (after l took it)
#pragma unroll
      for (int u = 0; u < kAttnKeys; ++u)
        if (j0 + u < L) pr[u] *= VS[(j0 + u) * p.n_kv_heads];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      float a = acc[i] * corr;
      if (lane + 32 * i < D) {
#pragma unroll
        for (int u = 0; u < kAttnKeys; ++u)
          if (j0 + u < L) a = fmaf(pr[u], from_cache(V[(j0 + u) * dkv + lane + 32 * i]), a);
      }
      acc[i] = a;
    }
    m = mx;
  }

  // merge the warps: M = max m_w, l = sum l_w e^(m_w - M), o = sum acc_w e^(m_w - M) / l
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < DPL; ++i) s_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float M = s_m[0];  // warp 0 always saw key J: finite
#pragma unroll
  for (int w = 1; w < kAttnWarps; ++w) M = fmaxf(M, s_m[w]);
  float f[kAttnWarps], tot = 0.f;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) {
    f[w] = expf(s_m[w] - M);  // 0 for a warp that saw no key (m = -inf, l = 0)
    tot = fmaf(s_l[w], f[w], tot);
  }
  const float inv = 1.f / tot;
  float* o = p.out + t * p.ldo + static_cast<int64_t>(h) * D;
  for (int e = static_cast<int>(threadIdx.x); e < D; e += kAttnWarps * 32) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) v = fmaf(s_acc[w][e], f[w], v);
    o[e] = v * inv;
  }
}

// ---------------------------------------------------------------------------- activation
// out = act(a) (* b), elementwise over n contiguous floats (out may be b or a):
//   gelu_tanh(x) = x / 2 (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
//   gelu(x) = x / 2 (1 + erf(x / sqrt 2)),  silu(x) = x sigmoid(x),  relu(x) = max(x, 0) (NaN kept)
__global__ void activation_kernel(int kind, int64_t n, const float* a, const float* b, float* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float y = act_fn(kind, a[i]);
    if (b) y *= b[i];
    out[i] = y;
  }
}

// x -> c tanh(x / c) over n values (the head's logits with spec.final_softcap), grid-stride.
__global__ void softcap_kernel(float* x, int64_t n, float c) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = softcap(x[i], c);
}

// dst[i, :] = src[rows[i], :]  (each sequence's last token, for the head): one block per row.
__global__ void gather_rows_kernel(const float* src, const int32_t* rows, float* dst, int64_t d) {
  const int64_t i = blockIdx.x;
  const float* s = src + static_cast<int64_t>(rows[i]) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[i * d + c] = s[c];
}

// Mixture of experts: row t's expert outputs summed (the CPU runner's moe_mlp): one block per row,
//   y[t, :] = sum_j w[t k + j] o[pair[t k + j], :]   (its k experts in index order; o: the grouped pairs' rows)
//             + sigmoid(g[t]) sh[t, :]                (the shared expert, where sh is given)
// written to out, or added to it (accumulate: the residual stream, x += y).
__global__ void moe_combine_kernel(const float* o, const int32_t* pair, const float* w, int k, const float* sh,
                                   const float* g, float* out, int64_t d, bool accumulate) {
  const int64_t t = blockIdx.x;
  const float gate = sh ? 1.0f / (1.0f + expf(-g[t])) : 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float y = 0.f;
    for (int j = 0; j < k; ++j) y += w[t * k + j] * o[static_cast<int64_t>(pair[t * k + j]) * d + c];
    if (sh) y += gate * sh[t * d + c];
    out[t * d + c] = accumulate ? out[t * d + c] + y : y;
  }
}

// ============================================================================ host side

// How the projections multiply (the CPU runner's Arith): lmul_bits > 0, every product an L-Mul
// (cuda/lmul.cu; float32 weights, CudaRunner::finalize checks); bf16, matmul_precision "medium": bfloat16
// weights take the tensor cores for more than kDenseGemvMaxRows rows (cuda::bf16_linear: x rounded to bf16).
struct Arith {
  int lmul_bits = 0;
  bool bf16 = false;
};

// y[M, N] (+)= x[M, K] W^T (+ b)   (N = w.rows, K = w.cols)
// epi (fused norms): the norm of x's rows (all null: none; cuda::RowNorm), applied by the dense GEMMs and
// by the tensor-core kernel (cuda::bf16_linear); packed and L-Mul weights have no such path (fused_norms()
// is false for them).
void launch_linear(const DevW& w, const DevW& b, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                   bool accumulate, cudaStream_t s, const Arith& ar = Arith{}, const RowNorm& epi = RowNorm{}) {
  if (M <= 0) return;
  if (epi.scale && (w.quant || ar.lmul_bits > 0))
    throw Error("CudaRunner: the norm epilogue reached a weight without it (a bug: fused_norms() should be false)");
  const float* bias = b.present() ? b.f32() : nullptr;
  if (ar.lmul_bits > 0)
    return lmul_linear(M, w.rows, w.cols, x, ldx, w.f32(), w.ld, bias, y, ldy, accumulate, ar.lmul_bits, s);
  if (ar.bf16 && !w.quant && w.dtype == DType::BF16 && M > kDenseGemvMaxRows &&
      bf16_linear(M, w.rows, w.cols, x, ldx, w.data, w.ld, bias, y, ldy, accumulate, s, epi))
    return;
  if (w.quant) return quant_linear(M, x, DType::F32, ldx, w.q, bias, y, ldy, accumulate, s);  // cuda/quant_gemm.cu
  DenseLinearArgs a = dense_args(M, w.rows, w.cols, x, ldx, w.data, w.dtype, w.ld, bias, y, ldy);
  a.accumulate = accumulate;
  a.norm = epi;
  dense_linear(a, s);  // cuda/gemm.cu
}

template <class TC>
void launch_attention_t(const AttnParams& p, int64_t T, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(T * p.n_heads);
  const int D = p.head_dim;
  if (D <= 32)
    attention_kernel<1, TC><<<grid, kAttnWarps * 32, 0, s>>>(p);
  else if (D <= 64)
    attention_kernel<2, TC><<<grid, kAttnWarps * 32, 0, s>>>(p);
  else if (D <= 128)
    attention_kernel<4, TC><<<grid, kAttnWarps * 32, 0, s>>>(p);
  else
    attention_kernel<8, TC><<<grid, kAttnWarps * 32, 0, s>>>(p);
  check_launch("attention_kernel");
}

void launch_attention(const AttnParams& p, int64_t T, const ModelSpec& spec, cudaStream_t s) {
  if (spec.kv_int8) launch_attention_t<int8_t>(p, T, s);
  else if (spec.kv_bf16) launch_attention_t<__nv_bfloat16>(p, T, s);
  else launch_attention_t<float>(p, T, s);
}

// ---------------------------------------------------------------------------- lmul_attention_kernel
// L-Mul attention (spec.lmul_scope >= 1: the CPU runner's lmul_cache_attention). Query row t, head h
// (kv head g), keys j = J .. pos[t] of the slot's float32 cache (J: ops/attention.h's first_key, the
// sliding window's), every product an L-Mul of the CPU's
// scalar definition (ops/lmul_bits.h: truncate both operands to m mantissa bits, add the bit patterns):
//   s_j = scale * sum_d lmul(q_d, k_jd)      d in order from +0 (the CPU's bits)
//   p_j = exp(s_j - max s) / sum_j exp(...)  exact arithmetic
//   o_d = sum_j lmul(p_j, v_jd)              j in order from +0 (the CPU's bits, given the same p)
// One block of kLmulThreads per (token, head). The scores sit in shared memory ([ctx] floats, then the
// prepared bits of p in their place), beside q's prepared bits [D] and 32 floats for the reductions.
// Threads take keys for the scores (each walks its key's row of K) and head dims for the output (each
// walks its column of the visible V rows, coalesced across the threads). exp and the order of the
// softmax's max / sum differ from the CPU's, so outputs agree to fp32 rounding, not bit for bit.
constexpr int kLmulThreads = 128;

// max (kMax) or sum of v over the block, returned to every thread. red: 32 floats of shared memory;
// two barriers, so consecutive calls may reuse red.
template <bool kMax>
__device__ float block_reduce(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < static_cast<int>(blockDim.x >> 5); ++i) r = kMax ? fmaxf(r, red[i]) : r + red[i];
  __syncthreads();
  return r;
}

size_t lmul_attention_smem(int64_t ctx, int D) { return static_cast<size_t>(ctx + D + 32) * sizeof(float); }

__global__ void __launch_bounds__(kLmulThreads) lmul_attention_kernel(const AttnParams p, uint32_t trunc, uint32_t C) {
  using lmul_bits::checked1;
  using lmul_bits::prep1;
  extern __shared__ float lmul_smem[];
  const int64_t t = blockIdx.x / p.n_heads;
  const int h = blockIdx.x % p.n_heads, D = p.head_dim, g = h / (p.n_heads / p.n_kv_heads);
  const int64_t L = p.pos[t] + 1, J = first_key(p.pos[t], p.window), dkv = static_cast<int64_t>(p.n_kv_heads) * D;
  float* s = lmul_smem;  // [ctx] (s[j] for the visible keys j)
  uint32_t* qp = reinterpret_cast<uint32_t*>(lmul_smem + p.ctx);  // [D]
  float* red = lmul_smem + p.ctx + D;  // [32]
  const float* q = p.q + t * p.ldq + static_cast<int64_t>(h) * D;
  const int64_t base = static_cast<int64_t>(p.slot[t]) * p.ctx * dkv + static_cast<int64_t>(g) * D;
  const float* K = static_cast<const float*>(p.kcache) + base;
  const float* V = static_cast<const float*>(p.vcache) + base;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qp[d] = prep1(__float_as_uint(q[d]), trunc);
  __syncthreads();
  float mx = -INFINITY;
  for (int64_t j = J + threadIdx.x; j < L; j += blockDim.x) {
    const float* k = K + j * dkv;
    float acc = 0.0f;
    for (int d = 0; d < D; ++d)
      acc = __fadd_rn(acc, __uint_as_float(checked1(qp[d], prep1(__float_as_uint(k[d]), trunc), C)));
    s[j] = p.scale * acc;
    if (p.softcap > 0.f) s[j] = softcap(s[j], p.softcap);
    mx = fmaxf(mx, s[j]);
  }
  mx = block_reduce<true>(mx, red);
  float sum = 0.0f;
  for (int64_t j = J + threadIdx.x; j < L; j += blockDim.x) {
    s[j] = expf(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.0f / block_reduce<false>(sum, red);
  uint32_t* pp = reinterpret_cast<uint32_t*>(s);  // p_j's prepared bits, over s_j (same thread)
  for (int64_t j = J + threadIdx.x; j < L; j += blockDim.x) pp[j] = prep1(__float_as_uint(s[j] * inv), trunc);
  __syncthreads();
  float* o = p.out + t * p.ldo + static_cast<int64_t>(h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = J; j < L; ++j)
      acc = __fadd_rn(acc, __uint_as_float(checked1(pp[j], prep1(__float_as_uint(V[j * dkv + d]), trunc), C)));
    o[d] = acc;
  }
}

void launch_lmul_attention(const AttnParams& p, int64_t T, int bits, cudaStream_t s) {
  const LmulConst k = lmul_const(bits);
  const size_t smem = lmul_attention_smem(p.ctx, p.head_dim);
  check(cudaFuncSetAttribute(lmul_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
        "cudaFuncSetAttribute (lmul_attention_kernel)");
  lmul_attention_kernel<<<static_cast<unsigned>(T * p.n_heads), kLmulThreads, smem, s>>>(p, k.trunc, k.c);
  check_launch("lmul_attention_kernel");
}

// Sandwich norms (spec.post_norms): x[t] += y[t] / sqrt(mean(y[t]^2) + eps) * g, one block per row (the
// CPU runner's add_post_norm, which sums the squares in double: fp32 rounding apart).
constexpr int kPostNormThreads = 256;
__global__ void __launch_bounds__(kPostNormThreads) post_norm_add_kernel(const float* y, const float* g, int64_t d,
                                                                         float eps, float* x) {
  __shared__ float red[32];
  const float* yr = y + blockIdx.x * d;
  float* xr = x + blockIdx.x * d;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss = fmaf(yr[i], yr[i], ss);
  const float r = 1.0f / sqrtf(block_reduce<false>(ss, red) / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) xr[i] += yr[i] * r * g[i];
}

constexpr int kMaxHeadDim = 256;  // attention_kernel<8>

// Makes `dev` the current device for a scope (and restores the previous one).
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != dev)
      check(cudaSetDevice(dev), "cudaSetDevice");
    else
      prev_ = -1;
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

size_t round_floats(size_t n) { return (n + 63) / 64 * 64; }  // 256-byte sub-buffers

}  // namespace
}  // namespace cuda

using cuda::check;
using cuda::DevW;

struct CudaRunner::Layer {
  AttnType type = AttnType::Softmax;
  DevW attn_norm_w, attn_norm_b, q, k, v, o, qb, kb, vb, ob, decay, q_norm, k_norm, attn_post_norm, mlp_post_norm;
  DevW mlp_norm_w, mlp_norm_b, up, gate, down, upb, gateb, downb;
  MoeWeights<DevW> moe;  // a mixture-of-experts layer's (spec.n_experts, moe_layer)
  // in Impl::cache: softmax layers [slots][ctx][n_kv_heads * head_dim] (float, or bf16: spec.kv_bf16, or int8:
  // spec.kv_int8, with the scales [slots][ctx][n_kv_heads] float32)
  void* kcache = nullptr;
  void* vcache = nullptr;
  float* kscale = nullptr;
  float* vscale = nullptr;
  float* state = nullptr;  // linear-family layers: [slots][n_heads][(head_dim + 1)^2] float32
};

struct CudaRunner::Impl {
  int dev = 0;
  std::vector<Layer> layers;
  DevW tok_emb, pos_emb, final_w, final_b, head, head_b;
  std::vector<int> len;  // tokens held per slot
  // device memory owned by the runner
  void* cache = nullptr;  // every softmax layer's K and V caches, every linear-family layer's states
  float* rope = nullptr;   // cos [ctx, D/2] then sin [ctx, D/2] (then the local RoPE's two); null: learned positions
  float* act = nullptr;    // activations for cap_tokens rows (carved below)
  int32_t* idx = nullptr;  // per-token indices of a call: tok, pos, slot [T each], last rows [n_seqs]
  int32_t* host_idx = nullptr;  // pinned staging of idx
  cudaEvent_t staged = nullptr;  // recorded after the copy out of host_idx
  int64_t cap_tokens = 0;
  float *x = nullptr, *xn = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *att = nullptr, *up = nullptr,
        *gate = nullptr, *sel = nullptr, *mean = nullptr, *mean_lo = nullptr, *rstd = nullptr;
  // mixture of experts (cap_tokens rows, P = rows x n_experts_used pairs): router logits [rows, E], the pairs'
  // gathered inputs [P, d], gate / up [P, moe_d_ff] (the shared expert's [rows, shared_d_ff] too), outputs
  // [P, d], the shared expert's output [rows, d] and gate [rows], the layer's output [rows, d]; the routing
  // (rows [P], slot [P] int32, slot_w [P] float32) in moe_route, staged through the pinned moe_host; the
  // logits come back through the pinned moe_logits
  float *rlog = nullptr, *xg = nullptr, *eg = nullptr, *eu = nullptr, *eo = nullptr, *sh = nullptr, *shg = nullptr,
        *moe_y = nullptr;
  int32_t* moe_route = nullptr;
  int32_t* moe_host = nullptr;
  float* moe_logits = nullptr;
  MoeRouting routing;
  bool fused = false;       // fused_norms(): the blocks' norms run as statistics + GEMM epilogue (finalize)
  bool fused_head = false;  // the final norm likewise (a tied head usually keeps its gain: then not)

  ~Impl() {
    // Never throws: a failure here (a broken context) leaves nothing better to do.
    int prev = -1;
    const bool switched = cudaGetDevice(&prev) == cudaSuccess && prev != dev && cudaSetDevice(dev) == cudaSuccess;
    if (staged) cudaEventSynchronize(staged);
    if (cache || act || idx || rope) cudaDeviceSynchronize();  // work of a call may still read them
    cudaFree(cache);
    cudaFree(rope);
    cudaFree(act);
    cudaFree(idx);
    cudaFreeHost(host_idx);
    cudaFree(moe_route);
    cudaFreeHost(moe_host);
    cudaFreeHost(moe_logits);
    if (staged) cudaEventDestroy(staged);
    cudaGetLastError();
    if (switched) cudaSetDevice(prev);
  }
};

CudaRunner::CudaRunner(const ModelSpec& s, int slots, int ctx, int device) : spec_(s), n_slots_(slots), ctx_(ctx) {
  check_spec(s, slots, ctx);
  if (s.head_dim > cuda::kMaxHeadDim)
    throw UnsupportedError("spec: the CUDA runner's attention supports head_dim up to " +
                           std::to_string(cuda::kMaxHeadDim) + ", got " + std::to_string(s.head_dim));
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
    cudaGetLastError();
    throw DeviceError("CudaRunner: no CUDA device is visible (no GPU, or no driver)");
  }
  if (device < 0) check(cudaGetDevice(&device), "cudaGetDevice");
  if (device >= count)
    throw DeviceError("CudaRunner: device " + std::to_string(device) + " out of range (" + std::to_string(count) +
                      " visible)");
  impl_ = std::make_unique<Impl>();
  Impl& m = *impl_;
  m.dev = device;
  cuda::DeviceGuard guard(device);
  if (s.lmul_scope != 0) {  // the L-Mul attention keeps a row of ctx scores in shared memory
    int optin = 0;
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
    if (cuda::lmul_attention_smem(ctx, s.head_dim) > static_cast<size_t>(optin))
      throw UnsupportedError("ctx: the CUDA runner's L-Mul attention holds a row of scores in shared memory, " +
                             std::to_string(optin / 4 - s.head_dim - 32) + " positions at most on this GPU, got " +
                             std::to_string(ctx));
  }
  m.layers.resize(s.n_layers);
  m.len.assign(slots, 0);

  // bytes per K or V cache (float32, bfloat16 with spec.kv_bf16, int8 and its float32 scales with spec.kv_int8),
  // and per layer's states (float32), each rounded up to 256 bytes (aligned for the kernels' vector loads)
  auto aligned = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t rows = static_cast<size_t>(slots) * ctx * s.n_kv_heads;  // head rows per cache
  const size_t values = aligned(rows * s.head_dim * (s.kv_int8 ? 1 : s.kv_bf16 ? 2 : 4));
  const size_t per = values + (s.kv_int8 ? aligned(rows * 4) : 0);
  const size_t per_state = aligned(static_cast<size_t>(slots) * s.n_heads * (s.head_dim + 1) * (s.head_dim + 1) * 4);
  size_t total = 0;
  for (int i = 0; i < s.n_layers; ++i) {
    m.layers[i].type = attn_type(s, i);
    if (moe_layer(s, i)) m.layers[i].moe.resize(s.n_experts);
    total += m.layers[i].type == AttnType::Softmax ? 2 * per : per_state;
  }
  check(cudaMalloc(&m.cache, total), "cudaMalloc (KV cache / attention states)");
  check(cudaMemset(m.cache, 0, total), "cudaMemset (KV cache / attention states)");
  char* at = static_cast<char*>(m.cache);
  for (auto& L : m.layers) {
    if (L.type == AttnType::Softmax) {
      L.kcache = at;
      L.vcache = at + per;
      if (s.kv_int8) {
        L.kscale = reinterpret_cast<float*>(at + values);
        L.vscale = reinterpret_cast<float*>(at + per + values);
      }
      at += 2 * per;
    } else {
      L.state = reinterpret_cast<float*>(at);
      at += per_state;
    }
  }
  if (!s.learned_pos) {
    // Every position's row (model/weights.h rope_cos_sin: the CPU runner's, bit for bit): cos [ctx, D/2]
    // then sin [ctx, D/2]. Gemma 3's sliding-window layers have their own (spec.rope_inv_freq_local): two
    // more tables after these.
    const int half = rope_dims(s) / 2;
    const size_t n = static_cast<size_t>(ctx) * half;
    const bool local = !s.rope_inv_freq_local.empty();
    std::vector<float> tab((local ? 4 : 2) * n);
    auto fill = [&](const std::vector<float>& inv_freq, double factor, float* cs) {
      for (int p = 0; p < ctx; ++p)
        rope_cos_sin(inv_freq.data(), half, static_cast<float>(factor), p, cs + static_cast<size_t>(p) * half,
                     cs + n + static_cast<size_t>(p) * half);
    };
    fill(rope_inv_freq(s), s.rope_attn_factor, tab.data());
    if (local) fill(s.rope_inv_freq_local, s.rope_attn_factor_local, tab.data() + 2 * n);
    check(cudaMalloc(reinterpret_cast<void**>(&m.rope), tab.size() * sizeof(float)), "cudaMalloc (RoPE table)");
    check(cudaMemcpy(m.rope, tab.data(), tab.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy (RoPE table)");
  }
  check(cudaEventCreateWithFlags(&m.staged, cudaEventDisableTiming), "cudaEventCreate");
}

CudaRunner::~CudaRunner() = default;

int CudaRunner::device() const { return impl_->dev; }

void CudaRunner::set_tensor(const std::string& name, const TensorView& t) {
  const int dev = impl_->dev;
  if (t.device.type != DeviceType::CUDA || t.device.index != dev)
    throw DeviceError(name + ": the CUDA runner's weights must be on cuda:" + std::to_string(dev) + ", got " +
                      t.device.str());
  const WeightSlot<DevW> slot = weight_slot<DevW>(*impl_, spec_, name);
  if (!slot.w) throw ValueError(name + ": not a tensor of this model");
  set_dense_weight(slot, name, t);
}

void CudaRunner::set_quant_tensor(const std::string& name, int format, const TensorView& data, const TensorView& scale,
                                  const TensorView* zero, int64_t group, const SubScales& sub) {
  const WeightSlot<DevW> slot = weight_slot<DevW>(*impl_, spec_, name);
  // (two-level scales: refused by quant_weight, for the CPU only)
  const Device dev{DeviceType::CUDA, impl_->dev};
  set_quant_weight(slot, quant_weight(slot, name, format, data, scale, zero, group, dev, sub));
}

void CudaRunner::finalize() {
  const ModelSpec& s = spec_;
  Impl& m = *impl_;
  check_weights_complete(m, s);
  check_lmul_weights(m, s);
  // Fused norms when every norm is the bare normalization (gains 1, biases 0: folded into the readers)
  // and every reader takes the norm epilogue (dense weights, exact products).
  cuda::DeviceGuard guard(m.dev);
  std::vector<float> host(static_cast<size_t>(s.d_model));
  auto unit = [&](const DevW& w, const DevW& b) {
    for (const DevW* t : {&w, &b}) {
      if (!t->present()) continue;
      check(cudaMemcpy(host.data(), t->data, host.size() * sizeof(float), cudaMemcpyDeviceToHost),
            "cudaMemcpy (norm weights)");
      const float want = t == &w ? 1.0f : 0.0f;
      for (float v : host)
        if (v != want) return false;
    }
    return true;
  };
  const bool can = s.norm >= 0 && s.lmul_scope != 2;
  bool fused = can;
  for (size_t i = 0; i < m.layers.size(); ++i) {
    const Layer& L = m.layers[i];
    for (const DevW* w : {&L.q, &L.k, &L.v, &L.up, &L.gate}) fused = fused && !w->quant;
    // (a mixture-of-experts layer normalizes its MLP's input on its own: its rows are gathered per expert)
    fused = fused && unit(L.attn_norm_w, L.attn_norm_b) &&
            (moe_layer(s, static_cast<int>(i)) || unit(L.mlp_norm_w, L.mlp_norm_b));
  }
  m.fused = fused;
  m.fused_head = can && !m.head.quant && unit(m.final_w, m.final_b);
}

bool CudaRunner::fused_norms() const { return impl_->fused; }

void CudaRunner::reset(int slot) {
  if (slot < 0 || slot >= n_slots_) throw ValueError("slot: out of range");
  impl_->len[slot] = 0;
}

int CudaRunner::length(int slot) const {
  if (slot < 0 || slot >= n_slots_) throw ValueError("slot: out of range");
  return impl_->len[slot];
}

bool CudaRunner::truncate(int slot, int n) {
  const int len = length(slot);
  check_truncate(len, n);
  for (const auto& L : impl_->layers)
    if (L.state && n < len) return false;  // a linear-family state has the dropped tokens summed in
  impl_->len[slot] = n;
  return true;
}

void CudaRunner::forward(int n_seqs, const int32_t* slots, const int32_t* tokens, const int32_t* lens, float* logits,
                         bool all_logits, void* stream) {
  const ModelSpec& s = spec_;
  Impl& m = *impl_;
  if (n_seqs < 1) throw ValueError("n_seqs: expected at least one sequence");
  // ---- validate everything before touching any state
  int64_t T = 0;
  std::vector<int> seen(n_slots_, 0);
  for (int i = 0; i < n_seqs; ++i) {
    if (slots[i] < 0 || slots[i] >= n_slots_)
      throw ValueError("slot " + std::to_string(slots[i]) + ": out of range [0, " + std::to_string(n_slots_) + ")");
    if (seen[slots[i]]++) throw ValueError("slot " + std::to_string(slots[i]) + ": appears twice in one call");
    if (lens[i] < 1) throw ValueError("lens: every sequence needs at least one token");
    if (m.len[slots[i]] + lens[i] > ctx_)
      throw ValueError("sequence in slot " + std::to_string(slots[i]) + ": " + std::to_string(m.len[slots[i]]) +
                       " + " + std::to_string(lens[i]) + " tokens exceed the context of " + std::to_string(ctx_));
    T += lens[i];
  }
  for (int64_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= s.vocab)
      throw ValueError("token id " + std::to_string(tokens[t]) + " at index " + std::to_string(t) +
                       ": out of range [0, " + std::to_string(s.vocab) + ")");
  if (logits == nullptr) throw ValueError("logits: null pointer");

  const int64_t d = s.d_model, dq = static_cast<int64_t>(s.n_heads) * s.head_dim,
                dkv = static_cast<int64_t>(s.n_kv_heads) * s.head_dim, f = s.d_ff;
  // Launch limits: gemm grids walk rows in gridDim.y (<= 65535 blocks of 64 rows), attention has one
  // block per (token, head) in gridDim.x.
  if (T > cuda::kDenseMaxRows || T * s.n_heads > INT_MAX)
    throw UnsupportedError("forward: " + std::to_string(T) + " tokens in one call are too many for the CUDA runner");

  cuda::DeviceGuard guard(m.dev);
  cudaStream_t st = cuda::as_stream(stream);

  // ---- buffers for T rows (grown only when a larger call comes)
  if (T > m.cap_tokens) {
    const int64_t cap = std::max<int64_t>(T, 16);
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (growing the runner's buffers)");
    if (m.staged) check(cudaEventSynchronize(m.staged), "cudaEventSynchronize");
    cudaFree(m.act);
    cudaFree(m.idx);
    cudaFreeHost(m.host_idx);
    cudaFree(m.moe_route);
    cudaFreeHost(m.moe_host);
    cudaFreeHost(m.moe_logits);
    m.act = nullptr;
    m.idx = m.host_idx = m.moe_route = m.moe_host = nullptr;
    m.moe_logits = nullptr;
    m.cap_tokens = 0;
    const size_t c = static_cast<size_t>(cap);
    // (mixture of experts: P pairs; the expert and shared gate / up buffers hold the larger of the two)
    const size_t E = static_cast<size_t>(s.n_experts), P = c * s.n_experts_used,
                 fmax = std::max(P * s.moe_d_ff, c * s.shared_d_ff);
    const size_t sizes[] = {c * d, c * d, c * dq, c * dkv, c * dkv, c * dq, c * f, s.gated_mlp ? c * f : 0, c * d, c, c, c,
                            c * E, P * d, fmax, fmax, P * d, s.shared_d_ff ? c * d : 0, s.shared_d_ff ? c : 0,
                            E ? c * d : 0};
    constexpr int kBuffers = sizeof(sizes) / sizeof(sizes[0]);
    size_t total = 0;
    for (size_t z : sizes) total += cuda::round_floats(z);
    check(cudaMalloc(reinterpret_cast<void**>(&m.act), total * sizeof(float)), "cudaMalloc (activations)");
    float** dst[kBuffers] = {&m.x,    &m.xn, &m.q,  &m.k,  &m.v,  &m.att, &m.up, &m.gate, &m.sel, &m.mean,
                             &m.mean_lo, &m.rstd, &m.rlog, &m.xg, &m.eg, &m.eu, &m.eo, &m.sh, &m.shg, &m.moe_y};
    size_t off = 0;
    for (int i = 0; i < kBuffers; ++i) {
      *dst[i] = sizes[i] ? m.act + off : nullptr;
      off += cuda::round_floats(sizes[i]);
    }
    check(cudaMalloc(reinterpret_cast<void**>(&m.idx), 4 * c * sizeof(int32_t)), "cudaMalloc (token indices)");
    check(cudaMallocHost(reinterpret_cast<void**>(&m.host_idx), 4 * c * sizeof(int32_t)), "cudaMallocHost");
    if (E) {
      check(cudaMalloc(reinterpret_cast<void**>(&m.moe_route), 3 * P * sizeof(int32_t)), "cudaMalloc (routing)");
      check(cudaMallocHost(reinterpret_cast<void**>(&m.moe_host), 3 * P * sizeof(int32_t)), "cudaMallocHost");
      check(cudaMallocHost(reinterpret_cast<void**>(&m.moe_logits), c * E * sizeof(float)), "cudaMallocHost");
    }
    m.cap_tokens = cap;
  }

  // ---- per-token indices: token, position, slot [T each]; the last row of each sequence [n_seqs]
  check(cudaEventSynchronize(m.staged), "cudaEventSynchronize");  // the previous call's copy has left host_idx
  int32_t* h_tok = m.host_idx;
  int32_t* h_pos = h_tok + T;
  int32_t* h_slot = h_pos + T;
  int32_t* h_last = h_slot + T;
  {
    int64_t t = 0;
    for (int i = 0; i < n_seqs; ++i) {
      for (int j = 0; j < lens[i]; ++j, ++t) {
        h_tok[t] = tokens[t];
        h_pos[t] = m.len[slots[i]] + j;
        h_slot[t] = slots[i];
      }
      h_last[i] = static_cast<int32_t>(t - 1);
    }
  }
  check(cudaMemcpyAsync(m.idx, m.host_idx, (3 * static_cast<size_t>(T) + n_seqs) * sizeof(int32_t),
                        cudaMemcpyHostToDevice, st),
        "cudaMemcpyAsync (token indices)");
  check(cudaEventRecord(m.staged, st), "cudaEventRecord");
  const int32_t* d_tok = m.idx;
  const int32_t* d_pos = d_tok + T;
  const int32_t* d_slot = d_pos + T;
  const int32_t* d_last = d_slot + T;

  const Device devc{DeviceType::CUDA, m.dev};
  std::vector<int32_t> pos0(static_cast<size_t>(n_seqs));  // each sequence's first position
  for (int i = 0; i < n_seqs; ++i) pos0[i] = m.len[slots[i]];
  const bool has_norm = s.norm >= 0;
  auto norm_rows = [&](const DevW& w, const DevW& b, const float* x, float* y, int64_t rows) {
    TensorView xv = TensorView::make(const_cast<float*>(x), DType::F32, {rows, d}, devc, "x");
    TensorView yv = TensorView::make(y, DType::F32, {rows, d}, devc, "y");
    TensorView wv = TensorView::make(const_cast<void*>(w.data), DType::F32, {d}, devc, "weight");
    TensorView bv = TensorView::make(const_cast<void*>(b.data), DType::F32, {d}, devc, "bias");
    Ctx c;
    c.cuda_stream = stream;
    norm_forward(static_cast<NormKind>(s.norm), xv, nullptr, &wv, b.present() ? &bv : nullptr, s.norm_eps, yv,
                 nullptr, nullptr, nullptr, c);
  };
  // the row statistics of x's rows (cuda/norm.cu): m.rstd, and for LayerNorm the mean as the pair
  // m.mean = x[0], m.mean_lo = mean(x - x[0]): the norm epilogue of the readers
  auto stats = [&](const float* x, int64_t rows) {
    NormFwdArgs a{};
    a.kind = static_cast<NormKind>(s.norm);
    a.x = RowMatrix{const_cast<float*>(x), DType::F32, rows, d, d};
    a.mean = s.norm == 0 ? m.mean : nullptr;
    a.mean_lo = s.norm == 0 ? m.mean_lo : nullptr;
    a.rstd = m.rstd;
    a.eps = s.norm_eps;
    cuda::norm_stats(a, st);
  };
  cuda::RowNorm epi_on;
  epi_on.shift = s.norm == 0 ? m.mean : nullptr;
  epi_on.shift_lo = s.norm == 0 ? m.mean_lo : nullptr;
  epi_on.scale = m.rstd;
  const cuda::RowNorm epi = m.fused ? epi_on : cuda::RowNorm{};
  const unsigned grid_t = static_cast<unsigned>(T);

  // ---- token (and position) embeddings
  {
    cuda::EmbedParams p{};
    p.emb = m.tok_emb.data;
    p.emb_dt = static_cast<int>(m.tok_emb.dtype);
    p.emb_ld = m.tok_emb.ld;
    p.quant = m.tok_emb.quant;
    p.q = m.tok_emb.q;
    p.pos_emb = s.learned_pos ? m.pos_emb.data : nullptr;
    p.pos_dt = static_cast<int>(m.pos_emb.dtype);
    p.pos_ld = m.pos_emb.ld;
    p.tok = d_tok;
    p.pos = d_pos;
    p.x = m.x;
    p.d = d;
    p.emb_scale = static_cast<float>(s.emb_scale);
    cuda::embed_kernel<<<grid_t, 256, 0, st>>>(p);
    cuda::check_launch("embed_kernel");
  }

  const int half = rope_dims(s) / 2;  // RoPE table width
  const float scale = attn_scale(s);
  const int64_t act_n = T * f;
  const unsigned act_grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(act_n, 256), 65536));
  const cuda::Arith ar{s.lmul_scope == 2 ? s.lmul_bits : 0, s.bf16_products};  // how the projections multiply
  // A mixture-of-experts MLP of the normalized rows m.xn (the CPU runner's moe_mlp): the router's logits come
  // back to the host, which routes and groups the (row, expert) pairs (MoeRouting, as the CPU runner) and sends
  // the grouping over; each expert's GEMMs run over its rows gathered, the shared expert's over every row, and
  // moe_combine_kernel writes (or adds into out) each row's weighted sum. The logits' copy waits for the
  // stream: one round trip to the host per such layer.
  auto moe_mlp = [&](const MoeWeights<DevW>& mw, float* out, bool accumulate) {
    const int E = s.n_experts, k = s.n_experts_used;
    const int64_t fe = s.moe_d_ff, fs = s.shared_d_ff, P = T * k;
    cuda::launch_linear(mw.router, DevW{}, m.xn, d, T, m.rlog, E, false, st, ar);
    check(cudaMemcpyAsync(m.moe_logits, m.rlog, T * E * sizeof(float), cudaMemcpyDeviceToHost, st),
          "cudaMemcpyAsync (router logits)");
    check(cudaStreamSynchronize(st), "cudaStreamSynchronize (router logits)");  // (also: moe_host is free)
    MoeRouting& r = m.routing;
    r.route(m.moe_logits, T, s);
    int32_t* h_rows = m.moe_host;
    std::memcpy(h_rows, r.rows.data(), P * sizeof(int32_t));
    std::memcpy(h_rows + P, r.slot.data(), P * sizeof(int32_t));
    std::memcpy(h_rows + 2 * P, r.slot_w.data(), P * sizeof(float));
    check(cudaMemcpyAsync(m.moe_route, h_rows, 3 * P * sizeof(int32_t), cudaMemcpyHostToDevice, st),
          "cudaMemcpyAsync (routing)");
    const int32_t* d_rows = m.moe_route;
    const int32_t* d_slot = d_rows + P;
    const float* d_w = reinterpret_cast<const float*>(d_rows + 2 * P);
    cuda::gather_rows_kernel<<<static_cast<unsigned>(P), 256, 0, st>>>(m.xn, d_rows, m.xg, d);
    cuda::check_launch("gather_rows_kernel");
    auto act = [&](int64_t n) {  // eu = act(eg) * eu over n values
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(n, 256), 65536));
      cuda::activation_kernel<<<grid, 256, 0, st>>>(s.activation, n, m.eg, m.eu, m.eu);
      cuda::check_launch("activation_kernel");
    };
    for (int e = 0; e < E; ++e) {
      const int64_t off = r.start[e], n = r.start[e + 1] - off;
      cuda::launch_linear(mw.egate[e], DevW{}, m.xg + off * d, d, n, m.eg + off * fe, fe, false, st, ar);
      cuda::launch_linear(mw.eup[e], DevW{}, m.xg + off * d, d, n, m.eu + off * fe, fe, false, st, ar);
    }
    act(P * fe);
    for (int e = 0; e < E; ++e) {
      const int64_t off = r.start[e], n = r.start[e + 1] - off;
      cuda::launch_linear(mw.edown[e], DevW{}, m.eu + off * fe, fe, n, m.eo + off * d, d, false, st, ar);
    }
    if (fs > 0) {  // (eg / eu are free again: the experts' down projections were enqueued before)
      cuda::launch_linear(mw.sgate, DevW{}, m.xn, d, T, m.eg, fs, false, st, ar);
      cuda::launch_linear(mw.sup, DevW{}, m.xn, d, T, m.eu, fs, false, st, ar);
      act(T * fs);
      cuda::launch_linear(mw.sdown, DevW{}, m.eu, fs, T, m.sh, d, false, st, ar);
      cuda::launch_linear(mw.shared_gate, DevW{}, m.xn, d, T, m.shg, 1, false, st, ar);
    }
    cuda::moe_combine_kernel<<<static_cast<unsigned>(T), 256, 0, st>>>(m.eo, d_slot, d_w, k, fs > 0 ? m.sh : nullptr,
                                                                        m.shg, out, d, accumulate);
    cuda::check_launch("moe_combine_kernel");
  };
  for (int li = 0; li < s.n_layers; ++li) {
    Layer& L = m.layers[li];
    // ---- attention
    const float* xin = m.x;
    if (m.fused) {
      stats(m.x, T);
    } else if (has_norm) {
      norm_rows(L.attn_norm_w, L.attn_norm_b, m.x, m.xn, T);
      xin = m.xn;
    }
    cuda::launch_linear(L.q, L.qb, xin, d, T, m.q, dq, false, st, ar, epi);
    cuda::launch_linear(L.k, L.kb, xin, d, T, m.k, dkv, false, st, ar, epi);
    cuda::launch_linear(L.v, L.vb, xin, d, T, m.v, dkv, false, st, ar, epi);
    const bool softmax = L.type == AttnType::Softmax;
    if (softmax || !s.learned_pos) {  // RoPE; a softmax layer's K/V rows into its cache
      cuda::RopeCacheParams p{};
      p.q = m.q;
      p.k = m.k;
      p.v = m.v;
      p.ldq = dq;
      p.ldkv = dkv;
      p.pos = d_pos;
      p.slot = d_slot;
      const size_t table_floats = 2 * static_cast<size_t>(ctx_) * half;  // cos, sin; the local RoPE's after
      const float* tab = s.learned_pos ? nullptr : m.rope + (local_rope(s, li) ? table_floats : 0);
      p.cos = tab;
      p.sin = tab ? tab + static_cast<size_t>(ctx_) * half : nullptr;
      p.kcache = L.kcache;  // null in a linear-family layer: RoPE only
      p.vcache = L.vcache;
      p.kscale = L.kscale;
      p.vscale = L.vscale;
      p.ctx = ctx_;
      p.n_heads = s.n_heads;
      p.n_kv_heads = s.n_kv_heads;
      p.head_dim = s.head_dim;
      p.q_norm = s.qk_norm ? L.q_norm.f32() : nullptr;
      p.k_norm = s.qk_norm ? L.k_norm.f32() : nullptr;
      p.norm_eps = static_cast<float>(s.norm_eps);
      p.rot_dim = rope_dims(s);
      if (s.kv_bf16 && softmax) cuda::rope_cache_kernel<__nv_bfloat16><<<grid_t, 128, 0, st>>>(p);
      else if (s.kv_int8 && softmax) cuda::rope_cache_kernel<int8_t><<<grid_t, 128, 0, st>>>(p);
      else cuda::rope_cache_kernel<float><<<grid_t, 128, 0, st>>>(p);
      cuda::check_launch("rope_cache_kernel");
    }
    if (softmax) {
      cuda::AttnParams p{};
      p.q = m.q;
      p.out = m.att;
      p.ldq = dq;
      p.ldo = dq;
      p.kcache = L.kcache;
      p.vcache = L.vcache;
      p.kscale = L.kscale;
      p.vscale = L.vscale;
      p.pos = d_pos;
      p.slot = d_slot;
      p.ctx = ctx_;
      p.n_heads = s.n_heads;
      p.n_kv_heads = s.n_kv_heads;
      p.head_dim = s.head_dim;
      p.scale = scale;
      p.window = attn_window(s, li);
      p.softcap = static_cast<float>(s.attn_softcap);
      if (s.lmul_scope > 0) cuda::launch_lmul_attention(p, T, s.lmul_bits, st);
      else cuda::launch_attention(p, T, s, st);
    } else {
      // Linear family: each sequence's rows continue from, and update, its slot's fixed-size state.
      cuda::LinAttnRowsArgs a;
      a.p = lin_attn_params(s, L.type);
      a.n_seqs = n_seqs;
      a.n_heads = s.n_heads;
      a.n_kv_heads = s.n_kv_heads;
      a.dk = a.dv = s.head_dim;
      a.last = d_last;
      a.slot_of_row = d_slot;
      a.pos = d_pos;
      a.q = m.q; a.ldq = dq;
      a.k = m.k; a.ldk = dkv;
      a.v = m.v; a.ldv = dkv;
      a.decay = L.decay.present() ? L.decay.f32() : nullptr;
      a.state = L.state;
      a.o = m.att; a.ldo = dq;
      a.host_lens = lens;
      a.host_slots = slots;
      a.host_pos0 = pos0.data();
      cuda::linear_attention_rows(a, st);
    }
    // x += in W^T + b, the GEMM's accumulate epilogue; sandwich norms: x += RMSNorm(in W^T + b) g (xn is free
    // when a branch ends)
    auto add_to_stream = [&](const DevW& w, const DevW& b, const float* in, int64_t ld_in, const DevW& post) {
      if (s.post_norms) {
        cuda::launch_linear(w, b, in, ld_in, T, m.xn, d, false, st, ar);
        cuda::post_norm_add_kernel<<<grid_t, cuda::kPostNormThreads, 0, st>>>(m.xn, post.f32(), d,
                                                                              static_cast<float>(s.norm_eps), m.x);
        cuda::check_launch("post_norm_add_kernel");
      } else {
        cuda::launch_linear(w, b, in, ld_in, T, m.x, d, true, st, ar);
      }
    };
    // x += attn Wo^T + bo (parallel residual: the MLP reads this same x; att is added after it)
    if (!s.parallel_residual) add_to_stream(L.o, L.ob, m.att, dq, L.attn_post_norm);
    // ---- MLP
    if (moe_layer(s, li)) {  // a mixture of experts: its own norm pass (its rows are gathered per expert)
      if (has_norm) {
        norm_rows(L.mlp_norm_w, L.mlp_norm_b, m.x, m.xn, T);
      } else {
        check(cudaMemcpyAsync(m.xn, m.x, T * d * sizeof(float), cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync");
      }
      if (s.post_norms) {
        moe_mlp(L.moe, m.moe_y, false);
        cuda::post_norm_add_kernel<<<grid_t, cuda::kPostNormThreads, 0, st>>>(
            m.moe_y, L.mlp_post_norm.f32(), d, static_cast<float>(s.norm_eps), m.x);
        cuda::check_launch("post_norm_add_kernel");
      } else {
        if (s.parallel_residual) add_to_stream(L.o, L.ob, m.att, dq, L.attn_post_norm);
        moe_mlp(L.moe, m.x, true);  // x += the experts' sum
      }
      continue;
    }
    xin = m.x;
    if (m.fused) {
      stats(m.x, T);
    } else if (has_norm) {
      norm_rows(L.mlp_norm_w, L.mlp_norm_b, m.x, m.xn, T);
      xin = m.xn;
    }
    cuda::launch_linear(L.up, L.upb, xin, d, T, m.up, f, false, st, ar, epi);
    if (s.gated_mlp) {
      cuda::launch_linear(L.gate, L.gateb, xin, d, T, m.gate, f, false, st, ar, epi);
      cuda::activation_kernel<<<act_grid, 256, 0, st>>>(s.activation, act_n, m.gate, m.up, m.up);
    } else {
      cuda::activation_kernel<<<act_grid, 256, 0, st>>>(s.activation, act_n, m.up, nullptr, m.up);
    }
    cuda::check_launch("activation_kernel");
    if (s.parallel_residual) add_to_stream(L.o, L.ob, m.att, dq, L.attn_post_norm);
    add_to_stream(L.down, L.downb, m.up, f, L.mlp_post_norm);  // x += act Wd^T + bd
  }

  // ---- head, on the rows asked for
  const int64_t rows = all_logits ? T : n_seqs;
  const float* src = m.x;
  if (!all_logits) {
    cuda::gather_rows_kernel<<<static_cast<unsigned>(n_seqs), 256, 0, st>>>(m.x, d_last, m.sel, d);
    cuda::check_launch("gather_rows_kernel");
    src = m.sel;
  }
  if (m.fused_head) {
    stats(src, rows);
  } else if (has_norm) {
    norm_rows(m.final_w, m.final_b, src, m.xn, rows);
    src = m.xn;
  }
  cuda::launch_linear(m.head, m.head_b, src, d, rows, logits, s.vocab, false, st, ar,
                      m.fused_head ? epi_on : cuda::RowNorm{});
  if (s.final_softcap > 0) {  // Gemma 2: logits -> c tanh(logits / c)
    const int64_t n = rows * s.vocab;
    cuda::softcap_kernel<<<static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(n, 256), 65536)), 256, 0, st>>>(
        logits, n, static_cast<float>(s.final_softcap));
    cuda::check_launch("softcap_kernel");
  }
  for (int i = 0; i < n_seqs; ++i) m.len[slots[i]] += lens[i];
}

}  // namespace ne
