// AlignedVec<T>: a std::vector whose storage starts on a 64-byte boundary (a cache line, one AVX-512
// vector), for the kernels' scratch buffers (packed panels, row buffers, per-thread partial sums).
// A plain std::vector gets malloc's 16-byte alignment (large ones sit 16 bytes past a page start), so a
// kernel's vector loads and stores of it straddle two cache lines each: the per-thread partial sums of
// the norm backward alone made it 12-15% slower, and the AMX int8 GEMM's packed panels 1.4x slower
// (benchmarks/RESULTS.md). Measure before moving a buffer here: the runner's activation buffers and KV
// cache, aligned the same way, made a 960-token prefill 2.5% slower (all of them then start at the same
// offset in their pages), so they stay plain std::vectors.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace ne {

// Tag: a type that only names the allocator (see the per-ISA containers below).
template <class T, std::size_t Align = 64, class Tag = void>
struct AlignedAllocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, Align, Tag>;
  };
  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, Align, Tag>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(Align))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(Align)); }
  template <class U>
  bool operator==(const AlignedAllocator<U, Align, Tag>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U, Align, Tag>&) const noexcept { return false; }
};

template <class T>
using AlignedVec = std::vector<T, AlignedAllocator<T>>;

}  // namespace ne

#ifdef NE_ISA_NS
// The containers of a kernel file compiled once per ISA (CMakeLists.txt ne_isa_objects), inside its
// ne::NE_ISA_NS. A std::vector's member functions are templates the compiler emits as weak symbols in every
// object that uses them, and the linker keeps one copy per name for the whole library: a std::vector<float>
// used by an AVX-512 kernel and by the runner has one _M_fill_assign, and when the AVX-512 object's copy was
// the one kept, the runner died of SIGILL on a CPU without AVX-512 (found on an AVX2-only AMD EPYC). With an
// allocator type of the ISA's own, every such member function has a name of that ISA (Vec, and AlignedVec,
// which shadows ne::AlignedVec here); cmake/check_isa_symbols.cmake fails the build if an ISA object defines a
// weak symbol outside its namespace again.
namespace ne {
namespace NE_ISA_NS {
struct IsaTag {};
template <class T>
using AlignedVec = std::vector<T, AlignedAllocator<T, 64, IsaTag>>;
template <class T>  // a plain vector: malloc's alignment, as std::vector's
using Vec = std::vector<T, AlignedAllocator<T, alignof(std::max_align_t), IsaTag>>;
}  // namespace NE_ISA_NS
}  // namespace ne
#endif
