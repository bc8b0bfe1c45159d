// Host harness that RUNS cuda/activation.cu on the CPU through the SIMT emulator of cuda_emu.h: its kernels
// and launchers ne::cuda::gated_forward / gated_backward, compiled by g++ (tests/test_activation_cuda_emu.py
// rewrites the launches and names the rewritten copy in NE_EMU_ACT_SOURCE). "Device" pointers are host
// pointers. extern "C" entry points (ctypes) return 0, or -1 with the message in ne_emu_act_error().
// dtype codes: 0 f32, 1 bf16, 2 f16, 3 f64. Matrices are rows x n with leading dimension ld (null: absent).
#include "cuda_emu.h"

#include NE_EMU_ACT_SOURCE
#include "harness.h"

namespace {

using ne_harness::mat;

void init_act_names() {
  using namespace ne::cuda;
  ne_harness::name(gated_fwd_kernel<float>, "gated_fwd<f32>");
  ne_harness::name(gated_fwd_kernel<__nv_bfloat16>, "gated_fwd<bf16>");
  ne_harness::name(gated_fwd_kernel<__half>, "gated_fwd<f16>");
  ne_harness::name(gated_fwd_kernel<double>, "gated_fwd<f64>");
  ne_harness::name(gated_bwd_kernel<float>, "gated_bwd<f32>");
  ne_harness::name(gated_bwd_kernel<__nv_bfloat16>, "gated_bwd<bf16>");
  ne_harness::name(gated_bwd_kernel<__half>, "gated_bwd<f16>");
  ne_harness::name(gated_bwd_kernel<double>, "gated_bwd<f64>");
}

}  // namespace

NE_HARNESS_NAMES(init_act_names)

extern "C" {

const char* ne_emu_act_error() { return ne_harness::error(); }
int ne_emu_act_launches(char* buf, int cap) { return ne_harness::launches(buf, cap); }

int ne_emu_act_forward(int kind, int dtype, int64_t rows, int64_t n, const void* a, int64_t lda, const void* b,
                       int64_t ldb, void* y, int64_t ldy) {
  return ne_harness::guarded([&] {
    ne::GatedArgs g{};
    g.act = kind;
    g.a = mat(a, dtype, rows, n, lda);
    g.b = mat(b, dtype, rows, n, ldb);
    g.y = mat(y, dtype, rows, n, ldy);
    ne::cuda::gated_forward(g, nullptr);
  });
}

int ne_emu_act_backward(int kind, int dtype, int64_t rows, int64_t n, const void* dy, int64_t lddy, const void* a,
                        int64_t lda, const void* b, int64_t ldb, void* da, int64_t ldda, void* db, int64_t lddb) {
  return ne_harness::guarded([&] {
    ne::GatedArgs g{};
    g.act = kind;
    g.dy = mat(dy, dtype, rows, n, lddy);
    g.a = mat(a, dtype, rows, n, lda);
    g.b = mat(b, dtype, rows, n, ldb);
    g.da = mat(da, dtype, rows, n, ldda);
    g.db = mat(db, dtype, rows, n, lddb);
    ne::cuda::gated_backward(g, nullptr);
  });
}

}  // extern "C"
