// Runtime ISA selection. Each kernel family is compiled once per ISA into namespaces
// ne::isa_avx512bf16, ne::isa_avx512, ne::isa_avx2 and ne::isa_generic; the family's entry point picks one table of
// function pointers with pick_isa(), based on what the CPU supports (once, at first use).
#pragma once

namespace ne {

enum class Isa : int { Generic = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3 };

Isa active_isa();    // best supported ISA, lowered by force_cpu_isa()
Isa detected_isa();  // best supported ISA (CPU and OS), never lowered

// Choose among one table per ISA. The x86 tables are null on builds for other processors.
template <class T>
inline const T* pick_isa(const T* avx512bf16, const T* avx512, const T* avx2, const T* generic) {
  Isa isa = active_isa();
  if (isa == Isa::AVX512BF16 && avx512bf16) return avx512bf16;
  if (isa >= Isa::AVX512 && avx512) return avx512;
  if (isa >= Isa::AVX2 && avx2) return avx2;
  return generic;
}

}  // namespace ne

// Declares the per-ISA getters of a kernel table `Table`: ne::isa_X::getter() for each ISA.
#if defined(NE_HAVE_X86_ISAS)
#define NE_DECLARE_ISA_TABLES(Table, getter)              \
  namespace ne { namespace isa_avx512bf16 { const Table* getter(); } } \
  namespace ne { namespace isa_avx512 { const Table* getter(); } } \
  namespace ne { namespace isa_avx2 { const Table* getter(); } }   \
  namespace ne { namespace isa_generic { const Table* getter(); } }
#define NE_PICK_ISA(getter) \
  ::ne::pick_isa(::ne::isa_avx512bf16::getter(), ::ne::isa_avx512::getter(), ::ne::isa_avx2::getter(), \
                 ::ne::isa_generic::getter())
#else
#define NE_DECLARE_ISA_TABLES(Table, getter) \
  namespace ne { namespace isa_generic { const Table* getter(); } }
#define NE_PICK_ISA(getter) ::ne::isa_generic::getter()
#endif
