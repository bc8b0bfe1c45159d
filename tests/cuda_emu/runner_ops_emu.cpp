// More translation units of the runner harness (tests/test_runner_cuda_emu.py), in one file:
// cuda/gemm.cu (NE_EMU_GEMM_SOURCE: ne::cuda::dense_linear, the runner's dense projections, with the norm
// epilogue of its fused norms), cuda/linear_attention.cu (NE_EMU_LA_SOURCE: ne::cuda::linear_attention_rows,
// which the CUDA runner calls for its linear / MALA / norm attention layers, with the chunked kernels of
// cuda/linear_attention_chunk.cu, NE_EMU_LA_CHUNK_SOURCE, for long sequences) and cuda/lmul.cu
// (NE_EMU_LMUL_SOURCE: ne::cuda::lmul_linear, its projections under lmul_scope "all"), as the emulator
// compiles them. Their
// kernels have internal linkage; the runner harness (runner_emu.cpp) names them in the launch log
// through the pointers handed out below (hidden: the test process loads several harness libraries,
// which must not interpose).
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "cuda_emu.h"

#include NE_EMU_GEMM_SOURCE
#include NE_EMU_LA_SOURCE
#include NE_EMU_LA_CHUNK_SOURCE
#include NE_EMU_LMUL_SOURCE

namespace {
template <class TW>
void gemm_names(void (*reg)(const void*, const char*), const std::string& t) {
  using namespace ne::cuda;
  reg(reinterpret_cast<const void*>(gemv_kernel<TW, kGemvRows>), ("gemv<" + t + ">").c_str());
  reg(reinterpret_cast<const void*>(gemm_tiled_kernel<TW, kBigBM, kBigBN, kBigBK, kBigTM, kBigTN>),
      ("gemm_big<" + t + ">").c_str());
  reg(reinterpret_cast<const void*>(gemm_tiled_kernel<TW, kSmallBM, kSmallBN, kSmallBK, kSmallTM, kSmallTN>),
      ("gemm_small<" + t + ">").c_str());
}
}  // namespace

__attribute__((visibility("hidden"))) void ne_remu_gemm_names(void (*reg)(const void*, const char*)) {
  gemm_names<float>(reg, "f32");
  gemm_names<__nv_bfloat16>(reg, "bf16");
  gemm_names<__half>(reg, "f16");
}

__attribute__((visibility("hidden"))) const void* ne_remu_lin_attn_rows_kernel() {
  return reinterpret_cast<const void*>(ne::cuda::lin_attn_rows_kernel);
}

// the chunked forward's two kernels (long linear-family prefills), each handed to reg with its name
__attribute__((visibility("hidden"))) void ne_remu_chunk_names(void (*reg)(const void*, const char*)) {
  reg(reinterpret_cast<const void*>(ne::cuda::la2::states_kernel<float>), "la_chunk_states");
  reg(reinterpret_cast<const void*>(ne::cuda::la2::output_kernel<float>), "la_chunk_output");
}

__attribute__((visibility("hidden"))) const void* ne_remu_lmul_bmm_kernel() {
  return reinterpret_cast<const void*>(ne::cuda::bmm_kernel);
}
