// Host harness that RUNS cuda/rotary.cu on the CPU through the SIMT emulator of cuda_emu.h: its kernel and its
// launcher ne::cuda::rotary, compiled by g++ (tests/test_rotary_cuda_emu.py rewrites the launch and names the
// rewritten copy in NE_EMU_ROTARY_SOURCE). "Device" pointers are host pointers. extern "C" entry point (ctypes):
// 0, or -1 with the message in ne_emu_rot_error(). dtype codes as harness.h's.
#include "cuda_emu.h"

#include NE_EMU_ROTARY_SOURCE
#include "harness.h"

namespace {

void init_rot_names() {
  using namespace ne::cuda;
  ne_harness::name(rotary_kernel<float>, "rotary<f32>");
  ne_harness::name(rotary_kernel<__nv_bfloat16>, "rotary<bf16>");
  ne_harness::name(rotary_kernel<__half>, "rotary<f16>");
  ne_harness::name(rotary_kernel<double>, "rotary<f64>");
}

}  // namespace

NE_HARNESS_NAMES(init_rot_names)

extern "C" {

const char* ne_emu_rot_error() { return ne_harness::error(); }
int ne_emu_rot_launches(char* buf, int cap) { return ne_harness::launches(buf, cap); }

int ne_emu_rot_run(int dtype, int64_t rows, int64_t D, const void* x, int64_t ldx, void* y, int64_t ldy,
                   const void* cos, const void* sin, int64_t P, int64_t R, const int64_t* crow, int backward) {
  return ne_harness::guarded([&] {
    ne::RotaryArgs a{};
    a.x = ne_harness::mat(x, dtype, rows, D, ldx);
    a.y = ne_harness::mat(y, dtype, rows, D, ldy);
    a.cos = cos;
    a.sin = sin;
    a.crow = crow;
    a.R = R;
    a.n_positions = P;
    a.backward = backward != 0;
    ne::cuda::rotary(a, nullptr);
  });
}

}  // extern "C"
