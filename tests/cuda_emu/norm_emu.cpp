// Host harness that RUNS cuda/norm.cu on the CPU through the SIMT emulator of cuda_emu.h: the very
// kernels and the very launchers (ne::cuda::norm_forward / norm_backward / norm_stats /
// channel_moments / channel_affine, with their grid / block / kernel choices) of the CUDA build,
// compiled by g++. The build (tests/test_norm_cuda_emu.py) first rewrites norm.cu's
// `k<<<cfg>>>(args)` launches into `k << ::ne_emu::launch_config(cfg)(args)` and names the rewritten
// copy in NE_EMU_NORM_SOURCE; the headers cuda_runtime.h / cuda_fp16.h / cuda_bf16.h that
// cuda/common.cuh includes resolve to tests/cuda_emu/shim/. "Device" pointers are host pointers.
//
// extern "C" entry points (ctypes): each returns 0, or -1 with the message in ne_emu_error().
// dtype codes: 0 f32, 1 bf16, 2 f16, 3 f64. Matrices are rows x n with leading dimension ld.
#include "cuda_emu.h"

#include NE_EMU_NORM_SOURCE
#include "harness.h"

#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace {

using ne_harness::guarded;
using ne_harness::name;

using ne::DType;
using ne::NormKind;
using ne::RowMatrix;


using ne_harness::mat;

// ---------------------------------------------------------------------------- kernel names
// The launch log holds kernel addresses; this table names every kernel instantiation of norm.cu.

template <class T> const char* tname() { return "f64"; }
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }
template <> const char* tname<__half>() { return "f16"; }

template <class T, NormKind K>
void name_kind() {
  using namespace ne::cuda;
  const std::string tk =
      std::string(tname<T>()) + "," + (K == NormKind::LayerNorm ? "layer" : K == NormKind::RMSNorm ? "rms" : "crms");
  constexpr int V = ne::cuda::kVec<T>;
  name(norm_fwd_cached<T, K, 1>, "norm_fwd_cached<" + tk + ",kv=1>");
  name(norm_fwd_cached<T, K, 2>, "norm_fwd_cached<" + tk + ",kv=2>");
  name(norm_fwd_cached<T, K, 4>, "norm_fwd_cached<" + tk + ",kv=4>");
  name(norm_fwd_cached<T, K, 8>, "norm_fwd_cached<" + tk + ",kv=8>");
  name(norm_fwd_wide<T, K, V>, "norm_fwd_wide<" + tk + ",v=" + std::to_string(V) + ">");
  name(norm_fwd_wide<T, K, 1>, "norm_fwd_wide<" + tk + ",v=1>");
  name(norm_bwd_cached<T, K, 1>, "norm_bwd_cached<" + tk + ",kv=1>");
  name(norm_bwd_cached<T, K, 2>, "norm_bwd_cached<" + tk + ",kv=2>");
  if constexpr (kBwdKvMax<T> >= 4) name(norm_bwd_cached<T, K, 4>, "norm_bwd_cached<" + tk + ",kv=4>");
  name(norm_bwd_wide<T, K, V>, "norm_bwd_wide<" + tk + ",v=" + std::to_string(V) + ">");
  name(norm_bwd_wide<T, K, 1>, "norm_bwd_wide<" + tk + ",v=1>");
  name(stats_kernel<T, K>, "stats_kernel<" + tk + ">");
}

template <class T>
void name_type() {
  using namespace ne::cuda;
  name_kind<T, NormKind::LayerNorm>();
  name_kind<T, NormKind::RMSNorm>();
  name_kind<T, NormKind::CRMSNorm>();
  const std::string t = tname<T>();
  constexpr int V = ne::cuda::kVec<T>;
  name(moments_kernel<T, V>, "moments_kernel<" + t + ",v=" + std::to_string(V) + ">");
  name(moments_kernel<T, 1>, "moments_kernel<" + t + ",v=1>");
  name(affine_kernel<T, V>, "affine_kernel<" + t + ",v=" + std::to_string(V) + ">");
  name(affine_kernel<T, 1>, "affine_kernel<" + t + ",v=1>");
}

void init_names_local() {
  name_type<float>();
  name_type<__nv_bfloat16>();
  name_type<__half>();
  name_type<double>();
  name(ne::cuda::colsum_kernel<float>, "colsum_kernel<f32>");
  name(ne::cuda::colsum_kernel<double>, "colsum_kernel<f64>");
}

}  // namespace

NE_HARNESS_NAMES(init_names_local)

extern "C" {

const char* ne_emu_error() { return ne_harness::error(); }

// blocks_per_sm: the occupancy the emulated device reports (0: min(32, 2048 / threads)); small values
// shrink the backward's grid so that each row group sums many rows. order: the schedule of a block's
// fibers, 0 round-robin, 1 reversed, 2 eager (cuda_emu.h). The emulated device has 4 SMs.
void ne_emu_configure(int blocks_per_sm, int order) {
  std::lock_guard<std::mutex> lock(ne_harness::mu);
  ne_emu::device().blocks_per_sm = blocks_per_sm;
  ne_emu::device().order = order;
}

// The launches of the last call (ne_harness::launches).
int ne_emu_launches(char* buf, int cap) { return ne_harness::launches(buf, cap); }

// As ne::norm_forward passes it to the CUDA kernels: res / res_out / w / b / mean / rstd may be null.
int ne_emu_norm_forward(int kind, int dtype, int64_t rows, int64_t n, const void* x, int64_t ld_x, const void* res,
                        int64_t ld_res, void* y, int64_t ld_y, void* res_out, int64_t ld_out, const void* w,
                        const void* b, void* mean, void* rstd, double eps) {
  return guarded([&] {
    ne::NormFwdArgs a{};
    a.kind = static_cast<NormKind>(kind);
    a.x = mat(x, dtype, rows, n, ld_x);
    a.res = mat(res, dtype, rows, n, ld_res);
    a.y = mat(y, dtype, rows, n, ld_y);
    a.res_out = mat(res_out, dtype, rows, n, ld_out);
    a.w = w;
    a.b = b;
    a.mean = mean;
    a.rstd = rstd;
    a.eps = eps;
    ne::cuda::norm_forward(a, nullptr);
  });
}

int ne_emu_norm_backward(int kind, int dtype, int64_t rows, int64_t n, const void* dy, int64_t ld_dy, const void* h,
                         int64_t ld_h, const void* dres, int64_t ld_dres, void* dx, int64_t ld_dx, const void* w,
                         const void* rstd, void* dw, void* db) {
  return guarded([&] {
    ne::NormBwdArgs a{};
    a.kind = static_cast<NormKind>(kind);
    a.dy = mat(dy, dtype, rows, n, ld_dy);
    a.h = mat(h, dtype, rows, n, ld_h);
    a.dres = mat(dres, dtype, rows, n, ld_dres);
    a.dx = mat(dx, dtype, rows, n, ld_dx);
    a.w = w;
    a.rstd = rstd;
    a.dw = dw;
    a.db = db;
    ne::cuda::norm_backward(a, nullptr);
  });
}

int ne_emu_norm_stats(int kind, int dtype, int64_t rows, int64_t n, const void* x, int64_t ld_x, void* mean,
                      void* rstd, double eps) {
  return guarded([&] {
    ne::NormFwdArgs a{};
    a.kind = static_cast<NormKind>(kind);
    a.x = mat(x, dtype, rows, n, ld_x);
    a.mean = mean;
    a.rstd = rstd;
    a.eps = eps;
    ne::cuda::norm_stats(a, nullptr);
  });
}

// out1[c] = sum_r x^2 (dy null) or sum_r x * dy; out2[c] = sum_r dy (with dy).
int ne_emu_channel_moments(int dtype, int64_t rows, int64_t n, const void* x, int64_t ld_x, const void* dy,
                           int64_t ld_dy, void* out1, void* out2) {
  return guarded([&] {
    ne::ChannelArgs a{};
    a.x = mat(x, dtype, rows, n, ld_x);
    a.dy = mat(dy, dtype, rows, n, ld_dy);
    a.out1 = out1;
    a.out2 = out2;
    ne::cuda::channel_moments(a, nullptr);
  });
}

// out = a * u + b (v null) or a * u + b * v, per column.
int ne_emu_channel_affine(int dtype, int64_t rows, int64_t n, const void* u, int64_t ld_u, const void* v,
                          int64_t ld_v, void* out, int64_t ld_out, const void* a_, const void* b_) {
  return guarded([&] {
    ne::ChannelArgs a{};
    a.u = mat(u, dtype, rows, n, ld_u);
    a.v = mat(v, dtype, rows, n, ld_v);
    a.out = mat(out, dtype, rows, n, ld_out);
    a.a = a_;
    a.b = b_;
    ne::cuda::channel_affine(a, nullptr);
  });
}

}  // extern "C"
