// bench_norm_linear: norm_linear (norm statistics applied in the GEMM epilogue, norm(x) never
// written) against norm-then-GEMM (the norm kernel writes norm(x), the GEMM reads it), as the runner
// does each, at GPT-2-small shapes (K = 768; N = 2304 q/k/v, 3072 MLP up, 50257 head).
//
//   bench_norm_linear [--threads N] [--repeats K] [--isa avx512|avx2|generic]
//
// Decode (M = 1, 4) with cold caches (W streamed from DRAM, as in a model larger than the L3; the
// eviction happens before each timed call) and prefill (M = 128, warm). The two variants are timed
// interleaved; medians of K runs, and the median of the same-pair time ratios.
#include <algorithm>
#include <chrono>
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

namespace {

using namespace bench;  // bench_common.h

volatile float g_sink;
void flush(const std::vector<float>& scratch) {  // read 128 MB: evicts the 32 MB L3
  std::vector<float> part(64, 0.0f);
  ne::parallel_for(static_cast<int64_t>(scratch.size()) / 16, 4096, [&](int64_t b, int64_t e, int tid) {
    float s = 0;
    for (int64_t i = b; i < e; ++i) s += scratch[i * 16];
    part[tid] += s;
  });
  g_sink = part[0];
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, repeats = 31;
  std::string isa;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--repeats" && i + 1 < argc) repeats = std::atoi(argv[++i]);
    else if (a == "--isa" && i + 1 < argc) isa = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--threads N] [--repeats K] [--isa avx512|avx2|generic]\n", argv[0]);
      return 2;
    }
  }
  if (threads > 0) ne::set_num_threads(threads);
  if (!isa.empty()) ne::force_cpu_isa(isa.c_str());
  const int64_t K = 768, maxN = 50257, maxM = 128;
  std::vector<float> w(static_cast<size_t>(maxN) * K), x(maxM * K), xn(maxM * K), y(maxM * maxN), bias(maxN),
      csum(maxN), mean(maxM), rstd(maxM), scratch(size_t(32) << 20);
  fill(w, 1, 0.02f, 0.0f);
  fill(x, 2, 3.0f, 0.5f);
  fill(bias, 3, 0.02f, 0.0f);
  for (int64_t n = 0; n < maxN; ++n) {
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += w[n * K + k];
    csum[n] = static_cast<float>(s);
  }
  std::printf("normengine bench_norm_linear: isa=%s threads=%d repeats=%d, K=%lld\n", ne::cpu_isa(),
              ne::num_threads(), repeats, static_cast<long long>(K));
  std::printf("%6s %4s %6s %5s %10s %12s %9s\n", "norm", "M", "N", "cold", "fused ms", "norm+gemm ms", "speed-up");
  for (ne::NormKind kind : {ne::NormKind::LayerNorm, ne::NormKind::RMSNorm}) {
    const bool ln = kind == ne::NormKind::LayerNorm;
    for (int64_t M : {int64_t(1), int64_t(4), int64_t(128)}) {
      for (int64_t N : {int64_t(2304), int64_t(3072), maxN}) {
        const bool cold = M <= ne::kGemvMaxRows;
        ne::TensorView xv = ne::TensorView::make(x.data(), ne::DType::F32, {M, K}, ne::Device{}, "x");
        ne::TensorView xnv = ne::TensorView::make(xn.data(), ne::DType::F32, {M, K}, ne::Device{}, "xn");
        ne::TensorView mv = ne::TensorView::make(mean.data(), ne::DType::F32, {M}, ne::Device{}, "mean");
        ne::TensorView rv = ne::TensorView::make(rstd.data(), ne::DType::F32, {M}, ne::Device{}, "rstd");
        // fused: statistics, then the GEMM with the norm in its epilogue (the runner's fused path)
        auto fused = [&] {
          ne::norm_stats(kind, xv, ln ? 1e-5 : 1e-6, ln ? &mv : nullptr, rv);
          ne::GemmEpilogue ep;
          ep.row_scale = rstd.data();
          ep.row_shift = ln ? mean.data() : nullptr;
          ep.col_sum = ln ? csum.data() : nullptr;
          ne::gemm_f32(M, N, K, x.data(), K, w.data(), ne::DType::F32, K, bias.data(), y.data(), N, false, &ep);
        };
        // split: the norm writes norm(x), the GEMM reads it
        auto split = [&] {
          ne::norm_forward(kind, xv, nullptr, nullptr, nullptr, ln ? 1e-5 : 1e-6, xnv, nullptr, nullptr, nullptr);
          ne::gemm_f32(M, N, K, xn.data(), K, w.data(), ne::DType::F32, K, bias.data(), y.data(), N, false);
        };
        fused();
        split();
        std::vector<double> tf, ts, ratio;
        for (int r = 0; r < repeats; ++r) {
          if (cold) flush(scratch);
          const double a = seconds_of(fused);
          if (cold) flush(scratch);
          const double b = seconds_of(split);
          tf.push_back(a);
          ts.push_back(b);
          ratio.push_back(b / a);
        }
        std::printf("%6s %4lld %6lld %5s %10.3f %12.3f %8.3fx\n", ln ? "layer" : "rms", static_cast<long long>(M),
                    static_cast<long long>(N), cold ? "yes" : "no", median(tf) * 1e3, median(ts) * 1e3, median(ratio));
      }
    }
  }
  return 0;
}
