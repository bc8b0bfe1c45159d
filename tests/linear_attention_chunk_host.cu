// Host harness of the chunked CUDA linear-attention kernels (cuda/linear_attention_chunk.cuh): runs the
// SAME kernel bodies as the GPU, with every thread block emulated on the CPU and every phase run as a
// plain loop over the block's threads (forwards, or backwards to expose hazards inside a phase).
// Shared memory and the global scratch start out as NaN, so a read of anything not written first
// shows up in the results. Built as a shared library by tests/test_linear_attention_chunk_host.py
// (nvcc, no GPU needed) and called through ctypes; tensors are contiguous [B, T, H, D].
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "linear_attention_chunk.cuh"

using namespace ne::cuda::la2;

namespace {

struct HostExec {
  int nthr;
  bool reverse;
  template <class F>
  __host__ __device__ void phase(F&& f) {  // (host+device only to match the bodies; runs on the host)
    if (reverse)
      for (int t = nthr - 1; t >= 0; --t) f(t, nthr);
    else
      for (int t = 0; t < nthr; ++t) f(t, nthr);
  }
};

struct Cfg {
  int B, H, Dk, Dv, kind, fmap, out_norm, causal, normalize, C, state_smem, nthr, reverse;
  int64_t T;
  float eps;
};

template <class T>
Tok<T> tok(void* p, const Cfg& c, int D) {
  Tok<T> t;
  t.p = static_cast<T*>(p);
  t.sh = D;
  t.st = (int64_t)c.H * D;
  t.sb = c.T * c.H * D;
  return t;
}

template <class T>
ChunkArgs<T> args(const Cfg& c, const void* q, const void* k, const void* v, const float* decay, const float* init) {
  ChunkArgs<T> a;
  a.s.B = c.B;
  a.s.H = c.H;
  a.s.Dk = c.Dk;
  a.s.Dv = c.Dv;
  a.s.T = c.T;
  a.s.kind = c.kind;
  a.s.fmap = c.fmap;
  a.s.out_norm = c.out_norm;
  a.s.causal = c.causal != 0;
  a.s.normalize = c.normalize != 0;
  a.s.eps = c.eps;
  a.s.C = c.C;
  a.q = tok<const T>(const_cast<void*>(q), c, c.Dk);
  a.k = tok<const T>(const_cast<void*>(k), c, c.Dk);
  a.v = tok<const T>(const_cast<void*>(v), c, c.Dv);
  a.decay = decay;
  a.init = init;
  a.state_smem = c.state_smem != 0;
  return a;
}

std::vector<float> nans(int64_t n) { return std::vector<float>((size_t)n, std::numeric_limits<float>::quiet_NaN()); }

template <class T>
void run_states(const Cfg& c, ChunkArgs<T>& a, std::vector<float>& states) {
  const int64_t nbh = (int64_t)c.B * c.H;
  states = nans(nbh * a.s.nst() * a.s.S());
  a.states = states.data();
  HostExec ex{c.nthr, c.reverse != 0};
  for (int64_t bh = 0; bh < nbh; ++bh)
    for (int tile = 0; tile < state_tiles(a.s); ++tile) {  // independent blocks: reversed with the threads
      std::vector<float> smem = nans(smem_floats(KernelKind::States, c.Dk, c.Dv, c.C, a.state_smem));
      states_body<T>(ex, a, bh, c.reverse ? state_tiles(a.s) - 1 - tile : tile, smem.data());
    }
}

template <class T>
void forward(const Cfg& c, const void* q, const void* k, const void* v, const float* decay, const float* init,
             void* o, float* fin) {
  ChunkArgs<T> a = args<T>(c, q, k, v, decay, init);
  a.o = tok<T>(o, c, c.Dv);
  a.fin = fin;
  std::vector<float> states;
  run_states<T>(c, a, states);
  HostExec ex{c.nthr, c.reverse != 0};
  const int64_t nbh = (int64_t)c.B * c.H, nc = a.s.nc();
  for (int64_t bh = 0; bh < nbh; ++bh)
    for (int64_t ch = 0; ch < nc; ++ch) {
      std::vector<float> smem = nans(smem_floats(KernelKind::Output, c.Dk, c.Dv, c.C, a.state_smem));
      output_body<T>(ex, a, bh, ch, smem.data());
    }
}

template <class T>
void backward(const Cfg& c, const void* q, const void* k, const void* v, const float* decay, const float* init,
              const void* go, const float* gfin, void* gq, void* gk, void* gv, float* ginit) {
  ChunkArgs<T> a = args<T>(c, q, k, v, decay, init);
  a.go = tok<const T>(const_cast<void*>(go), c, c.Dv);
  a.gq = tok<T>(gq, c, c.Dk);
  a.gk = tok<T>(gk, c, c.Dk);
  a.gv = tok<T>(gv, c, c.Dv);
  a.gfin = gfin;
  a.ginit = ginit;
  std::vector<float> states;
  run_states<T>(c, a, states);
  const int64_t nbh = (int64_t)c.B * c.H, nc = a.s.nc(), S = a.s.S();
  // the launcher's scratch, NaN to start with: xbuf [nbh, max(nc, 1), S], drbuf / ebuf [nbh, T, W]
  std::vector<float> xbuf = nans(nbh * (nc > 0 ? nc : 1) * S), drbuf = nans(nbh * c.T * a.s.W()),
                     ebuf = nans(nbh * c.T * a.s.W());
  a.xbuf = xbuf.data();
  a.drbuf = c.causal ? drbuf.data() : nullptr;
  a.ebuf = c.causal ? ebuf.data() : nullptr;
  HostExec ex{c.nthr, c.reverse != 0};
  const int64_t nsm = smem_floats(KernelKind::Backward, c.Dk, c.Dv, c.C, a.state_smem);
  for (int64_t bh = 0; bh < nbh; ++bh)
    for (int64_t ch = 0; ch < nc; ++ch) {
      std::vector<float> smem = nans(nsm);
      backward_local_body<T>(ex, a, bh, ch, smem.data());
    }
  for (int64_t i = 0; i < nbh * S; ++i) {  // one thread per element, any order
    const int64_t e = c.reverse ? nbh * S - 1 - i : i;
    backward_sweep_element<T>(a, e / S, e % S);
  }
  for (int64_t bh = 0; bh < nbh; ++bh)
    for (int64_t ch = 0; ch < nc; ++ch) {
      std::vector<float> smem = nans(nsm);
      backward_kv_body<T>(ex, a, bh, ch, smem.data());
    }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16. ints: B, H, Dk, Dv, kind, fmap, out_norm, causal, normalize,
// C, state_smem, nthr, reverse (13 values).
extern "C" int la2_host_forward(int dtype, const int* ints, int64_t T, float eps, const void* q, const void* k,
                                const void* v, const float* decay, const float* init, void* o, float* fin) {
  const Cfg c{ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7], ints[8], ints[9], ints[10], ints[11],
              ints[12], T, eps};
  if (dtype == 0) forward<float>(c, q, k, v, decay, init, o, fin);
  else if (dtype == 1) forward<__nv_bfloat16>(c, q, k, v, decay, init, o, fin);
  else if (dtype == 2) forward<__half>(c, q, k, v, decay, init, o, fin);
  else return 1;
  return 0;
}

extern "C" int la2_host_backward(int dtype, const int* ints, int64_t T, float eps, const void* q, const void* k,
                                 const void* v, const float* decay, const float* init, const void* go,
                                 const float* gfin, void* gq, void* gk, void* gv, float* ginit) {
  const Cfg c{ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7], ints[8], ints[9], ints[10], ints[11],
              ints[12], T, eps};
  if (dtype == 0) backward<float>(c, q, k, v, decay, init, go, gfin, gq, gk, gv, ginit);
  else if (dtype == 1) backward<__nv_bfloat16>(c, q, k, v, decay, init, go, gfin, gq, gk, gv, ginit);
  else if (dtype == 2) backward<__half>(c, q, k, v, decay, init, go, gfin, gq, gk, gv, ginit);
  else return 1;
  return 0;
}

// The launchers' plan (chunk size, states in shared memory) and shared-memory sizes, for the tests.
extern "C" int la2_host_plan(int kernel, int Dk, int Dv, int64_t max_bytes, int* C, int* state_smem) {
  bool sm = false;
  const bool ok = plan(static_cast<KernelKind>(kernel), Dk, Dv, max_bytes, C, &sm);
  *state_smem = sm ? 1 : 0;
  return ok ? 1 : 0;
}

extern "C" int64_t la2_host_smem_floats(int kernel, int Dk, int Dv, int C, int state_smem) {
  return smem_floats(static_cast<KernelKind>(kernel), Dk, Dv, C, state_smem != 0);
}
