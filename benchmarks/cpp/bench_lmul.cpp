// bench_lmul: CPU throughput of the L-Mul GEMM (ne::lmul_gemm_f32) against the engine's own fp32
// GEMM (ne::gemm_f32) on the same shapes, in the same run.
//
//   bench_lmul [--threads N] [--isa avx512|avx2|generic] [--repeats K] [--bits M]
//
// Shapes: 1024 x 1024 x 1024, and M x 4096 x 4096 (M = 1, 16, 128, 512): y[M, N] = x[M, K] W[N, K]^T.
// Reports "GFLOP-equivalent/s" (2 M N K / time: one L-Mul + one add counted as a multiply-add) of the
// median of K warm runs of each kernel, timed interleaved, and the ratio L-Mul / fp32 (target: at least
// 0.25 of the fp32 FMA GEMM). Data: deterministic values in [-1, 1) (all normal: the fast tile path);
// the "zeros" row puts one zero in every 100 x entries, which sends every tile those rows touch to the
// checked path (special-value handling per product).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.h"
#include "core/parallel.h"
#include "normengine/ops.h"
#include "ops/gemm.h"
#include "ops/lmul.h"

namespace {

using namespace bench;  // bench_common.h

// U[-1, 1) without zeros (an L-Mul of a zero is a special case, not the timed arithmetic)
void fill_nonzero(std::vector<float>& v, uint32_t seed) {
  fill(v, seed);
  for (auto& x : v)
    if (x == 0.0f) x = 0.5f;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, repeats = 5, bits = 4;
  std::string isa;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--isa" && i + 1 < argc) isa = argv[++i];
    else if (a == "--repeats" && i + 1 < argc) repeats = std::max(1, std::atoi(argv[++i]));
    else if (a == "--bits" && i + 1 < argc) bits = std::atoi(argv[++i]);
    else { std::fprintf(stderr, "usage: bench_lmul [--threads N] [--isa X] [--repeats K] [--bits M]\n"); return 2; }
  }
  if (threads > 0) ne::set_num_threads(threads);
  if (!isa.empty()) ne::force_cpu_isa(isa.c_str());
  std::printf("bench_lmul: isa %s, %d threads, %d repeats (median), mantissa bits %d\n", ne::cpu_isa(),
              ne::num_threads(), repeats, bits);
  std::printf("%-24s %12s %12s %10s %8s\n", "shape M x K x N", "lmul GF/s", "fp32 GF/s", "lmul/fp32", "target");
  struct Shape { int64_t M, K, N; bool zeros; };
  const Shape shapes[] = {{1024, 1024, 1024, false}, {1, 4096, 4096, false},   {16, 4096, 4096, false},
                          {128, 4096, 4096, false},  {512, 4096, 4096, false}, {1024, 1024, 1024, true}};
  for (const Shape& s : shapes) {
    std::vector<float> x(static_cast<size_t>(s.M * s.K)), w(static_cast<size_t>(s.N * s.K)),
        y(static_cast<size_t>(s.M * s.N));
    fill_nonzero(x, 1);
    fill_nonzero(w, 2);
    if (s.zeros)
      for (size_t i = 0; i < x.size(); i += 100) x[i] = 0.0f;
    auto run_l = [&] { ne::lmul_gemm_f32(s.M, s.N, s.K, x.data(), s.K, w.data(), s.K, nullptr, y.data(), s.N, false, bits); };
    auto run_f = [&] { ne::gemm_f32(s.M, s.N, s.K, x.data(), s.K, w.data(), ne::DType::F32, s.K, nullptr, y.data(), s.N); };
    run_l();
    run_f();
    std::vector<double> tl, tf;
    for (int r = 0; r < repeats; ++r) {
      tl.push_back(bench::seconds_of(run_l));
      tf.push_back(bench::seconds_of(run_f));
    }
    const double flop = 2.0 * s.M * s.N * s.K, gl = flop / median(tl) * 1e-9, gf = flop / median(tf) * 1e-9;
    char name[64];
    std::snprintf(name, sizeof name, "%lld x %lld x %lld%s", static_cast<long long>(s.M), static_cast<long long>(s.K),
                  static_cast<long long>(s.N), s.zeros ? " zeros" : "");
    std::printf("%-24s %12.2f %12.2f %10.3f %8s\n", name, gl, gf, gl / gf, gl / gf >= 0.25 ? "met" : "NOT met");
  }
  return 0;
}
