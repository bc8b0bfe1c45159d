// More translation units of the runner harness (tests/test_runner_cuda_emu.py), in one file:
// cuda/linear_attention.cu (NE_EMU_LA_SOURCE: ne::cuda::linear_attention_rows, which the CUDA runner
// calls for its linear / MALA / norm attention layers) and cuda/lmul.cu (NE_EMU_LMUL_SOURCE:
// ne::cuda::lmul_linear, its projections under lmul_scope "all"), as the emulator compiles them. Their
// kernels have internal linkage; the runner harness (runner_emu.cpp) names them in the launch log
// through the pointers handed out below (hidden: the test process loads several harness libraries,
// which must not interpose).
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "cuda_emu.h"

#include NE_EMU_LA_SOURCE
#include NE_EMU_LMUL_SOURCE

__attribute__((visibility("hidden"))) const void* ne_remu_lin_attn_rows_kernel() {
  return reinterpret_cast<const void*>(ne::cuda::lin_attn_rows_kernel);
}

__attribute__((visibility("hidden"))) const void* ne_remu_lmul_bmm_kernel() {
  return reinterpret_cast<const void*>(ne::cuda::bmm_kernel);
}
