// bench_quant: CPU throughput of the quantized GEMMs (ne::quant_gemm_f32) for every format against
// the engine's fp32 GEMM (ne::gemm_f32), K = N = 4096, M in {1, 16, 128, 512}.
//
//   bench_quant [--threads N] [--repeats K] [--isa avx512|avx2|generic] [--k 4096] [--n 4096]
//               [--int8-kernel amx|avx512vnni|avxvnni|isa] [--m 1,16,128,512]
//               [--formats int8,int8w,int8w32,int8w32z,int8w16,int8w16z,int4,int4g32z,fp8]
//
// Weights are packed here with the same rules as normengine.ops.quantize_weight (int8 per channel,
// int8-weight with a scale per 32 columns (int8w32: llama.cpp's Q8_0 layout) or 16 (int8w16: a GGUF Q6_K as
// loaded), the suffix z with zero points (int8w32z / int8w16z: Q5_K / Q2_K; int4g32z: Q4_K), int4 groups of 128
// symmetric mid-rise, fp8 E4M3 with 128 x 128 block scales); values are random.
// Prints the median time, GFLOP/s (2 M N K) and the speed-up over fp32; for M = 1 also the bytes of
// packed weight streamed per second.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.h"
#include "core/parallel.h"
#include "ops/gemm.h"
#include "ops/quant_gemm.h"

namespace {

using namespace bench;  // bench_common.h

double median_time(const std::function<void()>& fn, int repeats) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) t.push_back(seconds_of(fn));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

uint32_t g_seed = 12345;
float urand() {  // [-1, 1)
  g_seed = g_seed * 1664525u + 1013904223u;
  return static_cast<float>(g_seed >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

uint8_t e4m3_bits(float v) {  // round to nearest E4M3 (|v| <= 448) by search over the 256 codes
  uint8_t best = 0;
  float bd = INFINITY;
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7) continue;
    float f = e == 0 ? std::ldexp(m / 8.0f, -6) : std::ldexp(1.0f + m / 8.0f, e - 7);
    if (b & 0x80) f = -f;
    if (std::fabs(f - v) < bd) bd = std::fabs(f - v), best = static_cast<uint8_t>(b);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, repeats = 7;
  int64_t K = 4096, N = 4096;
  std::string isa, int8k, ms = "1,16,128,512", formats = "int8,int8w,int4,fp8";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--repeats" && i + 1 < argc) repeats = std::atoi(argv[++i]);
    else if (a == "--isa" && i + 1 < argc) isa = argv[++i];
    else if (a == "--k" && i + 1 < argc) K = std::atoll(argv[++i]);
    else if (a == "--n" && i + 1 < argc) N = std::atoll(argv[++i]);
    else if (a == "--int8-kernel" && i + 1 < argc) int8k = argv[++i];
    else if (a == "--m" && i + 1 < argc) ms = argv[++i];
    else if (a == "--formats" && i + 1 < argc) formats = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--threads N] [--repeats K] [--isa avx512|avx2|generic] [--k K] [--n N] "
                   "[--int8-kernel NAME] [--m 1,16,...]\n"
                   "       [--formats int8,int8w,int8w32,int8w32z,int8w16,int8w16z,int4,int4g32z,fp8]\n", argv[0]);
      return 2;
    }
  }
  if (threads > 0) ne::set_num_threads(threads);
  if (!isa.empty()) ne::force_cpu_isa(isa.c_str());
  if (!int8k.empty()) ne::force_int8_kernel(int8k);
  std::vector<int64_t> Ms;
  for (size_t p = 0; p < ms.size();) {
    const size_t q = ms.find(',', p);
    Ms.push_back(std::atoll(ms.substr(p, q - p).c_str()));
    p = q == std::string::npos ? ms.size() : q + 1;
  }
  auto wanted = [&](const char* f) { return ("," + formats + ",").find("," + std::string(f) + ",") != std::string::npos; };
  if (K % 128) { std::fprintf(stderr, "--k: a multiple of 128\n"); return 2; }
  int64_t maxM = 1;
  for (int64_t m : Ms) maxM = std::max(maxM, m);
  std::vector<float> w(static_cast<size_t>(N * K)), x(static_cast<size_t>(maxM * K)), y(static_cast<size_t>(maxM * N));
  for (auto& v : w) v = urand() * 0.05f;
  for (auto& v : x) v = urand();
  // int8 per channel
  std::vector<int8_t> q8(static_cast<size_t>(N * K));
  std::vector<float> s8(N);
  for (int64_t n = 0; n < N; ++n) {
    float amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
    s8[n] = amax / 127.0f;
    for (int64_t k = 0; k < K; ++k) q8[n * K + k] = static_cast<int8_t>(std::lrint(w[n * K + k] / s8[n]));
  }
  // int8 with a scale per group of gs columns (int8-weight group 32: llama.cpp's Q8_0 blocks; 16: a GGUF Q6_K's
  // sub-blocks as normengine loads them)
  auto int8_groups = [&](int64_t gs, std::vector<int8_t>& q, std::vector<float>& sc) {
    q.resize(static_cast<size_t>(N * K));
    sc.resize(static_cast<size_t>(N * (K / gs)));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < K / gs; ++g) {
        float amax = 0;
        for (int64_t k = g * gs; k < g * gs + gs; ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
        const float s = amax / 127.0f;
        sc[n * (K / gs) + g] = s;
        for (int64_t k = g * gs; k < g * gs + gs; ++k) q[n * K + k] = static_cast<int8_t>(std::lrint(w[n * K + k] / s));
      }
  };
  std::vector<int8_t> q8g, q8g16;
  std::vector<float> s8g, s8g16;
  int8_groups(32, q8g, s8g);
  int8_groups(16, q8g16, s8g16);
  // zero points for the asymmetric variants (GGUF Q5_K / Q2_K as int8-weight, Q4_K as int4 g32): the values do
  // not matter for the timing
  std::vector<float> zeros(static_cast<size_t>(N * (K / 16)), 0.5f);
  // int4, groups of 128, mid-rise
  const int64_t G = K / 128;
  std::vector<uint8_t> q4(static_cast<size_t>(N * K / 2));
  std::vector<float> s4(static_cast<size_t>(N * G));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      float amax = 0;
      for (int64_t k = g * 128; k < (g + 1) * 128; ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
      const float s = amax / 7.5f;
      s4[n * G + g] = s;
      for (int64_t k = g * 128; k < (g + 1) * 128; k += 2) {
        auto code = [&](float v) { return static_cast<int>(std::min(7.0f, std::max(-8.0f, std::floor(v / s)))) + 8; };
        q4[(n * K + k) / 2] = static_cast<uint8_t>(code(w[n * K + k]) | (code(w[n * K + k + 1]) << 4));
      }
    }
  // fp8, 128 x 128 blocks
  const int64_t NB = (N + 127) / 128, KB = (K + 127) / 128;
  std::vector<uint8_t> qf(static_cast<size_t>(N * K));
  std::vector<float> sf(static_cast<size_t>(NB * KB));
  for (int64_t bn = 0; bn < NB; ++bn)
    for (int64_t bk = 0; bk < KB; ++bk) {
      float amax = 0;
      for (int64_t n = bn * 128; n < std::min(N, bn * 128 + 128); ++n)
        for (int64_t k = bk * 128; k < std::min(K, bk * 128 + 128); ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
      sf[bn * KB + bk] = amax / 448.0f;
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) qf[n * K + k] = e4m3_bits(w[n * K + k] / sf[(n / 128) * KB + k / 128]);

  ne::QWeight W8{ne::QFormat::Int8, N, K, q8.data(), s8.data(), nullptr, 0};
  ne::QWeight W8w = W8;
  W8w.format = ne::QFormat::Int8Weight;
  ne::QWeight W8g{ne::QFormat::Int8Weight, N, K, q8g.data(), s8g.data(), nullptr, 32};
  ne::QWeight W8gz{ne::QFormat::Int8Weight, N, K, q8g.data(), s8g.data(), zeros.data(), 32};
  ne::QWeight W8g16{ne::QFormat::Int8Weight, N, K, q8g16.data(), s8g16.data(), nullptr, 16};
  ne::QWeight W8g16z{ne::QFormat::Int8Weight, N, K, q8g16.data(), s8g16.data(), zeros.data(), 16};
  ne::QWeight W4{ne::QFormat::Int4, N, K, q4.data(), s4.data(), nullptr, 128};
  // int4 with groups of 32 and zero points (a GGUF Q4_K as normengine loads it): the same codes, 4x the scales
  std::vector<float> s4g32(static_cast<size_t>(N * (K / 32)), 0.01f);
  ne::QWeight W4g32z{ne::QFormat::Int4, N, K, q4.data(), s4g32.data(), zeros.data(), 32};
  ne::QWeight WF{ne::QFormat::FP8, N, K, qf.data(), sf.data(), nullptr, 128};
  struct Fmt { const char* key; const char* name; const ne::QWeight* w; double bytes; };
  const Fmt all[] = {{"int8", "int8 (W8A8)", &W8, double(N * K + 4 * N)}, {"int8w", "int8-weight", &W8w, double(N * K + 4 * N)},
                     {"int8w32", "int8-w g32", &W8g, double(N * K + 4 * N * (K / 32))},
                     {"int8w32z", "int8-w g32 z", &W8gz, double(N * K + 8 * N * (K / 32))},
                     {"int8w16", "int8-w g16", &W8g16, double(N * K + 4 * N * (K / 16))},
                     {"int8w16z", "int8-w g16 z", &W8g16z, double(N * K + 8 * N * (K / 16))},
                     {"int4g32z", "int4 g32 z", &W4g32z, double(N * K / 2 + 8 * N * (K / 32))},
                     {"int4", "int4 g128", &W4, double(N * K / 2 + 4 * N * G)}, {"fp8", "fp8 b128", &WF, double(N * K + 4 * NB * KB)}};
  std::vector<Fmt> fmts;
  for (const Fmt& f : all)
    if (wanted(f.key)) fmts.push_back(f);
  std::printf("normengine bench_quant: isa=%s int8 kernel=%s threads=%d repeats=%d (median), K=%lld N=%lld\n",
              ne::cpu_isa(), ne::int8_kernel(), ne::num_threads(), repeats, static_cast<long long>(K), static_cast<long long>(N));
  std::printf("%-12s %4s %10s %9s %9s %9s\n", "format", "M", "ms", "GFLOP/s", "vs fp32", "W GB/s");
  for (int64_t M : Ms) {
    const double tf = median_time([&] {
      ne::gemm_f32(M, N, K, x.data(), K, w.data(), ne::DType::F32, K, nullptr, y.data(), N, false);
    }, repeats);
    const double flop = 2.0 * M * N * K;
    std::printf("%-12s %4lld %10.3f %9.1f %9s %9.1f\n", "fp32", static_cast<long long>(M), tf * 1e3, flop / tf * 1e-9,
                "1.00x", M == 1 ? 4.0 * N * K / tf * 1e-9 : 0.0);
    for (const Fmt& f : fmts) {
      const double t = median_time([&] { ne::quant_gemm_f32(M, x.data(), K, *f.w, nullptr, y.data(), N); },
                                   M >= 128 && f.w->format == ne::QFormat::FP8 ? 3 : repeats);
      std::printf("%-12s %4lld %10.3f %9.1f %8.2fx %9.1f\n", f.name, static_cast<long long>(M), t * 1e3,
                  flop / t * 1e-9, tf / t, M == 1 ? f.bytes / t * 1e-9 : 0.0);
    }
  }
  return 0;
}
