// One more translation unit of the runner harness (tests/test_runner_cuda_emu.py): cuda/linear_attention.cu
// as the emulator compiles it (NE_EMU_LA_SOURCE), for ne::cuda::linear_attention_rows, which the CUDA
// runner calls for its linear / MALA / norm attention layers. Its kernel has internal linkage; the
// runner harness (runner_emu.cpp) names it in the launch log through the pointer handed out below
// (hidden: the test process loads several harness libraries, which must not interpose).
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "cuda_emu.h"

#include NE_EMU_LA_SOURCE

__attribute__((visibility("hidden"))) const void* ne_remu_lin_attn_rows_kernel() {
  return reinterpret_cast<const void*>(ne::cuda::lin_attn_rows_kernel);
}
