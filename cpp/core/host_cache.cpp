// The host-buffer cache of normengine/host_cache.h: a short list of free blocks under one lock.
// The list stays short (limit / 8 MiB entries at most, 128 by default), so a linear best-fit scan
// is all the search it needs.
#include "normengine/host_cache.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "normengine/errors.h"

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ne {
namespace {

constexpr std::size_t kHugePage = std::size_t(2) << 20;
#if defined(__linux__)
constexpr int kMadvHugepage = 14;       // MADV_HUGEPAGE
constexpr int kMadvPopulateWrite = 23;  // MADV_POPULATE_WRITE, Linux 5.14+ (older kernels refuse it)
#endif

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

std::size_t default_limit() {
  if (const char* env = std::getenv("NORMENGINE_CPU_CACHE_MB")) {
    char* end = nullptr;
    unsigned long long mb = std::strtoull(env, &end, 10);
    if (end != env && *end == '\0') return static_cast<std::size_t>(mb) << 20;
  }
  std::size_t limit = std::size_t(1) << 30;
#if defined(__linux__)
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) {
    std::size_t eighth = static_cast<std::size_t>(pages) / 8 * static_cast<std::size_t>(page);
    if (eighth < limit) limit = eighth;
  }
#endif
  return limit;
}

bool hugepages_wanted() {
  const char* env = std::getenv("NORMENGINE_HUGEPAGES");
  return !(env && std::string(env) == "0");
}

// A new block of `cap` bytes (a multiple of 2 MiB), 2 MiB aligned, faulted in.
void* map_block(std::size_t cap) {
#if defined(__linux__)
  void* raw = mmap(nullptr, cap + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  // keep the 2 MiB aligned middle, hand back the ends
  auto a = reinterpret_cast<std::uintptr_t>(raw);
  std::uintptr_t p = round_up(a, kHugePage);
  if (p > a) munmap(raw, p - a);
  std::size_t tail = (a + cap + kHugePage) - (p + cap);
  if (tail) munmap(reinterpret_cast<void*>(p + cap), tail);
  void* ptr = reinterpret_cast<void*>(p);
  if (hugepages_wanted()) madvise(ptr, cap, kMadvHugepage);  // a refusal leaves 4 KiB pages
  madvise(ptr, cap, kMadvPopulateWrite);  // a refusal leaves the pages to fault in as they are written
  return ptr;
#else
  return ::operator new(cap, std::align_val_t(kHugePage), std::nothrow);
#endif
}

void unmap_block(void* ptr, std::size_t cap) {
#if defined(__linux__)
  munmap(ptr, cap);
#else
  ::operator delete(ptr, std::align_val_t(kHugePage));
  (void)cap;
#endif
}

struct Block {
  void* ptr;
  std::size_t cap;
};

struct Cache {
  std::mutex mu;
  std::vector<Block> free_;  // least recently freed first
  HostCacheStats stats;

  // Blocks beyond the limit, oldest first, taken out of the list (the caller unmaps them unlocked).
  std::vector<Block> over_limit() {
    std::vector<Block> out;
    std::size_t drop = 0;
    while (stats.cached_bytes > stats.limit_bytes && drop < free_.size()) {
      stats.cached_bytes -= free_[drop].cap;
      out.push_back(free_[drop++]);
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
    return out;
  }
};

// Never destroyed: tensors (and their release callbacks) may outlive static destruction.
Cache& cache() {
  static Cache* c = [] {
    auto* made = new Cache;
    made->stats.limit_bytes = default_limit();
#if defined(__linux__)
    // a fork taken while another thread held the lock would leave the child's copy locked for good
    pthread_atfork(nullptr, nullptr, [] { new (&cache().mu) std::mutex; });
#endif
    return made;
  }();
  return *c;
}

}  // namespace

void* host_cache_acquire(std::size_t bytes, std::size_t* capacity) {
  const std::size_t cap = round_up(bytes ? bytes : 1, kHugePage);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    // best fit with at most a quarter to spare; among equals the most recently freed (warmest)
    std::ptrdiff_t best = -1;
    for (std::size_t i = 0; i < c.free_.size(); ++i) {
      std::size_t have = c.free_[i].cap;
      if (have >= cap && have - cap <= cap / 4 && (best < 0 || have <= c.free_[best].cap))
        best = static_cast<std::ptrdiff_t>(i);
    }
    if (best >= 0) {
      Block b = c.free_[best];
      c.free_.erase(c.free_.begin() + best);
      c.stats.cached_bytes -= b.cap;
      c.stats.in_use_bytes += b.cap;
      ++c.stats.hits;
      *capacity = b.cap;
      return b.ptr;
    }
    ++c.stats.misses;
  }
  void* p = map_block(cap);
  if (!p) {
    // the cached blocks are memory too: hand them back and try once more
    host_cache_empty();
    p = map_block(cap);
    if (!p) throw Error("out of memory: could not map a host buffer of " + std::to_string(cap) + " bytes");
  }
  std::lock_guard<std::mutex> lock(c.mu);
  c.stats.in_use_bytes += cap;
  *capacity = cap;
  return p;
}

void host_cache_release(void* ptr, std::size_t capacity) {
  if (!ptr) return;
  Cache& c = cache();
  std::vector<Block> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.stats.in_use_bytes -= capacity;
    c.free_.push_back({ptr, capacity});
    c.stats.cached_bytes += capacity;
    drop = c.over_limit();
  }
  for (const Block& b : drop) unmap_block(b.ptr, b.cap);
}

std::size_t host_cache_empty() {
  Cache& c = cache();
  std::vector<Block> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    drop.swap(c.free_);
    c.stats.cached_bytes = 0;
  }
  std::size_t n = 0;
  for (const Block& b : drop) {
    unmap_block(b.ptr, b.cap);
    n += b.cap;
  }
  return n;
}

HostCacheStats host_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.stats;
}

void host_cache_set_limit(std::size_t bytes) {
  Cache& c = cache();
  std::vector<Block> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.stats.limit_bytes = bytes;
    drop = c.over_limit();
  }
  for (const Block& b : drop) unmap_block(b.ptr, b.cap);
}

}  // namespace ne
