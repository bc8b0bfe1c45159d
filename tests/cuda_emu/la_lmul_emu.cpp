// Host harness that RUNS cuda/lmul.cu (ne::cuda::lmul_map / lmul_bmm) and cuda/linear_attention.cu
// (ne::cuda::linear_attention_forward / backward: the version-1 recurrent kernels, and the launcher's
// dispatch to the chunked kernels of cuda/linear_attention_chunk.cu) on the CPU through the SIMT emulator
// of cuda_emu.h, compiled by g++. The build (tests/test_lmul_la_cuda_emu.py) rewrites the launches
// `k<<<cfg>>>(args)` into `k << ::ne_emu::launch_config(cfg)(args)` and `extern __shared__ T name[];` into
// `T* name = ::ne_emu::dynamic_shared<T>();` in temporary copies of the three files, and names them in
// NE_EMU_LMUL_SOURCE, NE_EMU_LA_SOURCE and NE_EMU_LA_CHUNK_SOURCE: all three are included into this one
// translation unit so that their kernels (in anonymous namespaces) can be named in the launch log.
// "Device" pointers are host pointers.
//
// extern "C" entry points (ctypes): each returns 0, or -1 with the message in ne_lemu_error().
// dtype codes: ne::DType (0 f32, 1 f16, 2 bf16).
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "cuda_emu.h"

#include NE_EMU_LMUL_SOURCE
#include NE_EMU_LA_SOURCE
#include NE_EMU_LA_CHUNK_SOURCE
#include "harness.h"

namespace {

using ne_harness::guarded;
using ne_harness::name;



template <class T>
void name_la(const std::string& t) {
  using namespace ne::cuda;
  name(lin_attn_fwd_kernel<T>, "lin_attn_fwd_kernel<" + t + ">");
  name(lin_attn_bwd_kernel<T>, "lin_attn_bwd_kernel<" + t + ">");
  name(la2::states_kernel<T>, "states_kernel<" + t + ">");
  name(la2::output_kernel<T>, "output_kernel<" + t + ">");
  name(la2::backward_local_kernel<T>, "backward_local_kernel<" + t + ">");
  name(la2::backward_sweep_kernel<T>, "backward_sweep_kernel<" + t + ">");
  name(la2::backward_kv_kernel<T>, "backward_kv_kernel<" + t + ">");
}

void init_names_local() {
  name(ne::cuda::map_kernel, "lmul_map_kernel");
  name(ne::cuda::bmm_kernel, "lmul_bmm_kernel");
  name_la<float>("f32");
  name_la<__half>("f16");
  name_la<__nv_bfloat16>("bf16");
}

ne::TensorView view(void* data, int dt, std::initializer_list<int64_t> shape, const int64_t* strides) {
  ne::TensorView t;
  t.data = data;
  t.dtype = static_cast<ne::DType>(dt);
  t.device = ne::Device{ne::DeviceType::CUDA, 0};
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  if (strides) {
    for (i = 0; i < t.ndim; ++i) t.strides[i] = strides[i];
  } else {
    int64_t e = 1;
    for (i = t.ndim - 1; i >= 0; --i) {
      t.strides[i] = e;
      e *= t.shape[i];
    }
  }
  return t;
}

ne::LinAttnParams params(int kind, int fmap, int causal, int normalize, int out_norm, float eps, int algorithm) {
  ne::LinAttnParams p;
  p.kind = static_cast<ne::LinAttnKind>(kind);
  p.fmap = static_cast<ne::FeatureMap>(fmap);
  p.causal = causal != 0;
  p.normalize = normalize != 0;
  p.out_norm = out_norm;
  p.eps = eps;
  p.algorithm = static_cast<ne::LinAttnAlgorithm>(algorithm);
  return p;
}

}  // namespace

NE_HARNESS_NAMES(init_names_local)

extern "C" {

const char* ne_lemu_error() { return ne_harness::error(); }

// order: schedule of a block's fibers (0 round-robin, 1 reversed, 2 eager); smem_optin: bytes that
// cudaDevAttrMaxSharedMemoryPerBlockOptin reports (0: leave the emulator's default).
void ne_lemu_configure(int order, int smem_optin) {
  std::lock_guard<std::mutex> lock(ne_harness::mu);
  ne_emu::device().order = order;
  static int dflt = -1;
  if (dflt < 0) dflt = static_cast<int>(ne_emu::device().smem_optin);
  ne_emu::device().smem_optin = smem_optin > 0 ? smem_optin : dflt;
}

int ne_lemu_launches(char* buf, int cap) { return ne_harness::launches(buf, cap); }

int ne_lemu_lmul_map(int64_t n, const float* a, const float* b, float* out, int bits) {
  return guarded([&] { ne::cuda::lmul_map(n, a, b, out, bits, nullptr); });
}

int ne_lemu_lmul_bmm(int64_t B, int64_t M, int64_t N, int64_t K, const float* x, int64_t sxb, int64_t ldx,
                     const float* w, int64_t swb, int64_t ldw, float* y, int64_t syb, int64_t ldy, int bits) {
  return guarded([&] { ne::cuda::lmul_bmm(B, M, N, K, x, sxb, ldx, w, swb, ldw, y, syb, ldy, bits, nullptr); });
}

// q, k [B, T, H, Dk], v [B, T, H, Dv] with strides qs / ks / vs (4 each, elements); o [B, T, H, Dv]
// contiguous; decay [H], init / fin [B, H, Dk+1, Dv+1] or null.
int ne_lemu_la_forward(int kind, int fmap, int causal, int normalize, int out_norm, float eps, int algorithm, int dt,
                       int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv, void* q, const int64_t* qs, void* k,
                       const int64_t* ks, void* v, const int64_t* vs, float* decay, float* init, void* o, float* fin) {
  return guarded([&] {
    const auto p = params(kind, fmap, causal, normalize, out_norm, eps, algorithm);
    const auto tq = view(q, dt, {B, T, H, Dk}, qs), tk = view(k, dt, {B, T, H, Dk}, ks),
               tv = view(v, dt, {B, T, H, Dv}, vs), to = view(o, dt, {B, T, H, Dv}, nullptr);
    const auto td = view(decay, 0, {H}, nullptr), ti = view(init, 0, {B, H, Dk + 1, Dv + 1}, nullptr),
               tf = view(fin, 0, {B, H, Dk + 1, Dv + 1}, nullptr);
    ne::cuda::linear_attention_forward(p, tq, tk, tv, decay ? &td : nullptr, init ? &ti : nullptr, to,
                                       fin ? &tf : nullptr, nullptr);
  });
}

// grads gq, gk, gv contiguous; go [B, T, H, Dv] contiguous; gfin / ginit [B, H, Dk+1, Dv+1] or null.
int ne_lemu_la_backward(int kind, int fmap, int causal, int normalize, int out_norm, float eps, int algorithm, int dt,
                        int64_t B, int64_t T, int64_t H, int64_t Dk, int64_t Dv, void* q, const int64_t* qs, void* k,
                        const int64_t* ks, void* v, const int64_t* vs, float* decay, float* init, void* go,
                        float* gfin, void* gq, void* gk, void* gv, float* ginit) {
  return guarded([&] {
    const auto p = params(kind, fmap, causal, normalize, out_norm, eps, algorithm);
    const auto tq = view(q, dt, {B, T, H, Dk}, qs), tk = view(k, dt, {B, T, H, Dk}, ks),
               tv = view(v, dt, {B, T, H, Dv}, vs), tgo = view(go, dt, {B, T, H, Dv}, nullptr);
    const auto tgq = view(gq, dt, {B, T, H, Dk}, nullptr), tgk = view(gk, dt, {B, T, H, Dk}, nullptr),
               tgv = view(gv, dt, {B, T, H, Dv}, nullptr);
    const auto td = view(decay, 0, {H}, nullptr), ti = view(init, 0, {B, H, Dk + 1, Dv + 1}, nullptr),
               tgf = view(gfin, 0, {B, H, Dk + 1, Dv + 1}, nullptr),
               tgi = view(ginit, 0, {B, H, Dk + 1, Dv + 1}, nullptr);
    ne::cuda::linear_attention_backward(p, tq, tk, tv, decay ? &td : nullptr, init ? &ti : nullptr, tgo,
                                        gfin ? &tgf : nullptr, tgq, tgk, tgv, ginit ? &tgi : nullptr, nullptr);
  });
}

}  // extern "C"
