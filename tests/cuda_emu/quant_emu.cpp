// Host harness that RUNS cuda/quant_gemm.cu on the CPU through the SIMT emulator of cuda_emu.h: the
// very kernels and launchers (ne::cuda::quant_linear / quant_activations, with their GEMV / tensor-core /
// fp32-tile choices) of the CUDA build, compiled by g++ with -DNE_CUDA_EMU (which routes the file's
// cp.async / ldmatrix / mma.sync wrappers to the emulator's). The build (tests/test_quant_cuda_emu.py)
// first rewrites the launches `k<<<cfg>>>(args)` into `k << ::ne_emu::launch_config(cfg)(args)` and
// `extern __shared__ T name[];` into `T* name = ::ne_emu::dynamic_shared<T>();`, and names the rewritten
// copy in NE_EMU_QUANT_SOURCE. "Device" pointers are host pointers.
//
// extern "C" entry points (ctypes): each returns 0, or -1 with the message in ne_qemu_error().
// x dtype codes: 0 f32, 1 bf16, 2 f16. Formats: ne::QFormat (0 int8, 1 int8-weight, 2 int4, 3 fp8).
#include "cuda_emu.h"

#include NE_EMU_QUANT_SOURCE
#include "harness.h"

#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace {

using ne_harness::guarded;
using ne_harness::name;

using ne::DType;
using ne::QFormat;


using ne_harness::dtype_of;

// ---------------------------------------------------------------------------- kernel names

template <class T>
void name_act(const std::string& t) {
  using namespace ne::cuda;
  name(quant_int8_rows<T>, "quant_int8_rows<" + t + ">");
  name(quant_fp8_blocks<T>, "quant_fp8_blocks<" + t + ">");
  name(to_f32_rows<T>, "to_f32_rows<" + t + ">");
}

template <QFormat F>
void name_gemv(const std::string& f) {
  using namespace ne::cuda;
  name(gemv_kernel<F, 1>, "gemv_kernel<" + f + ",1>");
  name(gemv_kernel<F, 2>, "gemv_kernel<" + f + ",2>");
  name(gemv_kernel<F, 4>, "gemv_kernel<" + f + ",4>");
  name(gemv_kernel<F, 8>, "gemv_kernel<" + f + ",8>");
}

void init_names_local() {
  using namespace ne::cuda;
  name_act<float>("f32");
  name_act<__nv_bfloat16>("bf16");
  name_act<__half>("f16");
  name_gemv<QFormat::Int8>("int8");
  name_gemv<QFormat::Int8Weight>("int8w");
  name_gemv<QFormat::Int4>("int4");
  name_gemv<QFormat::FP8>("fp8");
  name(mma_kernel<MmaOp::S8>, "mma_kernel<int8>");
  name(mma_kernel<MmaOp::E4M3>, "mma_kernel<fp8>");
  name(mma_kernel<MmaOp::BF16>, "mma_kernel<bf16>");
  name(to_bf16_rows, "to_bf16_rows");
  name(fma_kernel<QFormat::Int8Weight>, "fma_kernel<int8w>");
  name(fma_kernel<QFormat::Int4>, "fma_kernel<int4>");
}

}  // namespace

NE_HARNESS_NAMES(init_names_local)

extern "C" {

const char* ne_qemu_error() { return ne_harness::error(); }

// order: the schedule of a block's fibers, 0 round-robin, 1 reversed, 2 eager; cp_async: 0 copies land at
// the cp.async, 1 at the wait_group that retires them (cuda_emu.h); cc: compute capability * 10.
void ne_qemu_configure(int order, int cp_async, int cc) {
  std::lock_guard<std::mutex> lock(ne_harness::mu);
  ne_emu::device().order = order;
  ne_emu::device().cp_async = cp_async;
  ne_emu::device().cc_major = cc / 10;
  ne_emu::device().cc_minor = cc % 10;
}

// The kernel names of every kernel instantiation of quant_gemm.cu, one a line.
int ne_qemu_kernels(char* buf, int cap) {
  std::lock_guard<std::mutex> lock(ne_harness::mu);
  if (ne_harness::names.empty()) ne_harness::init_names();
  std::string s;
  for (const auto& kv : ne_harness::names) s += kv.second + "\n";
  if (cap > 0) {
    std::strncpy(buf, s.c_str(), static_cast<size_t>(cap) - 1);
    buf[cap - 1] = 0;
  }
  return static_cast<int>(s.size());
}

// The launches of the last call (ne_harness::launches).
int ne_qemu_launches(char* buf, int cap) { return ne_harness::launches(buf, cap); }

// ne::cuda::quant_linear: y[M, N] (+)= x[M, K] W^T (+ bias); zero / bias may be null.
int ne_qemu_quant_linear(int64_t M, const void* x, int xdt, int64_t ldx, int fmt, const void* data,
                         const float* scale, const float* zero, int64_t group, int64_t N, int64_t K,
                         const float* bias, float* y, int64_t ldy, int accumulate) {
  return guarded([&] {
    ne::QWeight w;
    w.format = static_cast<QFormat>(fmt);
    w.N = N;
    w.K = K;
    w.data = data;
    w.scale = scale;
    w.zero = zero;
    w.group = group;
    ne::cuda::quant_linear(M, x, dtype_of(xdt), ldx, w, bias, y, ldy, accumulate != 0, nullptr);
  });
}

// ne::cuda::bf16_linear: y[M, N] (+)= bf16(x'[M, K]) W^T (+ bias), W bfloat16 [N, ldw]; x' = x, or with a norm
// ((x - shift) - shift_lo) * scale per row (any of the three null: that step skipped); *ran: whether it applied.
int ne_qemu_bf16_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, int64_t ldw,
                        const float* bias, float* y, int64_t ldy, int accumulate, const float* shift,
                        const float* shift_lo, const float* scale, int* ran) {
  return guarded([&] {
    ne::cuda::RowNorm norm;
    norm.shift = shift;
    norm.shift_lo = shift_lo;
    norm.scale = scale;
    *ran = ne::cuda::bf16_linear(M, N, K, x, ldx, w, ldw, bias, y, ldy, accumulate != 0, nullptr, norm) ? 1 : 0;
  });
}

// ne::cuda::quant_activations: fmt 0 (int8): q int8 [M, ldq], s [M] (stride lds); 3 (fp8): q e4m3 bytes, s [M, lds].
int ne_qemu_quant_activations(int64_t M, int64_t K, const void* x, int xdt, int64_t ldx, int fmt, void* q,
                              int64_t ldq, float* s, int64_t lds) {
  return guarded([&] {
    ne::cuda::quant_activations(M, K, x, dtype_of(xdt), ldx, static_cast<QFormat>(fmt), q, ldq, s, lds, nullptr);
  });
}

// The emulator's E4M3 conversions (what the shimmed cuda_fp8.h returns), for a check against torch.
void ne_qemu_e4m3(const float* v, int64_t n, int sat, uint8_t* bits, float* back) {
  for (int64_t i = 0; i < n; ++i) {
    bits[i] = __nv_cvt_float_to_fp8(v[i], sat ? __NV_SATFINITE : __NV_NOSAT, __NV_E4M3);
    const __half_raw h = __nv_cvt_fp8_to_halfraw(bits[i], __NV_E4M3);
    back[i] = __half2float(__half{h.x});
  }
}

}  // extern "C"
