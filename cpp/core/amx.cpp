#include "core/amx.h"

#include "core/dispatch.h"

#if defined(NE_HAVE_X86_ISAS) && defined(__GNUC__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define NE_AMX_X86 1
#endif

namespace ne {
namespace {

AmxCaps detect() {
  AmxCaps c;
#if defined(NE_AMX_X86)
  unsigned a, b, cx, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &cx, &d)) return c;
  if (detected_isa() < Isa::AVX512) return c;  // includes the OS's AVX-512 state check
  const bool tile = d >> 24 & 1, int8 = d >> 25 & 1, bf16 = d >> 22 & 1;
  const bool vnni512 = cx >> 11 & 1;
  if (!tile) return c;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return c;
#if defined(SYS_arch_prctl)
  // ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18; granted for the whole process
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return c;
#else
  return c;
#endif
  c.int8 = int8 && vnni512;
  c.bf16 = bf16 && detected_isa() >= Isa::AVX512BF16;
  (void)hi;
#endif
  return c;
}

}  // namespace

const AmxCaps& amx_caps() {
  static const AmxCaps c = detect();
  return c;
}

}  // namespace ne
