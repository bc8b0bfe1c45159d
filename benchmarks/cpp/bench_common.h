// bench_common.h: what the standalone C++ benchmarks share: page-touched aligned buffers,
// deterministic fills, timing and medians, memory-bandwidth references (a parallel memcpy and a
// read-only stream on the engine's thread pool) and cache eviction. Header-only, no Python.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include <sys/mman.h>

#include "core/half.h"
#include "core/parallel.h"
#include "normengine/tensor.h"

namespace bench {

// A 64-byte aligned buffer whose pages are all touched (in parallel: first touch) before any
// timing: glibc maps fresh pages for every allocation >= 32 MB, which would add page faults to the
// first timed run. huge: 2 MiB aligned and advised as transparent huge pages (MADV_HUGEPAGE), as
// normengine.load places a model's weights (python/normengine/_arena.py).
struct Buffer {
  char* p = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n, bool huge = false) : bytes((n + 63) / 64 * 64) {
    const size_t align = huge ? size_t(2) << 20 : 64;
    bytes = (bytes + align - 1) / align * align;
    p = static_cast<char*>(std::aligned_alloc(align, bytes ? bytes : align));
    if (!p) { std::fprintf(stderr, "out of memory (%zu bytes)\n", n); std::exit(1); }
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // no THP in the kernel: small pages, as before
#endif
    ne::parallel_for(static_cast<int64_t>(bytes), int64_t(1) << 20,
                     [&](int64_t b, int64_t e, int) { std::memset(p + b, 0, static_cast<size_t>(e - b)); });
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double seconds_of(const std::function<void()>& fn) {
  const double t0 = now_s();
  fn();
  return now_s() - t0;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Deterministic pseudo-random value in [-1, 1) for element i of tensor `seed` (a hash, so tensors
// fill in parallel).
inline float rnd(uint64_t seed, uint64_t i) {
  uint64_t z = (seed << 40) ^ (i + 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

// count elements of dtype t (float32, bfloat16, float16): offset + scale * U[-1, 1).
inline void fill(void* p, ne::DType t, int64_t count, uint64_t seed, float scale = 1.0f, float offset = 0.0f) {
  ne::parallel_for(count, 1 << 16, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const float v = offset + scale * rnd(seed, static_cast<uint64_t>(i));
      if (t == ne::DType::F32) static_cast<float*>(p)[i] = v;
      else if (t == ne::DType::BF16) static_cast<uint16_t*>(p)[i] = ne::f32_to_bf16(v);
      else static_cast<uint16_t*>(p)[i] = ne::f32_to_f16(v);
    }
  });
}

inline void fill(std::vector<float>& v, uint64_t seed, float scale = 1.0f, float offset = 0.0f) {
  fill(v.data(), ne::DType::F32, static_cast<int64_t>(v.size()), seed, scale, offset);
}

// The copy-bandwidth reference: memcpy in chunks on the engine's pool (read + write traffic 2 x bytes).
inline void parallel_memcpy(char* dst, const char* src, int64_t bytes) {
  ne::parallel_for(bytes, int64_t(1) << 16, [&](int64_t b, int64_t e, int) {
    std::memcpy(dst + b, src + b, static_cast<size_t>(e - b));
  });
}

// Read-only streaming: sum the buffer as 64-bit integers (vectorizes without -ffast-math).
inline volatile uint64_t g_isink;
inline void parallel_read(const char* src, int64_t bytes) {
  std::vector<uint64_t> part(256 * 8, 0);
  ne::parallel_for(bytes / 64, 1 << 10, [&](int64_t b, int64_t e, int tid) {
    const uint64_t* p = reinterpret_cast<const uint64_t*>(src) + b * 8;
    uint64_t s = 0;
    for (int64_t i = 0; i < (e - b) * 8; ++i) s += p[i];
    part[tid * 8] += s;
  });
  g_isink = part[0];
}

// Evict the caches by reading all of `scratch` (a read, so no dirty lines are written back during
// the next timing): the next timed run starts with its data in DRAM.
inline volatile float g_sink;
inline void flush_caches(const Buffer& scratch) {
  std::vector<float> part(256, 0.0f);
  const int64_t lines = static_cast<int64_t>(scratch.bytes / 64);
  ne::parallel_for(lines, 4096, [&](int64_t b, int64_t e, int tid) {
    float s = 0;
    for (int64_t i = b; i < e; ++i) s += reinterpret_cast<const float*>(scratch.p)[i * 16];
    part[tid] += s;
  });
  g_sink = part[0];
}

// The value after argv[i] as an integer (i advanced past it); exits with a message when missing.
inline int64_t arg_int(int argc, char** argv, int& i) {
  if (i + 1 >= argc) { std::fprintf(stderr, "%s needs a value\n", argv[i]); std::exit(2); }
  return std::atoll(argv[++i]);
}

}  // namespace bench
