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

template <class T, std::size_t Align = 64>
struct AlignedAllocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, Align>;
  };
  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, Align>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(Align))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(Align)); }
  template <class U>
  bool operator==(const AlignedAllocator<U, Align>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U, Align>&) const noexcept { return false; }
};

template <class T>
using AlignedVec = std::vector<T, AlignedAllocator<T>>;

}  // namespace ne
