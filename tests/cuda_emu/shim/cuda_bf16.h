// Stand-in for the CUDA toolkit header of the same name when kernels are compiled for the host
// emulator (tests/cuda_emu/cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
