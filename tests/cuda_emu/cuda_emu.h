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
//     that is running (one block at a time). Dynamic shared memory: the build rewrites
//     `extern __shared__ T name[];` into `T* name = ne_emu::dynamic_shared<T>();`, a per-launch buffer
//     of the launch's smem bytes, 0xff-filled at every block start (more than 48 KiB only after
//     cudaFuncSetAttribute(MaxDynamicSharedMemorySize), as on the GPU). Only it has 32-bit shared-window
//     addresses (__cvta_generic_to_shared), which the PTX stand-ins below bounds-check.
//   * PTX stand-ins (called from a kernel file's asm wrappers under -DNE_CUDA_EMU): cp.async 16 bytes
//     with zero fill (landing at the cp.async, or deferred to the wait_group that retires its group:
//     Device::cp_async), commit / wait_group per thread; ldmatrix.x4 and mma.sync m16n8k32 (s8 and
//     e4m3, and m16n8k16 bf16, PTX ISA fragment layouts) as warp-collective lockstep exchanges of full warps. __dp4a;
//     E4M3 conversions in shim/cuda_fp8.h (round to nearest even, satfinite; decode exact).
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
// (cudaOccupancy* answers a fixed model, Device below), streams and events (everything is
// synchronous: an event is complete once recorded, a copy done on return; "device" memory is host
// memory), out-of-bounds checks (the tests use guard regions), shared memory
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
#include <limits>
#include <map>
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
#define __align__(n) __attribute__((aligned(n)))
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
struct __half2 {
  __half x, y;
};
struct __half2_raw {
  unsigned short x, y;
};
struct __half_raw {
  unsigned short x;
};
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }

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
inline float __fmul_rn(float a, float b) { return a * b; }  // never contracted into an fma (as on the GPU)
inline float __fadd_rn(float a, float b) { return a + b; }
// Four signed byte products summed into c (int32 wraparound, as the GPU's dp4a).
inline int __dp4a(int a, int b, int c) {
  uint32_t acc = static_cast<uint32_t>(c);
  for (int i = 0; i < 4; ++i)
    acc += static_cast<uint32_t>(static_cast<int>(static_cast<int8_t>(static_cast<uint32_t>(a) >> (8 * i))) *
                                 static_cast<int>(static_cast<int8_t>(static_cast<uint32_t>(b) >> (8 * i))));
  return static_cast<int>(acc);
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return c;
}
// CUDA's integer min / max overloads (device code calls them unqualified).
#define NE_EMU_MINMAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }         \
  inline T max(T a, T b) { return a < b ? b : a; }
NE_EMU_MINMAX(int)
NE_EMU_MINMAX(unsigned)
NE_EMU_MINMAX(long)
NE_EMU_MINMAX(unsigned long)
NE_EMU_MINMAX(long long)
NE_EMU_MINMAX(unsigned long long)
#undef NE_EMU_MINMAX
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
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
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
  int cc_major = 9, cc_minor = 0;  // compute capability cudaDeviceGetAttribute reports (sm_90)
  // cudaDevAttrMaxSharedMemoryPerBlockOptin (sm_90: 227 KiB); lower it to drive code down the paths
  // for shared memory too small (it also caps cudaFuncSetAttribute(MaxDynamicSharedMemorySize)).
  int smem_optin = 232448;
  // cp.async: kImmediate copies at the cp.async itself (a read of the stage before cp.async.wait_group
  // sees the data: exposes write-after-read hazards, a copy into a stage others still read); kDeferred
  // copies at the wait_group that retires its group (exposes read-after-write hazards, a stage read
  // before its copies were waited for: the reader sees the stale or 0xff-filled contents).
  enum CpAsync { kImmediate = 0, kDeferred = 1 };
  int cp_async = kImmediate;
  std::map<const void*, size_t> max_dynamic_smem;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
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
struct PendingCopy {  // a cp.async not yet performed (Device::kDeferred)
  void* dst;
  const void* src;
  int bytes, fill;  // bytes copied, then zeros up to fill
};
struct Fiber {
  std::vector<PendingCopy> copies;  // issued cp.async copies, oldest first
  std::vector<size_t> groups;       // end index (into copies) of each committed group, oldest first
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
  std::vector<unsigned char> warp_big;  // [warps][32][kBigSlot] slots of the warp-collective ops (ldmatrix, mma)
  unsigned char* dyn = nullptr;         // dynamic shared memory (extern __shared__), 0xff-filled per block
  size_t dyn_bytes = 0;
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

inline void perform(const PendingCopy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, static_cast<size_t>(c.fill - c.bytes));
}

[[noreturn]] inline void fiber_main() {
  Block* b = g_blk;
  b->body();
  for (const PendingCopy& c : b->cur->copies) perform(c);  // outstanding copies still land
  b->cur->copies.clear();
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
  b.warp_big.assign(32 * static_cast<size_t>(warps) * 64, 0);
  if (b.dyn) std::memset(b.dyn, 0xff, b.dyn_bytes);  // NaN / -1 until written
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = uint3{i % b.block.x, (i / b.block.x) % b.block.y, i / (b.block.x * b.block.y)};
    f.lane = i % 32;
    f.warp = i / 32;
    f.done = false;
    f.wait_on = nullptr;
    f.copies.clear();
    f.groups.clear();
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
  // more than 48 KiB of dynamic shared memory only after cudaFuncSetAttribute raised the kernel's limit
  const auto lim = d.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t smem_max = lim == d.max_dynamic_smem.end() ? 48 * 1024 : lim->second;
  if (!config_ok(L.grid, L.block) || L.smem > smem_max) {
    d.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  detail::Block b;
  b.grid = L.grid;
  b.block = L.block;
  std::vector<unsigned char> dyn_storage(L.smem + 1024);
  if (L.smem) {  // 1024-byte aligned, as the GPU's shared window
    b.dyn = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dyn_storage.data()) + 1023) & ~uintptr_t(1023));
    b.dyn_bytes = L.smem;
  }
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

inline void __trap() { ::ne_emu::detail::fault("__trap()"); }

// ============================================================================ shared addresses, cp.async, ldmatrix, mma
// Only dynamic shared memory (extern __shared__, which the build rewrites to ne_emu::dynamic_shared<T>())
// has 32-bit shared-window addresses here: kSharedBase + byte offset into the block's buffer. Every
// access through such an address is bounds checked (a fault names it).
namespace ne_emu {
constexpr uint32_t kSharedBase = 0x400;  // nonzero, as code must not assume the window starts at 0
template <class T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::g_blk->dyn);
}
namespace detail {
inline uint32_t to_shared(const void* p) {
  Block* b = g_blk;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (!b->dyn || c < b->dyn || c > b->dyn + b->dyn_bytes)
    fault("__cvta_generic_to_shared: not an address in dynamic shared memory (static __shared__ arrays have no "
          "shared-window address in the emulator)");
  return kSharedBase + static_cast<uint32_t>(c - b->dyn);
}
inline unsigned char* from_shared(uint32_t addr, size_t bytes, const char* what) {
  Block* b = g_blk;
  if (addr < kSharedBase || addr - kSharedBase + bytes > b->dyn_bytes) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s: shared address 0x%x (+%zu bytes) outside the %zu bytes of dynamic shared memory",
                  what, addr, bytes, b->dyn_bytes);
    fault(msg);
  }
  return b->dyn + (addr - kSharedBase);
}
// A .sync.aligned warp-collective op: every lane of a full warp deposits v; each gets all 32 values.
// (The caller's own work after it needs no second barrier: release() ends the exchange.)
template <class T>
inline void gather(const T& v, T (&all)[32], const char* what) {
  static_assert(sizeof(T) <= 64 && std::is_trivially_copyable<T>::value, "collective slots hold 64 bytes");
  Block* b = g_blk;
  Fiber* f = b->cur;
  if (lanes_of(*b, f->warp) != 32) fault(std::string(what) + ": a .sync.aligned op in a partial warp");
  unsigned char* buf = &b->warp_big[static_cast<size_t>(f->warp) * 32 * 64];
  std::memcpy(buf + 64 * f->lane, &v, sizeof(T));
  arrive(b->warp_bar[f->warp]);
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], buf + 64 * l, sizeof(T));
  arrive(b->warp_bar[f->warp]);  // nobody overwrites the slots before every lane has read them
}
}  // namespace detail

// cp.async.cg.shared.global [dst], [src], 16, bytes: 16 bytes, those past `bytes` zero (src unread when 0).
inline void cp_async16(uint32_t dst, const void* src, int bytes) {
  using namespace detail;
  if (bytes < 0 || bytes > 16) fault("cp.async: src-size outside 0..16");
  if ((dst & 15u) || (reinterpret_cast<uintptr_t>(src) & 15u)) fault("cp.async (16 bytes): misaligned address");
  PendingCopy c{from_shared(dst, 16, "cp.async"), src, bytes, 16};
  if (device().cp_async == Device::kImmediate) perform(c);
  else g_blk->cur->copies.push_back(c);
}
inline void cp_async_commit() {
  detail::Fiber* f = detail::g_blk->cur;
  f->groups.push_back(f->copies.size());
}
// cp.async.wait_group n: every committed group but the newest n has landed (for this thread).
inline void cp_async_wait(int n) {
  detail::Fiber* f = detail::g_blk->cur;
  const size_t G = f->groups.size();
  if (G <= static_cast<size_t>(n)) return;
  const size_t done_groups = G - static_cast<size_t>(n), end = f->groups[done_groups - 1];
  for (size_t i = 0; i < end; ++i) detail::perform(f->copies[i]);
  f->copies.erase(f->copies.begin(), f->copies.begin() + static_cast<std::ptrdiff_t>(end));
  f->groups.erase(f->groups.begin(), f->groups.begin() + static_cast<std::ptrdiff_t>(done_groups));
  for (size_t& e : f->groups) e -= end;
}
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane 8i + j gives the (16-byte aligned) address of row j of
// matrix i; lane l receives in r[i] the 4 bytes at 4 (l & 3) of row l >> 2 of matrix i.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  using namespace detail;
  if (addr & 15u) fault("ldmatrix: row address not 16-byte aligned");
  from_shared(addr, 16, "ldmatrix");
  uint32_t all[32];
  gather(addr, all, "ldmatrix");
  const unsigned lane = g_blk->cur->lane;
  for (int i = 0; i < 4; ++i) std::memcpy(&r[i], from_shared(all[8 * i + (lane >> 2)] + 4 * (lane & 3), 4, "ldmatrix"), 4);
}
namespace detail {
struct MmaFrag {
  uint32_t a[4], b[2];
};
// The 16 x 32 A and 32 x 8 B (as B[col][k]) bytes of an m16n8k32 from the lanes' fragments (PTX ISA
// layouts, g = lane >> 2, t = lane & 3): a[0] row g, k 4t..4t+3; a[1] row g+8; a[2] row g, k 16+4t..;
// a[3] row g+8, k 16+4t..; b[0] column g, k 4t..4t+3; b[1] column g, k 16+4t..
inline void mma_operands(const uint32_t (&a)[4], const uint32_t (&b)[2], uint8_t (&A)[16][32], uint8_t (&B)[8][32]) {
  MmaFrag all[32];
  gather(MmaFrag{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all, "mma.sync");
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 4; ++j) {
      A[g][4 * t + j] = static_cast<uint8_t>(all[l].a[0] >> (8 * j));
      A[g + 8][4 * t + j] = static_cast<uint8_t>(all[l].a[1] >> (8 * j));
      A[g][16 + 4 * t + j] = static_cast<uint8_t>(all[l].a[2] >> (8 * j));
      A[g + 8][16 + 4 * t + j] = static_cast<uint8_t>(all[l].a[3] >> (8 * j));
      B[g][4 * t + j] = static_cast<uint8_t>(all[l].b[0] >> (8 * j));
      B[g][16 + 4 * t + j] = static_cast<uint8_t>(all[l].b[1] >> (8 * j));
    }
  }
}
}  // namespace detail
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32: c (row g: columns 2t, 2t+1; row g+8: the same) += A B.
inline void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint8_t A[16][32], B[8][32];
  detail::mma_operands(a, b, A, B);
  const unsigned lane = detail::g_blk->cur->lane, g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    uint32_t acc = static_cast<uint32_t>(c[e]);  // int32 wraparound
    for (int k = 0; k < 32; ++k)
      acc += static_cast<uint32_t>(static_cast<int>(static_cast<int8_t>(A[row][k])) *
                                   static_cast<int>(static_cast<int8_t>(B[col][k])));
    c[e] = static_cast<int>(acc);
  }
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: A 16 x 16 and B 16 x 8 bfloat16 in the bytes of the
// m16n8k32 fragments (element k = bytes 2k, 2k + 1, little endian); the products are exact in fp32 and
// are added to c one after another in k order, each sum rounded to fp32 (the GPU's order and internal
// precision are unspecified: results may differ from it in the last bits of a 16-term fp32 sum).
inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint8_t A[16][32], B[8][32];
  detail::mma_operands(a, b, A, B);
  auto value = [](const uint8_t* p) {
    const uint32_t bits = (static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  const unsigned lane = detail::g_blk->cur->lane, g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += value(&A[row][2 * k]) * value(&B[col][2 * k]);
    c[e] = acc;
  }
}
inline float e4m3_value(uint8_t v);
// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32: the products are exact in fp32; they are added to
// c one after another in k order, each sum rounded to fp32 (the GPU's order and internal precision are
// unspecified: results may differ from it in the last bits of a 32-term fp32 sum).
inline void mma_e4m3(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint8_t A[16][32], B[8][32];
  detail::mma_operands(a, b, A, B);
  const unsigned lane = detail::g_blk->cur->lane, g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 32; ++k) acc += e4m3_value(A[row][k]) * e4m3_value(B[col][k]);
    c[e] = acc;
  }
}
// E4M3 (fn) bits -> value (exact in float): exponent bias 7, subnormals 2^-9 steps, 0x7f / 0xff NaN.
inline float e4m3_value(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(static_cast<float>(8 + m), e - 10);
  return (v & 0x80) ? -mag : mag;
}
// float -> E4M3 (fn) bits, round to nearest even; sat: |v| beyond 448 (and +-Inf) -> +-448, else NaN.
// NaN -> 0x7f. (cuda_fp8.hpp's __nv_cvt_float_to_fp8 with __NV_E4M3.)
inline uint8_t e4m3_bits(float v, bool sat) {
  if (std::isnan(v)) return 0x7f;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const double a = std::fabs(static_cast<double>(v));
  unsigned code;
  if (a < std::ldexp(1.0, -6)) {
    code = static_cast<unsigned>(std::nearbyint(a * 512.0));  // subnormal steps of 2^-9 (8 -> the smallest normal)
  } else if (std::isinf(a)) {
    code = 0x7f;
  } else {
    int ex;
    std::frexp(a, &ex);  // a in [2^(ex-1), 2^ex)
    const int e = ex - 1;
    const double q = std::nearbyint(std::ldexp(a, 3 - e));  // 8 .. 16 (16: carries into the next binade)
    code = e > 8 ? 0x7f : static_cast<unsigned>((e + 7) * 8) + static_cast<unsigned>(q) - 8u;
  }
  if (code > 0x7e) code = sat ? 0x7e : 0x7f;
  return static_cast<uint8_t>(sign | code);
}
}  // namespace ne_emu
template <class T>
inline size_t __cvta_generic_to_shared(const T* p) {
  return ::ne_emu::detail::to_shared(static_cast<const void*>(p));
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
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = ne_emu::device().smem_optin; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = ne_emu::device().cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = ne_emu::device().cc_minor; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > ne_emu::device().smem_optin)
    return cudaErrorInvalidValue;
  ne_emu::device().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
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
// Devices, host memory, copies and events (cuda/runner.cu). One device (ordinal 0); everything is
// synchronous, so an event is complete as soon as it is recorded and a copy has landed on return.
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k, cudaStream_t = nullptr) {
  if (static_cast<int>(k) < 0 || static_cast<int>(k) > 4) return cudaErrorInvalidValue;
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind k) {
  return cudaMemcpyAsync(dst, src, bytes, k);
}
inline cudaError_t cudaMallocHost(void** p, size_t bytes) { return cudaMalloc(p, bytes); }  // 0xff-filled too
inline cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }
typedef struct CUevent_st* cudaEvent_t;
constexpr unsigned cudaEventDefault = 0, cudaEventBlockingSync = 1, cudaEventDisableTiming = 2;
namespace ne_emu {
struct EventState {
  int recorded = 0;  // how many times recorded: the tests may check that it was
};
}  // namespace ne_emu
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = reinterpret_cast<cudaEvent_t>(new ne_emu::EventState);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  if (!e) return cudaErrorInvalidValue;
  ++reinterpret_cast<ne_emu::EventState*>(e)->recorded;
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { return e ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<ne_emu::EventState*>(e);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
