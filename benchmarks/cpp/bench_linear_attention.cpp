// bench_linear_attention: the CPU training kernels of the linear-attention family
// (ne::linear_attention_forward / backward, chunked, cpp/ops/linear_attention_train.cpp), forward and
// forward + backward, for linear attention (elu+1, normalized), MALA and norm attention (RMS out-norm),
// causal, float32, B 1, H 8, D 64, at T = 1024, 4096, 16384.
//
//   bench_linear_attention [--threads N] [--isa avx512|avx2|generic] [--repeats K] [--lengths 1024,4096,16384]
//
// Prints the median of K runs (after one warm-up) in ms, and time(T_max) / time(T_min) per op and
// pass (a linear-time kernel grows like T: 16x from 1024 to 16384; the target is <= 20x).
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
#include "normengine/ops.h"
#include "ops/linear_attention.h"

namespace {

using namespace bench;  // bench_common.h

double median_ms(const std::function<void()>& f, int repeats) {
  f();  // warm-up
  std::vector<double> ts;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, repeats = 5;
  std::vector<int64_t> lengths = {1024, 4096, 16384};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--isa" && i + 1 < argc) ne::force_cpu_isa(argv[++i]);
    else if (a == "--repeats" && i + 1 < argc) repeats = std::max(1, std::atoi(argv[++i]));
    else if (a == "--lengths" && i + 1 < argc) {
      lengths.clear();
      std::string s = argv[++i];
      size_t p = 0;
      while (p < s.size()) {
        size_t q = s.find(',', p);
        lengths.push_back(std::atoll(s.substr(p, q == std::string::npos ? std::string::npos : q - p).c_str()));
        if (q == std::string::npos) break;
        p = q + 1;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--isa avx512|avx2|generic] [--repeats K] [--lengths a,b,c]\n",
                   argv[0]);
      return 2;
    }
  }
  if (threads > 0) ne::set_num_threads(threads);
  const int64_t B = 1, H = 8, D = 64;
  struct Op { const char* name; ne::LinAttnParams p; };
  std::vector<Op> ops(3);
  ops[0].name = "linear";
  ops[0].p.kind = ne::LinAttnKind::Linear;
  ops[1].name = "mala";
  ops[1].p.kind = ne::LinAttnKind::Mala;
  ops[2].name = "norm";
  ops[2].p.kind = ne::LinAttnKind::Norm;
  std::printf("linear-attention training kernels (CPU): B %lld, H %lld, D %lld, float32, causal, ISA %s, %d threads; "
              "median of %d\n", (long long)B, (long long)H, (long long)D, ne::cpu_isa(), ne::num_threads(), repeats);
  std::printf("%8s %7s %10s %12s\n", "op", "T", "fwd ms", "fwd+bwd ms");
  std::vector<std::vector<double>> fwd(ops.size()), fb(ops.size());
  for (int64_t T : lengths) {
    const int64_t n = B * T * H * D, ns = B * H * (D + 1) * (D + 1);
    std::vector<float> q(n), k(n), v(n), o(n), go(n), gq(n), gk(n), gv(n), S(ns), gS(ns);
    fill(q, 1);
    fill(k, 2);
    fill(v, 3);
    fill(go, 4);
    fill(gS, 5);
    using ne::TensorView;
    const ne::DType f32 = ne::DType::F32;
    TensorView vq = TensorView::make(q.data(), f32, {B, T, H, D}), vk = TensorView::make(k.data(), f32, {B, T, H, D}),
               vv = TensorView::make(v.data(), f32, {B, T, H, D}), vo = TensorView::make(o.data(), f32, {B, T, H, D}),
               vgo = TensorView::make(go.data(), f32, {B, T, H, D}),
               vgq = TensorView::make(gq.data(), f32, {B, T, H, D}),
               vgk = TensorView::make(gk.data(), f32, {B, T, H, D}),
               vgv = TensorView::make(gv.data(), f32, {B, T, H, D}),
               vS = TensorView::make(S.data(), f32, {B, H, D + 1, D + 1}),
               vgS = TensorView::make(gS.data(), f32, {B, H, D + 1, D + 1});
    for (size_t i = 0; i < ops.size(); ++i) {
      const ne::LinAttnParams& p = ops[i].p;
      const double tf = median_ms([&] { ne::linear_attention_forward(p, vq, vk, vv, nullptr, nullptr, vo, &vS); },
                                  repeats);
      // forward + backward, as in training: the forward's output, then the backward (which recomputes
      // the chunk states from q, k, v)
      const double tb = median_ms(
          [&] {
            ne::linear_attention_forward(p, vq, vk, vv, nullptr, nullptr, vo, &vS);
            ne::linear_attention_backward(p, vq, vk, vv, nullptr, nullptr, vgo, &vgS, vgq, vgk, vgv, nullptr);
          },
          repeats);
      fwd[i].push_back(tf);
      fb[i].push_back(tb);
      std::printf("%8s %7lld %10.2f %12.2f\n", ops[i].name, (long long)T, tf, tb);
      std::fflush(stdout);
    }
  }
  if (lengths.size() >= 2) {
    std::printf("\ngrowth time(%lld) / time(%lld) (linear in T: %.0fx; target <= 20x at 1024 -> 16384):\n",
                (long long)lengths.back(), (long long)lengths.front(),
                static_cast<double>(lengths.back()) / static_cast<double>(lengths.front()));
    for (size_t i = 0; i < ops.size(); ++i)
      std::printf("%8s  fwd %.1fx  fwd+bwd %.1fx\n", ops[i].name, fwd[i].back() / fwd[i].front(),
                  fb[i].back() / fb[i].front());
  }
  return 0;
}
