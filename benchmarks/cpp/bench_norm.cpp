// bench_norm: CPU throughput of the norm kernels against a multithreaded memcpy of the same traffic.
//
//   bench_norm [--rows R --cols C] [--threads N] [--isa avx512|avx2|generic] [--repeats K]
//
// For each shape (default [4096 x 4096] and [8192 x 1024]), dtype (f32, bf16) and op, prints the
// median time of K runs (after warm-up), the bandwidth of the op's minimal memory traffic (every
// tensor read or written once: x (+ residual) in, y (+ residual_out) out; dy, h in and dx out for
// backward; per-channel/per-row f32 vectors included) and that bandwidth as a percentage of a
// chunked memcpy moving the same bytes (copying traffic/2 bytes reads and writes traffic bytes),
// run on the engine's thread pool and timed interleaved with the op (same threads, same noise).
// Caches are evicted before every timed run, so both stream from DRAM.
//
// Buffers are 64-byte aligned, allocated once for the largest shape and touched before timing:
// glibc maps fresh pages for every allocation >= 32 MB, which would add page faults to each run.
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
#include "normengine/tensor.h"

namespace {

using namespace bench;  // bench_common.h

using ne::DType;
using ne::NormKind;
using ne::TensorView;

// Median seconds of `op` and of `copy`, timed alternately `repeats` times after 2 warm-up rounds,
// each from cold caches.
std::pair<double, double> time_pair(const std::function<void()>& op, const std::function<void()>& copy,
                                    int repeats, const std::function<void()>& flush) {
  for (int i = 0; i < 2; ++i) { op(); copy(); }
  std::vector<double> a, b;
  for (int i = 0; i < repeats; ++i) {
    flush();
    a.push_back(seconds_of(op));
    flush();
    b.push_back(seconds_of(copy));
  }
  return {median(a), median(b)};
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 0, cols = 0;
  int threads = 0, repeats = 9;
  std::string isa;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--rows") rows = arg_int(argc, argv, i);
    else if (a == "--cols") cols = arg_int(argc, argv, i);
    else if (a == "--threads") threads = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--repeats") repeats = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--isa" && i + 1 < argc) isa = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--rows R --cols C] [--threads N] [--isa avx512|avx2|generic] [--repeats K]\n",
                   argv[0]);
      return 2;
    }
  }
  if ((rows > 0) != (cols > 0)) { std::fprintf(stderr, "--rows and --cols go together\n"); return 2; }
  if (repeats < 7) { std::fprintf(stderr, "--repeats: at least 7\n"); return 2; }
  std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 4096}, {8192, 1024}};
  if (rows > 0) shapes = {{rows, cols}};

  try {
    if (threads > 0) ne::set_num_threads(threads);
    if (!isa.empty()) ne::force_cpu_isa(isa.c_str());

    int64_t max_elems = 0, max_rows = 0, max_cols = 0;
    for (auto& s : shapes) {
      max_elems = std::max(max_elems, s.first * s.second);
      max_rows = std::max(max_rows, s.first);
      max_cols = std::max(max_cols, s.second);
    }
    const size_t tb = static_cast<size_t>(max_elems) * 4;  // largest tensor, f32
    Buffer x(tb), res(tb), y(tb), h(tb), dy(tb), dx(tb);
    Buffer w(max_cols * 4), b(max_cols * 4), dw(max_cols * 4), db(max_cols * 4), rstd(max_rows * 4);
    Buffer csrc(2 * tb + 4096), cdst(2 * tb + 4096);  // the largest traffic (add+norm, f32) / 2
    const int64_t kFlush = int64_t(128) << 20;  // 4x the 32 MB L3 of the machine this was written on
    Buffer scratch(kFlush);
    auto flush = [&] { flush_caches(scratch); };
    fill(w.p, DType::F32, max_cols, 7);
    fill(b.p, DType::F32, max_cols, 8);
    std::memset(csrc.p, 1, 2 * tb);

    std::printf("normengine bench_norm: isa=%s threads=%d repeats=%d (median)\n", ne::cpu_isa(),
                ne::num_threads(), repeats);
    std::printf("%-15s %-3s %-12s %-5s %9s %8s %9s %7s\n", "op", "dir", "shape", "dtype", "ms", "GB/s",
                "copyGB/s", "%copy");

    for (auto [R, C] : shapes) {
      for (DType dt : {DType::F32, DType::BF16}) {
        const int64_t es = ne::dtype_size(dt);
        const double E = static_cast<double>(R * C * es);  // bytes of one tensor
        fill(x.p, dt, R * C, 1);
        fill(res.p, dt, R * C, 2);
        fill(dy.p, dt, R * C, 3);
        auto mat = [&](Buffer& buf, const char* name) { return TensorView::make(buf.p, dt, {R, C}, {}, name); };
        auto vec = [&](Buffer& buf, int64_t n, const char* name) {
          return TensorView::make(buf.p, DType::F32, {n}, {}, name);
        };
        TensorView vx = mat(x, "x"), vr = mat(res, "residual"), vy = mat(y, "y"), vh = mat(h, "residual_out"),
                   vdy = mat(dy, "dy"), vdx = mat(dx, "dx");
        TensorView vw = vec(w, C, "weight"), vb = vec(b, C, "bias"), vdw = vec(dw, C, "dweight"),
                   vdb = vec(db, C, "dbias"), vrstd = vec(rstd, R, "rstd");
        const double V = C * 4.0;  // one per-channel f32 vector

        struct Case {
          const char* name;
          const char* dir;
          double bytes;
          std::function<void()> run;
        };
        auto fwd = [&](NormKind k, bool add, bool bias) {
          return [&, k, add, bias] {
            ne::norm_forward(k, vx, add ? &vr : nullptr, &vw, bias ? &vb : nullptr, 1e-5, vy, add ? &vh : nullptr,
                             nullptr, nullptr);
          };
        };
        auto bwd = [&](NormKind k, bool bias) {
          return [&, k, bias] {
            ne::norm_backward(k, vdy, vx, &vw, vrstd, nullptr, vdx, &vdw, bias ? &vdb : nullptr);
          };
        };
        std::vector<Case> cases = {
            {"layer_norm", "fwd", 2 * E + 2 * V, fwd(NormKind::LayerNorm, false, true)},
            {"rms_norm", "fwd", 2 * E + V, fwd(NormKind::RMSNorm, false, false)},
            {"crms_norm", "fwd", 2 * E + V, fwd(NormKind::CRMSNorm, false, false)},
            {"add_layer_norm", "fwd", 4 * E + 2 * V, fwd(NormKind::LayerNorm, true, true)},
            {"add_rms_norm", "fwd", 4 * E + V, fwd(NormKind::RMSNorm, true, false)},
            // dy, h, rstd, weight in; dx, dweight (, dbias) out
            {"layer_norm", "bwd", 3 * E + R * 4.0 + 3 * V, bwd(NormKind::LayerNorm, true)},
            {"rms_norm", "bwd", 3 * E + R * 4.0 + 2 * V, bwd(NormKind::RMSNorm, false)},
        };
        for (auto& c : cases) {
          if (std::strcmp(c.dir, "bwd") == 0) {  // the rstd the backward reads, from a real forward
            NormKind k = std::strcmp(c.name, "layer_norm") == 0 ? NormKind::LayerNorm : NormKind::RMSNorm;
            ne::norm_forward(k, vx, nullptr, &vw, nullptr, 1e-5, vy, nullptr, nullptr, &vrstd);
          }
          const int64_t cbytes = static_cast<int64_t>(c.bytes / 2) / 64 * 64;
          auto copy = [&] { parallel_memcpy(cdst.p, csrc.p, cbytes); };
          auto [t_op, t_copy] = time_pair(c.run, copy, repeats, flush);
          const double gbs = c.bytes / t_op / 1e9, cgbs = 2.0 * cbytes / t_copy / 1e9;
          char shape[32];
          std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(R), static_cast<long long>(C));
          std::printf("%-15s %-3s %-12s %-5s %9.3f %8.1f %9.1f %6.1f%%\n", c.name, c.dir, shape,
                      dt == DType::F32 ? "f32" : "bf16", t_op * 1e3, gbs, cgbs, 100.0 * gbs / cgbs);
          std::fflush(stdout);
        }
      }
    }
  } catch (const ne::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
