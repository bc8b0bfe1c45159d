// bench_quant_cuda: GPU throughput of the quantized GEMMs (ne::cuda::quant_linear, cuda/quant_gemm.cu) for
// every format, standalone (no torch, no cuBLAS: benchmarks/compare_quant_cuda.py holds the cuBLAS bf16
// comparison). Shapes M x N x K: the GEMM 8192^3 and 4096^3 (TFLOP/s, including the activation quantization)
// and decode M = 1 / 8 at N = K = 4096 and 8192 (packed weight bytes per second, and that as a fraction of a
// device-to-device cudaMemcpy of the same bytes: a copy moves 2x the bytes, so 100% = copy bandwidth). On an
// sm_90 GPU the int8 / fp8 GEMMs are timed on both tensor-core paths (wgmma, mma.sync).
//
//   bench_quant_cuda [--repeats 9]
//
// Weights are random codes (int8 in [-127, 127], int4 nibbles, finite E4M3 bytes) with random scales;
// activations are bf16. Prints medians over --repeats runs timed with CUDA events.
#include <cstdio>

#if !defined(NE_WITH_CUDA)
int main() {
  std::printf("bench_quant_cuda: built without CUDA\n");
  return 0;
}
#else
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "ops/quant_gemm.h"

namespace {

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "bench_quant_cuda: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

uint32_t g_seed = 12345;
uint32_t urand_u32() {
  g_seed = g_seed * 1664525u + 1013904223u;
  return g_seed >> 8;
}
float urand() { return static_cast<float>(urand_u32()) * (2.0f / 16777216.0f) - 1.0f; }  // [-1, 1)

template <class T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  ok(cudaMalloc(&d, h.size() * sizeof(T)), "cudaMalloc");
  ok(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  return d;
}

double median_ms(const std::function<void()>& fn, int repeats) {
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "cudaEventCreate");
  ok(cudaEventCreate(&b), "cudaEventCreate");
  for (int i = 0; i < 2; ++i) fn();
  ok(cudaDeviceSynchronize(), "warmup");
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    ok(cudaEventRecord(a), "cudaEventRecord");
    fn();
    ok(cudaEventRecord(b), "cudaEventRecord");
    ok(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

uint16_t bf16_bits(float v) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

int run(int argc, char** argv) {
  int repeats = 9;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--repeats" && i + 1 < argc) repeats = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--repeats N]\n", argv[0]);
      return 2;
    }
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("bench_quant_cuda: no CUDA device visible; skipped\n");
    return 0;
  }
  cudaDeviceProp prop{};
  ok(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("normengine bench_quant_cuda on %s, median of %d (CUDA events)\n", prop.name, repeats);
  const bool sm90 = ne::cuda::sm90_gemm_compiled() && prop.major == 9 && prop.minor == 0;
  std::printf("%-18s %-20s %10s %10s %10s %10s\n", "M x N x K", "format", "ms", "TFLOP/s", "W GB/s", "of copy");
  struct Shape { int64_t M, N, K; };
  const Shape shapes[] = {{8192, 8192, 8192}, {4096, 4096, 4096}, {1, 4096, 4096},
                          {8, 4096, 4096},    {1, 8192, 8192},    {8, 8192, 8192}};
  for (const Shape& s : shapes) {
    const int64_t M = s.M, N = s.N, K = s.K, G = K / 128, NB = (N + 127) / 128, KB = (K + 127) / 128;
    std::vector<uint16_t> hx(static_cast<size_t>(M * K));
    for (auto& v : hx) v = bf16_bits(urand());
    std::vector<int8_t> hq8(static_cast<size_t>(N * K));
    for (auto& v : hq8) v = static_cast<int8_t>(static_cast<int>(urand_u32() % 255) - 127);
    std::vector<uint8_t> hq4(static_cast<size_t>(N * K / 2)), hqf(static_cast<size_t>(N * K));
    for (auto& v : hq4) v = static_cast<uint8_t>(urand_u32());
    for (auto& v : hqf) {
      v = static_cast<uint8_t>(urand_u32());
      if ((v & 0x7f) == 0x7f) v ^= 1;  // no NaN codes
    }
    std::vector<float> hs8(N), hs4(static_cast<size_t>(N * G)), hsf(static_cast<size_t>(NB * KB));
    for (auto& v : hs8) v = 1e-3f * (1.5f + urand());
    for (auto& v : hs4) v = 1e-2f * (1.5f + urand());
    for (auto& v : hsf) v = 1e-3f * (1.5f + urand());
    uint16_t* dx = upload(hx);
    int8_t* dq8 = upload(hq8);
    uint8_t *dq4 = upload(hq4), *dqf = upload(hqf);
    float *ds8 = upload(hs8), *ds4 = upload(hs4), *dsf = upload(hsf);
    float* dy = nullptr;
    ok(cudaMalloc(&dy, static_cast<size_t>(M * N) * sizeof(float)), "cudaMalloc y");
    uint8_t* dcopy = nullptr;
    ok(cudaMalloc(&dcopy, static_cast<size_t>(N * K)), "cudaMalloc copy");

    ne::QWeight W8{ne::QFormat::Int8, N, K, dq8, ds8, nullptr, 0};
    ne::QWeight W8w = W8;
    W8w.format = ne::QFormat::Int8Weight;
    ne::QWeight W4{ne::QFormat::Int4, N, K, dq4, ds4, nullptr, 128};
    ne::QWeight WF{ne::QFormat::FP8, N, K, dqf, dsf, nullptr, 128};
    struct Fmt { const char* name; const ne::QWeight* w; double bytes; };
    const Fmt fmts[] = {{"int8", &W8, double(N * K + 4 * N)},
                        {"fp8 b128", &WF, double(N * K + 4 * NB * KB)},
                        {"int8-weight", &W8w, double(N * K + 4 * N)},
                        {"int4 g128", &W4, double(N * K / 2 + 4 * N * G)}};
    char label[64];
    std::snprintf(label, sizeof label, "%lldx%lldx%lld", static_cast<long long>(M), static_cast<long long>(N),
                  static_cast<long long>(K));
    for (const Fmt& f : fmts) {
      if (M > 8 && (f.w->format == ne::QFormat::Int8Weight || f.w->format == ne::QFormat::Int4) && M * N * K > (1LL << 36))
        continue;  // the fp32 tiled path at 8192^3 takes seconds per call
      const size_t wb = f.w->format == ne::QFormat::Int4 ? size_t(N * K / 2) : size_t(N * K);
      const double copy_ms = median_ms([&] { ok(cudaMemcpyAsync(dcopy, f.w->data, wb, cudaMemcpyDeviceToDevice), "copy"); },
                                       repeats);
      // int8 / fp8 with M > 8 on an sm_90 device: the wgmma kernels (the default there) and the mma.sync one
      const bool both = M > 8 && sm90 && (f.w->format == ne::QFormat::Int8 || f.w->format == ne::QFormat::FP8);
      for (int path = 0; path < (both ? 2 : 1); ++path) {
        ne::cuda::set_sm90_gemm(path == 0);
        const int64_t calls = ne::cuda::sm90_gemm_calls();
        const double ms = median_ms([&] {
          ne::cuda::quant_linear(M, dx, ne::DType::BF16, K, *f.w, nullptr, dy, N, false, nullptr);
        }, repeats);
        std::string name = f.name;
        if (both) name += path == 0 ? (ne::cuda::sm90_gemm_calls() > calls ? " wgmma" : " (declined)") : " mma.sync";
        const double gbs = f.bytes / ms * 1e-6, copy_gbs = 2.0 * double(wb) / copy_ms * 1e-6;
        std::printf("%-18s %-20s %10.3f %10.1f %10.0f %9.0f%%\n", label, name.c_str(), ms, 2.0 * M * N * K / ms * 1e-9,
                    gbs, 100.0 * gbs / copy_gbs);
      }
      ne::cuda::set_sm90_gemm(true);
    }
    ok(cudaGetLastError(), "launch");
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(dq8), static_cast<void*>(dq4), static_cast<void*>(dqf),
                    static_cast<void*>(ds8), static_cast<void*>(ds4), static_cast<void*>(dsf), static_cast<void*>(dy),
                    static_cast<void*>(dcopy)})
      cudaFree(p);
  }
  return 0;
}
int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_quant_cuda: %s\n", e.what());
    return 1;
  }
}
#endif
