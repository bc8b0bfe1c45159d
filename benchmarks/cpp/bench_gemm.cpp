// bench_gemm: CPU throughput of the dense linear kernels (ne::gemm_f32), GPT-2-small shapes.
//
//   bench_gemm [--threads N] [--isa avx512|avx2|generic] [--repeats K] [--gemv-only | --gemm-only]
//              [--small-pages]  (W, and the memcpy it is compared with, on 4 KiB pages; default: huge pages,
//                                as normengine.load places a model's weights)
//              [--warm]         (GEMV with W left in the caches between runs: a model that fits the L3)
//
// GEMV (decode, M = 1 and M = 4 rows): y = x W^T for W [N, K] in f32 / bf16. Prints the median time
// of K runs, the bandwidth of W's bytes (the traffic that bounds the kernel: x and y are < 0.1%),
// and that as a percentage of a chunked memcpy on the engine's thread pool moving the same bytes
// (copying |W|/2 bytes reads and writes |W| bytes), timed interleaved with the kernel. Caches are
// evicted before every timed run, so W streams from DRAM as in a model larger than the L3.
//
// GEMM (prefill, M = 16, 128, 512): GFLOP/s (2 M N K flops) of the median of K warm runs.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.h"
#include "core/half.h"
#include "core/parallel.h"
#include "normengine/ops.h"
#include "ops/gemm.h"

namespace {

using namespace bench;  // bench_common.h

using ne::DType;

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, repeats = 15;
  bool do_gemv = true, do_gemm = true, huge = true, warm = false;
  std::string isa;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads") threads = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--repeats") repeats = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--isa" && i + 1 < argc) isa = argv[++i];
    else if (a == "--gemv-only") do_gemm = false;
    else if (a == "--small-pages") huge = false;
    else if (a == "--warm") warm = true;
    else if (a == "--gemm-only") do_gemv = false;
    else {
      std::fprintf(stderr, "usage: %s [--threads N] [--isa avx512|avx2|generic] [--repeats K] "
                   "[--gemv-only | --gemm-only] [--small-pages] [--warm]\n", argv[0]);
      return 2;
    }
  }
  if (repeats < 5) { std::fprintf(stderr, "--repeats: at least 5\n"); return 2; }
  // (K, N): attention qkv, attention out, MLP up, LM head, MLP down
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {768, 768}, {768, 2304}, {768, 3072}, {768, 50257}, {3072, 768}};

  try {
    if (threads > 0) ne::set_num_threads(threads);
    if (!isa.empty()) ne::force_cpu_isa(isa.c_str());
    const int64_t max_w = 768 * 50257, max_m = 512, max_k = 3072, max_n = 50257;
    Buffer w(static_cast<size_t>(max_w) * 4, huge), x(max_m * max_k * 4), y(max_m * max_n * 4), bias(max_n * 4);
    Buffer csrc(static_cast<size_t>(max_w) * 2 + 4096, huge), cdst(static_cast<size_t>(max_w) * 2 + 4096, huge);
    const int64_t kFlush = int64_t(640) << 20;  // more than the largest L3 seen here (504 MB, a Xeon guest)
    Buffer scratch(kFlush);
    auto flush = [&] {
      if (!warm) flush_caches(scratch);
    };
    fill(x.p, DType::F32, max_m * max_k, 1);
    fill(bias.p, DType::F32, max_n, 2);
    std::memset(csrc.p, 1, static_cast<size_t>(max_w) * 2);
    const float* xp = reinterpret_cast<const float*>(x.p);
    const float* bp = reinterpret_cast<const float*>(bias.p);
    float* yp = reinterpret_cast<float*>(y.p);

    std::printf("normengine bench_gemm: isa=%s threads=%d repeats=%d (median)\n", ne::cpu_isa(),
                ne::num_threads(), repeats);
    for (DType dt : {DType::F32, DType::BF16}) {
      const char* dname = dt == DType::F32 ? "f32" : "bf16";
      const int es = ne::dtype_size(dt);
      fill(w.p, dt, max_w, 3);
      if (do_gemv) {
        std::printf("\nDecode-sized M (GEMV for M <= 15, GEMM above: a batch's decode step)  W %s, %s caches;\n"
                    "copy = memcpy of |W|/2 bytes (|W| bytes of traffic)\n", dname, warm ? "warm" : "cold");
        std::printf("%2s %5s %6s %9s %9s %9s %7s\n", "M", "K", "N", "ms", "W GB/s", "copyGB/s", "%copy");
        for (int64_t M : {1, 4, 8, 12, 16}) {
          for (auto [K, N] : shapes) {
            const double wbytes = static_cast<double>(N * K * es);
            const int64_t cbytes = static_cast<int64_t>(wbytes / 2) / 64 * 64;
            auto op = [&] { ne::gemm_f32(M, N, K, xp, K, w.p, dt, K, bp, yp, N); };
            auto copy = [&] { parallel_memcpy(cdst.p, csrc.p, cbytes); };
            for (int i = 0; i < 2; ++i) { op(); copy(); }
            std::vector<double> a, b;
            for (int i = 0; i < repeats; ++i) {
              flush();
              a.push_back(seconds_of(op));
              flush();
              b.push_back(seconds_of(copy));
            }
            const double t = median(a), tc = median(b);
            const double gbs = wbytes / t / 1e9, cgbs = 2.0 * cbytes / tc / 1e9;
            std::printf("%2lld %5lld %6lld %9.3f %9.1f %9.1f %6.1f%%\n", static_cast<long long>(M),
                        static_cast<long long>(K), static_cast<long long>(N), t * 1e3, gbs, cgbs, 100.0 * gbs / cgbs);
            std::fflush(stdout);
          }
        }
      }
      if (do_gemm) {
        // "medium": gemm_f32's bf16_products (AMX-BF16 tiles; the fp32 path where the CPU has none)
        const bool amx = ne::amx_bf16_available();
        std::printf("\nGEMM  W %s, warm caches; medium = bf16 products (%s), same run\n", dname,
                    amx ? "AMX-BF16" : "no AMX-BF16 here: the fp32 path again");
        std::printf("%4s %5s %6s %9s %9s %11s %9s %8s\n", "M", "K", "N", "ms", "GFLOP/s", "medium ms", "GFLOP/s",
                    "speedup");
        for (auto [K, N] : shapes) {
          if (K == 768 && N == 768) continue;
          for (int64_t M : {16, 128, 512}) {
            auto time_of = [&](bool bf16) {
              auto op = [&] { ne::gemm_f32(M, N, K, xp, K, w.p, dt, K, bp, yp, N, false, nullptr, bf16); };
              op();
              std::vector<double> a;
              const int reps = M * N * K > (int64_t(1) << 33) ? std::max(5, repeats / 3) : repeats;
              for (int i = 0; i < reps; ++i) a.push_back(seconds_of(op));
              return median(a);
            };
            const double t = time_of(false), tm = time_of(true);
            const double flop = 2.0 * M * N * K;
            std::printf("%4lld %5lld %6lld %9.3f %9.1f %11.3f %9.1f %7.2fx\n", static_cast<long long>(M),
                        static_cast<long long>(K), static_cast<long long>(N), t * 1e3, flop / t / 1e9, tm * 1e3,
                        flop / tm / 1e9, t / tm);
            std::fflush(stdout);
          }
        }
      }
    }
  } catch (const ne::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
