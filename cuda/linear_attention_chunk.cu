// Version 2 of the CUDA linear-attention family: the chunkwise-parallel kernels. The math, the phase
// structure and the shared-memory layout are in linear_attention_chunk.cuh (host+device code, also run
// by the host harness tests/linear_attention_chunk_host.cu); this file holds the kernels and launches.
// Entry: chunk_forward / chunk_backward, called by cuda/linear_attention.cu after its argument checks
// (it keeps the version-1 token-serial kernels for algorithm="recurrent" and as the fallback when no
// chunk plan fits in shared memory).
//
// Launches, per call (kThreads = 256 threads per block, one block = one of the bodies of the .cuh):
//   forward:  states_kernel  grid B*H*ceil((Dv+1)/32)   walks the chunks, writes the state before each
//                                            chunk (32 state columns per block)
//             output_kernel  grid B*H*nc     every chunk's outputs, independently
//   backward: states_kernel  (the same: recomputes the chunk states from q, k, v, init)
//             backward_local_kernel grid B*H*nc   dr, dq, the chunk's term D_c of the state gradient
//             backward_sweep_kernel grid B*H*(Dk+1)(Dv+1) / 256   X_{c-1} = lambda^L X_c + D_c, one
//                                              thread per state element, sequential over the chunks
//             backward_kv_kernel    grid B*H*nc   dk, dv
// Global scratch (stream-ordered, freed after the launches), fp32: states [B*H, nc+1 (causal) or 1,
// Dk+1, Dv+1]; backward also xbuf [B*H, nc, Dk+1, Dv+1] and, causal, drbuf, ebuf [B*H, T, Dv+1].
// Barriers: DeviceExec::phase ends every phase with __syncthreads(); every thread of a block runs the
// same phases (the loops between phases depend on blockIdx and arguments only), see the .cuh.
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"
#include "linear_attention_chunk.cuh"
#include "normengine/errors.h"

namespace ne {
namespace cuda {
namespace la2 {
namespace {

constexpr int kThreads = 256;

// Runs a phase with every thread of the block, then a block barrier.
struct DeviceExec {
  template <class F>
  __host__ __device__ void phase(F&& f) {
#if defined(__CUDA_ARCH__)
    f(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
    __syncthreads();
#endif
  }
};

template <class T>
__global__ void __launch_bounds__(kThreads) states_kernel(ChunkArgs<T> a) {
  extern __shared__ float smem[];
  DeviceExec ex;
  const int nt = state_tiles(a.s);
  states_body<T>(ex, a, static_cast<int64_t>(blockIdx.x) / nt, static_cast<int>(blockIdx.x % nt), smem);
}

template <class T>
__global__ void __launch_bounds__(kThreads) output_kernel(ChunkArgs<T> a) {
  extern __shared__ float smem[];
  DeviceExec ex;
  const int64_t nc = a.s.nc(), blk = static_cast<int64_t>(blockIdx.x);
  output_body<T>(ex, a, blk / nc, blk % nc, smem);
}

template <class T>
__global__ void __launch_bounds__(kThreads) backward_local_kernel(ChunkArgs<T> a) {
  extern __shared__ float smem[];
  DeviceExec ex;
  const int64_t nc = a.s.nc(), blk = static_cast<int64_t>(blockIdx.x);
  backward_local_body<T>(ex, a, blk / nc, blk % nc, smem);
}

// one thread per (b, h, state element); no shared memory, no barriers
template <class T>
__global__ void __launch_bounds__(kThreads) backward_sweep_kernel(ChunkArgs<T> a, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) backward_sweep_element<T>(a, i / a.s.S(), i % a.s.S());
}

template <class T>
__global__ void __launch_bounds__(kThreads) backward_kv_kernel(ChunkArgs<T> a) {
  extern __shared__ float smem[];
  DeviceExec ex;
  const int64_t nc = a.s.nc(), blk = static_cast<int64_t>(blockIdx.x);
  backward_kv_body<T>(ex, a, blk / nc, blk % nc, smem);
}

template <class K>
void set_smem(K kernel, size_t bytes, const char* what) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), what);
}

size_t bytes_of(KernelKind kk, const ChunkShape& s, bool state_smem) {
  return static_cast<size_t>(smem_floats(kk, s.Dk, s.Dv, s.C, state_smem)) * sizeof(float);
}

// Enqueues the states kernel (a.states allocated, a.s.C chosen).
template <class T>
void launch_states(ChunkArgs<T> a, int64_t nbh, int64_t max_bytes, cudaStream_t stream) {
  a.state_smem = smem_floats(KernelKind::States, a.s.Dk, a.s.Dv, a.s.C, true) * 4 <= max_bytes;
  const size_t smem = bytes_of(KernelKind::States, a.s, a.state_smem);
  set_smem(states_kernel<T>, smem, "cudaFuncSetAttribute (linear attention chunk states)");
  states_kernel<T><<<static_cast<unsigned>(nbh * state_tiles(a.s)), kThreads, smem, stream>>>(a);
  check_launch("linear attention chunk states kernel");
}

}  // namespace

template <class T>
bool chunk_forward(ChunkArgs<T> a, int64_t max_smem_bytes, void* stream_) {
  cudaStream_t stream = as_stream(stream_);
  int C = 0;
  bool smem_out = false;
  if (!plan(KernelKind::Output, a.s.Dk, a.s.Dv, max_smem_bytes, &C, &smem_out)) return false;
  a.s.C = C;
  const int64_t nbh = static_cast<int64_t>(a.s.B) * a.s.H, nc = a.s.nc();
  if (nbh == 0 || (a.s.T == 0 && !a.fin)) return true;
  if (nbh * (nc > state_tiles(a.s) ? nc : state_tiles(a.s)) > 2147483647LL)
    throw UnsupportedError("q: B * H * ceil(T / chunk) too large for one grid");
  StreamScratch scratch;
  a.states = static_cast<float*>(scratch.alloc(static_cast<size_t>(nbh * a.s.nst() * a.s.S()) * sizeof(float), stream));
  launch_states<T>(a, nbh, max_smem_bytes, stream);
  if (nc > 0) {
    a.state_smem = smem_out;
    const size_t smem = bytes_of(KernelKind::Output, a.s, smem_out);
    set_smem(output_kernel<T>, smem, "cudaFuncSetAttribute (linear attention chunk output)");
    output_kernel<T><<<static_cast<unsigned>(nbh * nc), kThreads, smem, stream>>>(a);
    check_launch("linear attention chunk output kernel");
  }
  return true;
}

template <class T>
bool chunk_backward(ChunkArgs<T> a, int64_t max_smem_bytes, void* stream_) {
  cudaStream_t stream = as_stream(stream_);
  int C = 0;
  bool smem_bwd = false;
  if (!plan(KernelKind::Backward, a.s.Dk, a.s.Dv, max_smem_bytes, &C, &smem_bwd)) return false;
  a.s.C = C;
  const int64_t nbh = static_cast<int64_t>(a.s.B) * a.s.H, nc = a.s.nc(), S = a.s.S();
  if (nbh == 0) return true;
  if (nbh * nc > 2147483647LL || nbh * state_tiles(a.s) > 2147483647LL ||
      (nbh * S + kThreads - 1) / kThreads > 2147483647LL)
    throw UnsupportedError("q: B * H * ceil(T / chunk) too large for one grid");
  // scratch: states | xbuf | drbuf | ebuf
  const size_t state_floats = static_cast<size_t>(nbh * a.s.nst() * S);
  const size_t x_floats = static_cast<size_t>(nbh * (nc > 0 ? nc : 1) * S);
  const size_t tok_floats = a.s.causal ? static_cast<size_t>(nbh * a.s.T * a.s.W()) : 0;
  StreamScratch scratch;
  float* base = static_cast<float*>(
      scratch.alloc((state_floats + x_floats + 2 * tok_floats) * sizeof(float), stream));
  a.states = base;
  a.xbuf = base + state_floats;
  a.drbuf = a.s.causal ? a.xbuf + x_floats : nullptr;
  a.ebuf = a.s.causal ? a.drbuf + tok_floats : nullptr;
  launch_states<T>(a, nbh, max_smem_bytes, stream);
  a.state_smem = smem_bwd;
  const size_t smem = bytes_of(KernelKind::Backward, a.s, smem_bwd);
  if (nc > 0) {
    set_smem(backward_local_kernel<T>, smem, "cudaFuncSetAttribute (linear attention chunk backward_local)");
    backward_local_kernel<T><<<static_cast<unsigned>(nbh * nc), kThreads, smem, stream>>>(a);
    check_launch("linear attention chunk backward_local kernel");
  }
  // (T = 0: no chunks; the sweep hands grad_final_state (or 0) to grad_initial_state)
  const int64_t n = nbh * S;
  backward_sweep_kernel<T><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a, n);
  check_launch("linear attention chunk backward_sweep kernel");
  if (nc > 0) {
    set_smem(backward_kv_kernel<T>, smem, "cudaFuncSetAttribute (linear attention chunk backward_kv)");
    backward_kv_kernel<T><<<static_cast<unsigned>(nbh * nc), kThreads, smem, stream>>>(a);
    check_launch("linear attention chunk backward_kv kernel");
  }
  return true;
}

template bool chunk_forward<float>(ChunkArgs<float>, int64_t, void*);
template bool chunk_forward<__half>(ChunkArgs<__half>, int64_t, void*);
template bool chunk_forward<__nv_bfloat16>(ChunkArgs<__nv_bfloat16>, int64_t, void*);
template bool chunk_backward<float>(ChunkArgs<float>, int64_t, void*);
template bool chunk_backward<__half>(ChunkArgs<__half>, int64_t, void*);
template bool chunk_backward<__nv_bfloat16>(ChunkArgs<__nv_bfloat16>, int64_t, void*);

}  // namespace la2
}  // namespace cuda
}  // namespace ne
