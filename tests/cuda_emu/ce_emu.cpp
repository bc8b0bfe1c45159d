// Host harness that RUNS cuda/cross_entropy.cu on the CPU through the SIMT emulator of cuda_emu.h: its
// kernel and its launcher ne::cuda::cross_entropy, compiled by g++ (tests/test_cross_entropy_cuda_emu.py
// rewrites the launches and names the rewritten copy in NE_EMU_CE_SOURCE). "Device" pointers are host
// pointers. extern "C" entry points (ctypes) return 0, or -1 with the message in ne_emu_ce_error().
#include "cuda_emu.h"

#include NE_EMU_CE_SOURCE
#include "harness.h"

namespace {

void init_ce_names() {
  using namespace ne::cuda;
  ne_harness::name(ce_rows_kernel<float>, "ce_rows<f32>");
  ne_harness::name(ce_rows_kernel<double>, "ce_rows<f64>");
}

}  // namespace

NE_HARNESS_NAMES(init_ce_names)

extern "C" {

const char* ne_emu_ce_error() { return ne_harness::error(); }
// order: the schedule of a block's fibers, 0 round-robin, 1 reversed, 2 eager (cuda_emu.h)
void ne_emu_ce_configure(int order) {
  std::lock_guard<std::mutex> lock(ne_harness::mu);
  ne_emu::device().order = order;
}
int ne_emu_ce_launches(char* buf, int cap) { return ne_harness::launches(buf, cap); }

// As ne::cross_entropy passes it to the CUDA launcher; f64: 0 for float32 rows, 1 for float64. lse, grad
// (leading dimension ld_g; may be z itself) and row_scale may be null.
int ne_emu_ce_run(int f64, int64_t rows, int64_t V, const void* z, int64_t ld_z, const int64_t* target,
                  int64_t ignore_index, double smoothing, void* loss, void* lse, void* grad, int64_t ld_g,
                  const void* row_scale, double scale) {
  return ne_harness::guarded([&] {
    ne::CeArgs a{};
    a.z.data = const_cast<void*>(z);
    a.z.dtype = f64 ? ne::DType::F64 : ne::DType::F32;
    a.z.rows = rows;
    a.z.cols = V;
    a.z.ld = ld_z;
    if (grad) {
      a.grad = a.z;
      a.grad.data = grad;
      a.grad.ld = ld_g;
    }
    a.target = target;
    a.ignore_index = ignore_index;
    a.smoothing = smoothing;
    a.loss = loss;
    a.lse = lse;
    a.row_scale = row_scale;
    a.scale = scale;
    ne::cuda::cross_entropy(a, nullptr);
  });
}

}  // extern "C"
