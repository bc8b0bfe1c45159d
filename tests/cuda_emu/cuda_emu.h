// cuda_emu.h: a small CUDA-on-CPU emulation layer, so that CUDA kernel files compile with g++ as
// ordinary C++ and their launches RUN on the host (CI has no GPU). Used by tests/cuda_emu/norm_emu.cpp.
//
// How a launch runs.
//   * Blocks run one after another (blockIdx in x, then y, then z order), all on the calling OS thread.
//   * Every thread of a block is a fiber with its own stack (a guard page below each, so an overflow
//     faults instead of corrupting). Fibers switch with a 20-instruction x86-64 routine below (the
//     callee-saved registers, the stack pointer, MXCSR and the x87 control word: what a function
//     call must preserve), or ucontext's swapcontext elsewhere or with -DNE_EMU_UCONTEXT (~50x
//     slower: a system call per switch). A scheduler resumes the block's fibers in one of three
//     orders (Device::order): round-robin in thread order, round-robin in reverse, or "eager"
//     (always the lowest-numbered runnable thread: warp 0 runs as far ahead of the others as the
//     barriers allow). A fiber runs until it blocks on a barrier or returns; nothing preempts it.
//   * threadIdx is the running fiber's own value; blockIdx / blockDim / gridDim are the launch's.
//   * __syncthreads(): a barrier of all the block's threads. __syncwarp() and the warp shuffles:
//     barriers of the 32 lanes of the warp (warp w = linear thread ids 32w .. 32w+31, linear id
//     x + y*Bx + z*Bx*By, as on the GPU). A shuffle is lockstep: every lane writes its value to a
//     per-warp buffer, barrier, every lane reads its source lane, barrier.
//   * __shared__ is `static`: one copy per kernel instantiation, shared by the fibers of the block
//     that is running (one block at a time). Dynamic shared memory (`extern __shared__`) is NOT
//     supported (`extern static` does not compile); no kernel using it is emulated yet.
//   * Launch configuration is checked as the GPU does (block <= 1024 threads, grid.y/z <= 65535...);
//     a bad one is not run and sets the sticky error cudaGetLastError() returns.
//
// Faults it reports (as ne_emu::KernelFault thrown from the launch, on the host side):
//   * a barrier that not all threads reach (divergent __syncthreads, or threads that returned early
//     while others wait at one) -- a deadlock on the GPU or undefined behaviour;
//   * warp intrinsics whose mask does not name exactly the lanes of the warp (partial-warp masks are
//     not emulated) or whose source lane does not exist.
//
// What it does NOT emulate: the memory model (a data race shows up only through the schedule: run
// all three orders to shake out reads of values another thread writes without a barrier between,
// e.g. a shared buffer reused without the barrier that ends its readers' phase), timing, occupancy
// (cudaOccupancy* answers a fixed model, Device below), streams (everything is synchronous; "device"
// memory is host memory), out-of-bounds checks (the tests use guard regions), shared memory
// contents between blocks (a static: it keeps the previous block's values instead of being
// undefined), and the register / local memory limits.
//
// Arithmetic. fp32/fp64 +, -, *, /, sqrt, fmaf/fma are IEEE-754 round-to-nearest on both sides, so
// they agree bit for bit with the GPU, EXCEPT that nvcc contracts a*b+c into one fma by default
// (-fmad=true) where the host build (-ffp-contract=off) rounds twice: results may differ by an ulp
// or so per contracted operation. The GPU's approximate intrinsics are given their exact host
// counterparts: rsqrtf (GPU: <= 2 ulp), __fdividef (GPU: <= 2 ulp, and 0 for |b| > 2^126),
// __expf/__logf (GPU: a few ulp); tests of kernels using them must allow for that. bf16/f16
// conversions round to nearest even as cuda_bf16.h / cuda_fp16.h do (a NaN becomes the canonical
// 0x7fff for bf16; f16 NaN payloads may differ).
//
// Launch syntax. C++ has no `kernel<<<grid, block, smem, stream>>>(args)`; the build rewrites each
// `<<<CFG>>>` of a .cu file into ` << ::ne_emu::launch_config(CFG)` (see tests/test_norm_cuda_emu.py,
// emu_source()), i.e. `kernel << launch_config(grid, block, smem, stream)(args)`, which the
// operator<< below runs.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ============================================================================ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__
// __restrict__ is a g++ keyword already.

// ============================================================================ vector types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
#define NE_EMU_VEC2(T, N, AL)                                         \
  struct alignas(AL) N##2 {                                           \
    T x, y;                                                           \
  };                                                                  \
  inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define NE_EMU_VEC4(T, N, AL)                                         \
  struct alignas(AL) N##4 {                                           \
    T x, y, z, w;                                                     \
  };                                                                  \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
NE_EMU_VEC2(float, float, 8)
NE_EMU_VEC4(float, float, 16)
NE_EMU_VEC2(int, int, 8)
NE_EMU_VEC4(int, int, 16)
NE_EMU_VEC2(unsigned, uint, 8)
NE_EMU_VEC4(unsigned, uint, 16)
NE_EMU_VEC2(double, double, 16)
#undef NE_EMU_VEC2
#undef NE_EMU_VEC4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
constexpr int warpSize = 32;

// ============================================================================ 16-bit floats
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.__x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {  // round to nearest even (the conversion _Float16 does)
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.__x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {  // round to nearest even; NaN -> 0x7fff (as CUDA)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if (std::isnan(v)) {
    b.__x = 0x7fff;
  } else {
    b.__x = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }

// ============================================================================ math intrinsics
// fmaf, fma, sqrtf, sqrt, expf ... come from <cmath> (IEEE, as on the GPU).
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline long long __double_as_longlong(double d) {
  long long l;
  std::memcpy(&l, &d, 8);
  return l;
}
inline double __longlong_as_double(long long l) {
  double d;
  std::memcpy(&d, &l, 8);
  return d;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// Approximate on the GPU (see the header comment); exact here.
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : (a == a ? a : 0.f)); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// ============================================================================ runtime API
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace ne_emu {

// The emulated device. sm_count is read once by code that caches it (cuda/common.cuh's
// sm_count()): set it before the first launch.
struct Device {
  int sm_count = 4;
  int blocks_per_sm = 0;  // cudaOccupancyMaxActiveBlocksPerMultiprocessor; 0: min(32, 2048 / threads)
  enum Order { kForward = 0, kReverse = 1, kEager = 2 };
  int order = kForward;   // the schedule of a block's fibers (see the header comment)
  size_t stack_bytes = 256u << 10;
  cudaError_t last_error = cudaSuccess;
  struct Launch {
    const void* kernel;
    dim3 grid, block;
  };
  std::vector<Launch> log;  // every launch since the last clear
};
inline Device& device() {
  static Device d;
  return d;
}

struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

// ---------------------------------------------------------------------------- context switch
#if defined(__x86_64__) && !defined(NE_EMU_UCONTEXT)
struct Context {
  void* sp = nullptr;  // the saved stack pointer; the registers are saved on the stack below it
};
// Save the callee-saved state on the current stack, store the stack pointer to *save, load load's
// stack pointer and restore the state saved there. The return address on that stack is where the
// other fiber resumes (a fresh fiber: its entry function, see make()).
__attribute__((naked, noinline)) static void switch_stack(void** /*save: rdi*/, void* /*load: rsi*/) {
  asm volatile(
      "pushq %rbp\n pushq %rbx\n pushq %r12\n pushq %r13\n pushq %r14\n pushq %r15\n"
      "subq $8, %rsp\n stmxcsr (%rsp)\n fnstcw 4(%rsp)\n"
      "movq %rsp, (%rdi)\n movq %rsi, %rsp\n"
      "ldmxcsr (%rsp)\n fldcw 4(%rsp)\n addq $8, %rsp\n"
      "popq %r15\n popq %r14\n popq %r13\n popq %r12\n popq %rbx\n popq %rbp\n ret\n");
}
inline void swap(Context& from, Context& to) { switch_stack(&from.sp, to.sp); }
// A fresh context whose first switch "returns" into entry (which must never return).
inline void make(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  *--top = 0;                                       // entry's (never used) return address: rsp = 8 mod 16
  *--top = reinterpret_cast<uint64_t>(entry);       // popped by switch_stack's ret
  for (int r = 0; r < 6; ++r) *--top = 0;           // rbp rbx r12 r13 r14 r15
  *--top = 0x1f80u | (uint64_t(0x037fu) << 32);     // default MXCSR, x87 control word
  c.sp = top;
}
#else
struct Context {
  ucontext_t uc;
};
inline void swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;  // entry never returns
  makecontext(&c.uc, entry, 0);
}
#endif

struct Barrier {
  unsigned gen = 0, arrived = 0, expected = 0;
};
struct Fiber {
  Context ctx;
  uint3 tid;
  unsigned lane, warp;
  bool done;
  const unsigned* wait_on;  // blocked while *wait_on == wait_gen
  unsigned wait_gen;
};
struct Block {  // the block being run (one at a time per OS thread)
  dim3 grid, block;
  uint3 idx;
  std::vector<Fiber> fibers;
  Barrier bar;
  std::vector<Barrier> warp_bar;
  std::vector<uint64_t> warp_buf;  // [warps][32] shuffle slots
  Context sched;
  Fiber* cur = nullptr;
  std::function<void()> body;  // the kernel applied to its arguments
  std::string fault;
};
inline thread_local Block* g_blk = nullptr;

// Stacks of stack_bytes each, with a PROT_NONE guard page below; reused across blocks and launches.
inline char* stack(size_t i, size_t bytes) {
  static thread_local std::vector<char*> pool;
  static thread_local size_t pool_bytes = 0;
  if (pool_bytes != bytes) {
    for (char* s : pool) munmap(s - 4096, pool_bytes + 4096);
    pool.clear();
    pool_bytes = bytes;
  }
  while (pool.size() <= i) {
    void* m = mmap(nullptr, bytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    mprotect(m, 4096, PROT_NONE);
    pool.push_back(static_cast<char*>(m) + 4096);
  }
  return pool[i];
}

// Called from a fiber: record the fault and never come back (the launch throws it).
[[noreturn]] inline void fault(const std::string& what) {
  Block* b = g_blk;
  if (b->fault.empty()) b->fault = what;
  for (;;) swap(b->cur->ctx, b->sched);
}

// Called from a fiber: arrive at `bar`; the last arrival releases it, the others block until then.
inline void arrive(Barrier& bar) {
  Block* b = g_blk;
  if (++bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.gen;
    return;
  }
  Fiber* f = b->cur;
  f->wait_on = &bar.gen;
  f->wait_gen = bar.gen;
  swap(f->ctx, b->sched);
}

[[noreturn]] inline void fiber_main() {
  Block* b = g_blk;
  b->body();
  b->cur->done = true;
  for (;;) swap(b->cur->ctx, b->sched);  // never resumed
}

inline unsigned lanes_of(const Block& b, unsigned warp) {
  const unsigned n = b.block.x * b.block.y * b.block.z;
  return n - 32 * warp < 32 ? n - 32 * warp : 32;
}
inline unsigned lane_mask(const Block& b, unsigned warp) {
  const unsigned l = lanes_of(b, warp);
  return l == 32 ? 0xffffffffu : ((1u << l) - 1u);
}
inline void check_mask(unsigned mask, const char* what) {
  Block* b = g_blk;
  const unsigned want = lane_mask(*b, b->cur->warp);
  if (mask != want) {
    char msg[200];
    std::snprintf(msg, sizeof msg, "%s: mask 0x%08x does not name exactly the %u lanes of warp %u (0x%08x)", what,
                  mask, lanes_of(*b, b->cur->warp), b->cur->warp, want);
    fault(msg);
  }
}

// Lockstep exchange among the lanes of the warp: each lane gets the value lane src(lane) holds.
template <class T, class Src>
inline T exchange(unsigned mask, T v, Src src, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move values of up to 8 bytes");
  check_mask(mask, what);
  Block* b = g_blk;
  Fiber* f = b->cur;
  const unsigned lane = f->lane, warp = f->warp;
  uint64_t* buf = &b->warp_buf[32 * static_cast<size_t>(warp)];
  std::memcpy(&buf[lane], &v, sizeof(T));
  arrive(b->warp_bar[warp]);
  const unsigned s = src(lane);
  if (s >= lanes_of(*b, warp)) fault(std::string(what) + ": source lane does not exist");
  T out;
  std::memcpy(&out, &buf[s], sizeof(T));
  arrive(b->warp_bar[warp]);  // nobody overwrites the buffer before every lane has read it
  return out;
}

inline void run_block(Block& b) {
  const unsigned n = b.block.x * b.block.y * b.block.z, warps = (n + 31) / 32;
  const size_t stack_bytes = device().stack_bytes;
  b.fibers.resize(n);
  b.bar = Barrier{0, 0, n};
  b.warp_bar.assign(warps, Barrier{});
  for (unsigned w = 0; w < warps; ++w) b.warp_bar[w].expected = lanes_of(b, w);
  b.warp_buf.assign(32 * static_cast<size_t>(warps), 0);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = uint3{i % b.block.x, (i / b.block.x) % b.block.y, i / (b.block.x * b.block.y)};
    f.lane = i % 32;
    f.warp = i / 32;
    f.done = false;
    f.wait_on = nullptr;
    make(f.ctx, stack(i, stack_bytes), stack_bytes, fiber_main);
  }
  const int order = device().order;
  for (;;) {
    unsigned live = 0;
    bool ran = false;
    for (unsigned k = 0; k < n; ++k) {
      Fiber& f = b.fibers[order == Device::kReverse ? n - 1 - k : k];
      if (f.done) continue;
      if (f.wait_on && *f.wait_on == f.wait_gen) {  // still blocked
        ++live;
        continue;
      }
      f.wait_on = nullptr;
      b.cur = &f;
      swap(b.sched, f.ctx);
      ran = true;
      if (!b.fault.empty()) throw KernelFault("ne_emu: " + b.fault);
      if (!f.done) ++live;
      if (order == Device::kEager) {  // start over from thread 0
        live = 1;
        break;
      }
    }
    if (live == 0) return;
    if (!ran) {
      unsigned at_bar = 0, at_warp = 0, exited = 0;
      for (const Fiber& f : b.fibers) {
        if (f.done) ++exited;
        else if (f.wait_on == &b.bar.gen) ++at_bar;
        else ++at_warp;
      }
      char msg[240];
      std::snprintf(msg, sizeof msg,
                    "ne_emu: deadlock in block (%u,%u,%u): %u threads wait at __syncthreads, %u at a warp barrier "
                    "(shuffle/__syncwarp), %u have returned: a barrier not reached by every thread",
                    b.idx.x, b.idx.y, b.idx.z, at_bar, at_warp, exited);
      throw KernelFault(msg);
    }
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------- launch
struct LaunchConfig;
template <class... A>
struct BoundLaunch {
  dim3 grid, block;
  size_t smem;
  std::tuple<A...> args;
};
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  template <class... A>
  BoundLaunch<std::decay_t<A>...> operator()(A&&... a) const {
    return {grid, block, smem, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
  }
};
inline LaunchConfig launch_config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return LaunchConfig{grid, block, smem};
}

inline bool config_ok(dim3 g, dim3 b) {
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  return g.x >= 1 && g.y >= 1 && g.z >= 1 && g.x <= 0x7fffffffu && g.y <= 65535 && g.z <= 65535 && b.x >= 1 &&
         b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024;
}

// kernel << launch_config(grid, block, smem, stream)(args...): run every block of the grid.
template <class... P, class... A>
void operator<<(void (*kernel)(P...), BoundLaunch<A...>&& L) {
  Device& d = device();
  d.log.push_back(Device::Launch{reinterpret_cast<const void*>(kernel), L.grid, L.block});
  if (!config_ok(L.grid, L.block) || L.smem > 48 * 1024) {
    d.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  detail::Block b;
  b.grid = L.grid;
  b.block = L.block;
  b.body = [&] { std::apply(kernel, L.args); };
  detail::Block* saved = detail::g_blk;
  detail::g_blk = &b;
  try {
    for (unsigned z = 0; z < L.grid.z; ++z)
      for (unsigned y = 0; y < L.grid.y; ++y)
        for (unsigned x = 0; x < L.grid.x; ++x) {
          b.idx = uint3{x, y, z};
          detail::run_block(b);
        }
  } catch (...) {
    detail::g_blk = saved;
    throw;
  }
  detail::g_blk = saved;
}

}  // namespace ne_emu

// ============================================================================ built-in variables
#define threadIdx (::ne_emu::detail::g_blk->cur->tid)
#define blockIdx (::ne_emu::detail::g_blk->idx)
#define blockDim (::ne_emu::detail::g_blk->block)
#define gridDim (::ne_emu::detail::g_blk->grid)

// ============================================================================ synchronization
inline void __syncthreads() { ::ne_emu::detail::arrive(::ne_emu::detail::g_blk->bar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  using namespace ::ne_emu::detail;
  check_mask(mask, "__syncwarp");
  arrive(g_blk->warp_bar[g_blk->cur->warp]);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::ne_emu::detail::exchange(
      mask, v, [&](unsigned lane) { return (lane & ~unsigned(width - 1)) + (unsigned(src) & unsigned(width - 1)); },
      "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  // A lane whose partner lies in a later group of `width` lanes keeps its own value.
  return ::ne_emu::detail::exchange(
      mask, v,
      [&](unsigned lane) {
        const unsigned s = lane ^ unsigned(lane_mask);
        return s >= (lane / width + 1) * width ? lane : s;
      },
      "__shfl_xor_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::ne_emu::detail::exchange(
      mask, v,
      [&](unsigned lane) { return (lane & unsigned(width - 1)) + delta >= unsigned(width) ? lane : lane + delta; },
      "__shfl_down_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::ne_emu::detail::exchange(
      mask, v, [&](unsigned lane) { return (lane & unsigned(width - 1)) < delta ? lane : lane - delta; },
      "__shfl_up_sync");
}

// Atomics: fibers never interleave inside a call, so a plain read-modify-write is atomic here.
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

// ============================================================================ runtime API functions
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ne_emu::device().last_error;
  ne_emu::device().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ne_emu::device().last_error; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = ne_emu::device().sm_count; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 232448; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, Kernel, int threads, size_t) {
  const int b = ne_emu::device().blocks_per_sm;
  *n = b > 0 ? b : std::max(1, std::min(32, 2048 / std::max(threads, 1)));
  return cudaSuccess;
}
// Device memory is host memory. Fresh allocations are filled with 0xff bytes: NaN in every float type,
// so reading scratch that was never written shows up in the results.
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, v, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t bytes) { return cudaMemsetAsync(p, v, bytes); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
