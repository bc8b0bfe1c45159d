// CPU feature detection and the runtime queries of ops.h.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/dispatch.h"
#include "normengine/ops.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ne {
namespace {

Isa detect_isa() {
#if defined(NE_HAVE_X86_ISAS)
  __builtin_cpu_init();
  bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c");
  if (avx512 && avx2 && __builtin_cpu_supports("avx512bf16")) return Isa::AVX512BF16;
  if (avx512 && avx2) return Isa::AVX512;
  if (avx2) return Isa::AVX2;
#endif
  return Isa::Generic;
}

Isa parse_isa(const char* s) {
  std::string v(s);
  if (v == "avx512bf16") return Isa::AVX512BF16;
  if (v == "avx512") return Isa::AVX512;
  if (v == "avx2") return Isa::AVX2;
  if (v == "generic") return Isa::Generic;
  throw ValueError("isa: expected 'avx512bf16', 'avx512', 'avx2' or 'generic', got '" + v + "'");
}

const Isa kDetected = detect_isa();
// NORMENGINE_ISA caps the ISA from the start (e.g. to test the fallbacks in a fresh process).
std::atomic<int> g_isa{[] {
  Isa isa = kDetected;
  if (const char* env = std::getenv("NORMENGINE_ISA")) {
    try {
      Isa want = parse_isa(env);
      if (want < isa) isa = want;
    } catch (const Error&) {
    }
  }
  return static_cast<int>(isa);
}()};

}  // namespace

Isa detected_isa() { return kDetected; }
Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

const char* cpu_isa() {
  switch (active_isa()) {
    case Isa::AVX512BF16: return "avx512bf16";
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "generic";
  }
}

void force_cpu_isa(const char* isa) {
  Isa want = parse_isa(isa);
  if (want > kDetected)
    throw UnsupportedError(std::string("isa: this CPU does not support '") + isa + "'");
  g_isa.store(static_cast<int>(want));
}

}  // namespace ne

namespace ne {
#if defined(NE_WITH_CUDA)
namespace cuda { int device_count(); }  // cuda/runtime.cu
bool built_with_cuda() { return true; }
bool cuda_available() { return cuda::device_count() > 0; }
#else
bool built_with_cuda() { return false; }
bool cuda_available() { return false; }
#endif
bool worth_streaming(const void* p, int64_t bytes) {
  if (bytes < (int64_t(8) << 20)) return false;
#if defined(__linux__)
  // sample the first, middle and last page: resident means the memory was written before (reused)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t q : {a, a + static_cast<uintptr_t>(bytes / 2), a + static_cast<uintptr_t>(bytes) - 1}) {
    unsigned char resident = 0;
    if (mincore(reinterpret_cast<void*>(q & ~(page - 1)), page, &resident) != 0 || !(resident & 1)) return false;
  }
  return true;
#else
  (void)p;
  return true;
#endif
}

}  // namespace ne
