// A caching allocator for large host (CPU) buffers: the op outputs of 8 MiB and more
// (python/normengine/ops/_tensor.py: empty).
//
// Why: glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with a fresh
// mapping and hands it back to the kernel on free (smaller ones too, often, when the top of its heap
// passes the trim threshold), so each such output an op writes first takes a
// page fault per 4 KiB page and has the kernel zero it. Measured on the 2-vCPU Xeon guest
// (benchmarks/RESULTS.md): a fused add + LayerNorm over 8192 x 1024 fp32 ran 2.9-3.3x torch's
// add-then-norm into reused buffers and 0.89-0.96x into fresh ones. torch's CUDA allocator caches
// for the same reason; its CPU allocator does not. Here a freed block goes back to a cache and the
// next request of about its size takes it, already faulted in (and on 2 MiB pages where the kernel
// gives them).
//
// Rules:
//   - sizes are rounded up to whole 2 MiB pages; a request takes the smallest cached block that
//     holds it with at most a quarter to spare (else a new block is mapped);
//   - a new block is 2 MiB aligned, advised MADV_HUGEPAGE (unless NORMENGINE_HUGEPAGES=0) and
//     populated at once (MADV_POPULATE_WRITE, one call instead of a fault per page);
//   - the cache keeps at most `limit` bytes of freed blocks, handing the least recently freed ones
//     back to the kernel beyond it. Default min(1 GiB, physical memory / 8); NORMENGINE_CPU_CACHE_MB
//     sets it (0: no caching, every block is unmapped when freed; the Python ops then
//     allocate with torch.empty instead); host_cache_empty() hands back
//     every cached block now.
// Thread-safe; a forked child starts with a fresh lock (blocks cached before the fork stay usable).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ne {

// A block of at least `bytes` (its true size, a whole number of 2 MiB pages, in *capacity), 2 MiB
// aligned, writable, contents unspecified. Throws ne::Error when the system has no memory for it.
void* host_cache_acquire(std::size_t bytes, std::size_t* capacity);
// Hands a block back (ptr and capacity as acquire gave them).
void host_cache_release(void* ptr, std::size_t capacity);
// Unmaps every cached (free) block; returns the bytes handed back.
std::size_t host_cache_empty();

struct HostCacheStats {
  std::size_t cached_bytes = 0;  // free blocks held for reuse
  std::size_t in_use_bytes = 0;  // blocks handed out and not yet released
  std::size_t limit_bytes = 0;   // the most cached_bytes may reach
  std::uint64_t hits = 0;        // requests served from the cache
  std::uint64_t misses = 0;      // requests that mapped a new block
};
HostCacheStats host_cache_stats();
// Sets the limit (bytes); cached blocks beyond it are handed back at once.
void host_cache_set_limit(std::size_t bytes);

}  // namespace ne
