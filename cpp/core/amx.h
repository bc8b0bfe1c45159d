// Intel AMX (Advanced Matrix Extensions, Sapphire Rapids and later): what this CPU, its OS and this
// process allow, and the one tile configuration the engine's AMX kernels use. The kernels themselves
// live with their op families (ops/quant_int8_x86.cpp: TDPBSSD; ops/gemm_bf16_amx.cpp: TDPBF16PS).
#pragma once
#include <cstdint>

namespace ne {

struct AmxCaps {
  bool int8 = false;  // AMX-TILE + AMX-INT8, tile state enabled by the OS and granted to this process
  bool bf16 = false;  // AMX-TILE + AMX-BF16, likewise (and AVX512-BF16 for the conversions)
};

// Detected once per process: CPUID leaf 7 (AMX-TILE, -INT8, -BF16), XCR0 bits 17-18 (XTILECFG,
// XTILEDATA: the OS saves the 8 KB tile state), and arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), which
// Linux requires before a process touches the tiles. Not capped by force_cpu_isa(): callers check
// active_isa() >= Isa::AVX512 themselves.
const AmxCaps& amx_caps();

// Palette 1 with every tile used as 16 rows x 64 bytes (C: 16 x 16 fp32 / int32; A: 16 rows x 64
// bytes; B: 16 rows of VNNI pairs / quads x 64 bytes). Load it with _tile_loadconfig(&cfg) on the
// thread that runs the tiles.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  AmxTileConfig() {
    for (int t = 0; t < 8; ++t) {
      rows[t] = 16;
      colsb[t] = 64;
    }
  }
};

}  // namespace ne
