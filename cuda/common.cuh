// Shared helpers of the CUDA kernel files: error checking that becomes ne::Error, dtype traits.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "normengine/errors.h"

namespace ne {
namespace cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
// After a launch: configuration errors surface here (asynchronous faults surface at the next sync).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Element type <-> float, and the accumulator type (double for double, float otherwise).
template <class T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <> struct Elem<double> {
  using acc = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
template <> struct Elem<__half> {
  using acc = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using acc = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <class T> using acc_t = typename Elem<T>::acc;

// ---------------------------------------------------------------- 16-byte vector access
// Elements per 16-byte access of T (8 for f16/bf16, 4 for f32, 2 for f64).
template <class T> constexpr int kVec = static_cast<int>(16 / sizeof(T));
// N elements of E that travel as one 16-byte load or store.
template <class E, int N> struct alignas(16) Pack { E e[N]; };

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Elements c0 .. c0+V-1 of a row of n, converted to the accumulator type; those >= n read as 0.
// With V == kVec<T> a full vector is one 16-byte load: p must then be 16-byte aligned and c0 a
// multiple of V. V == 1 is the plain scalar path for unaligned memory.
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* p, int64_t c0, int64_t n, acc_t<T> (&out)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    if (c0 + V <= n) {
      const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p + c0);
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = Elem<T>::load(pk.e[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = c0 + i < n ? Elem<T>::load(p[c0 + i]) : acc_t<T>(0);
}

// Store elements c0 .. c0+V-1 (those < n), rounded to T to nearest even. Same alignment rule.
template <class T, int V>
__device__ __forceinline__ void store_vec(T* p, int64_t c0, int64_t n, const acc_t<T> (&v)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    if (c0 + V <= n) {
      Pack<T, V> pk;
#pragma unroll
      for (int i = 0; i < V; ++i) pk.e[i] = Elem<T>::store(v[i]);
      *reinterpret_cast<Pack<T, V>*>(p + c0) = pk;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (c0 + i < n) p[c0 + i] = Elem<T>::store(v[i]);
}

// Raw elements c0 .. c0+V-1 (V * sizeof(T) == 16) as stored, without conversion: the compact way
// to keep a row in registers (4 registers per 8 bf16). Elements >= n read as 0.
template <class T, int V>
__device__ __forceinline__ void load_pack(const T* p, int64_t c0, int64_t n, Pack<T, V>& out) {
  static_assert(V * sizeof(T) == 16, "a Pack is one 16-byte vector");
  if (c0 + V <= n) {
    out = *reinterpret_cast<const Pack<T, V>*>(p + c0);
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out.e[i] = c0 + i < n ? p[c0 + i] : Elem<T>::store(acc_t<T>(0));
}
template <class T, int V>
__device__ __forceinline__ void store_pack(T* p, int64_t c0, int64_t n, const Pack<T, V>& v) {
  static_assert(V * sizeof(T) == 16, "a Pack is one 16-byte vector");
  if (c0 + V <= n) {
    *reinterpret_cast<Pack<T, V>*>(p + c0) = v;
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (c0 + i < n) p[c0 + i] = v.e[i];
}

// V accumulators (float or double: per-channel vectors) at c0 .. c0+V-1; those >= n read as 0.
// Full vectors travel as 16-byte loads when V * sizeof(A) is a multiple of 16 (p 16-byte aligned).
template <class A, int V>
__device__ __forceinline__ void load_acc(const A* p, int64_t c0, int64_t n, A (&out)[V]) {
  constexpr int P = static_cast<int>(16 / sizeof(A));
  if constexpr (V % P == 0) {
    if (c0 + V <= n) {
#pragma unroll
      for (int k = 0; k < V / P; ++k) {
        const Pack<A, P> pk = *reinterpret_cast<const Pack<A, P>*>(p + c0 + k * P);
#pragma unroll
        for (int i = 0; i < P; ++i) out[k * P + i] = pk.e[i];
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = c0 + i < n ? p[c0 + i] : A(0);
}

__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------- launch helpers
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device (cached per device ordinal).
inline int sm_count() {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev >= 0 && dev < 64) {
    if (int c = cache[dev].load(std::memory_order_relaxed)) return c;
  }
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  if (n < 1) n = 1;
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// How many blocks of `threads` threads of `kernel` fit on all SMs at once (at least 1).
template <class Kernel>
int64_t resident_blocks(Kernel kernel, int threads) {
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return static_cast<int64_t>(per_sm < 1 ? 1 : per_sm) * sm_count();
}

// Stream-ordered scratch: cudaMallocAsync on the stream, cudaFreeAsync on it when the owner goes out
// of scope (after the kernels using it were enqueued), also when an exception unwinds.
class StreamScratch {
 public:
  StreamScratch() = default;
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  ~StreamScratch() {
    if (p_) cudaFreeAsync(p_, s_);
  }
  void* alloc(size_t bytes, cudaStream_t s) {
    s_ = s;
    check(cudaMallocAsync(&p_, bytes, s), "cudaMallocAsync (norm scratch)");
    return p_;
  }

 private:
  void* p_ = nullptr;
  cudaStream_t s_ = nullptr;
};

}  // namespace cuda
}  // namespace ne
