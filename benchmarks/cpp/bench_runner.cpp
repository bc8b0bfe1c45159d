// bench_runner: end-to-end CPU throughput of the native transformer runner (ne::Runner), no Python.
//
//   bench_runner [--arch gpt2|llama] [--dtype f32|bf16|f16] [--threads N] [--repeats K]
//                [--prompt P] [--gen G] [--profile] [--small-pages] [--folded]
//
// Builds a random-weight model of the given shape, every weight in one arena allocated (and
// touched) once, on transparent huge pages as normengine.load places a model's weights
// (--small-pages: 4 KiB pages, for the comparison):
//   gpt2:  12 layers, d 768, 12 heads (head_dim 64), d_ff 3072, vocab 50257, learned positions
//          (1024), LayerNorm, gelu_tanh, biases everywhere, tied head (lm_head IS the tok_emb buffer).
//   llama: 12 layers, d 768, 12 heads, 4 KV heads, head_dim 64, d_ff 2048, vocab 32000, RoPE,
//          RMSNorm, SwiGLU, no biases, untied head.
// Linear weights and embeddings in --dtype, norm gains and biases in f32 (as the runner reads them):
// gains 1 + 0.1 u, biases 0.01 u (u uniform), so every norm runs as its own pass; --folded: gains 1 and
// biases 0, as normengine.load leaves them after folding them into the linear layers, so the runner
// applies every norm inside the following GEMM (the fused path a loaded model takes).
//
// Timed (median of K repeats after one warm-up run):
//   prefill: one forward of a P-token prompt (P = 128) into an empty KV cache slot;
//   decode:  G (= 64) greedy one-token steps after that prompt (argmax of the logits fed back).
// Decode is also shown as a percentage of the memory-bandwidth bound: the weight bytes one decode
// step has to read (every linear weight, the head, norms, biases; one embedding row) over the
// bandwidth of a multithreaded memcpy on the engine's pool (ne::parallel_for), 256 MB copied,
// counting its read and write traffic, measured interleaved with the decode runs in this process.
//
// --profile: where a decode step's time goes. Times (cold caches, median of K) the GEMV of every
// weight of layer 0 and of the head alone via ne::gemm_f32, the attention kernel over a KV cache at
// the mean decode position (cold and warm), the activation and one norm row, and the pool's
// fork/join cost (an empty parallel_for), and sets 12 x layer + head + those against the measured
// decode step.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include "bench_common.h"
#include "core/half.h"
#include "core/parallel.h"
#include "normengine/model.h"
#include "normengine/ops.h"
#include "ops/attention.h"
#include "ops/gemm.h"

namespace {

using namespace bench;  // bench_common.h

using ne::DType;

long vm_hwm_kb() {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  long kb = -1;
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "VmHWM:", 6) == 0) kb = std::atol(line + 6);
  std::fclose(f);
  return kb;
}

// CPU time used by the whole machine (non-idle, all cores) and by this process, in clock ticks:
// their difference over a timed stretch is what other processes took from us.
long long machine_busy_ticks() {
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return -1;
  long long v[10] = {0};
  int n = std::fscanf(f, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                      &v[6], &v[7]);
  std::fclose(f);
  return n == 8 ? v[0] + v[1] + v[2] + v[5] + v[6] + v[7] : -1;  // user nice system (idle iowait) irq softirq steal
}
long long self_ticks() {
  FILE* f = std::fopen("/proc/self/stat", "r");
  if (!f) return -1;
  char buf[2048];
  size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* p = std::strrchr(buf, ')');
  if (!p) return -1;
  long long ut = 0, st = 0;
  // after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
  if (std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lld %lld", &ut, &st) != 2) return -1;
  return ut + st;
}

struct TensorDef {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype;
  float scale, offset;
  bool per_token;  // read whole by every decode step (counts in the bandwidth bound)
  size_t off = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * ne::dtype_size(dtype); }
};

ne::TensorView view_of(const TensorDef& t, char* base) {
  ne::TensorView v;
  v.data = base + t.off;
  v.dtype = t.dtype;
  v.ndim = static_cast<int>(t.shape.size());
  int64_t st = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = t.shape[d];
    v.strides[d] = st;
    st *= t.shape[d];
  }
  v.name = t.name.c_str();
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, repeats = 7, prompt = 128, gen = 64;
  bool profile = false, medium = false;
  std::string arch = "gpt2", dts = "f32";
  bool kv_bf16 = false, kv_int8 = false;
  bool small_pages = false;  // --small-pages: the weights on 4 KiB pages (no MADV_HUGEPAGE)
  bool folded = false;       // --folded: unit gains, zero biases (the fused-norm path)
  int lmul_bits = 0;         // --lmul M: every attention product an M-bit L-Mul (lmul_scope "attention")
  bool lmul_all = false;     // --lmul-all: every matmul's products too (lmul_scope "all"; f32 weights)
  int window = 0;            // --window W: every layer a sliding-window layer of W keys (spec.window)
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads") threads = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--repeats") repeats = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--prompt") prompt = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--gen") gen = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--arch" && i + 1 < argc) arch = argv[++i];
    else if (a == "--dtype" && i + 1 < argc) dts = argv[++i];
    else if (a == "--profile") profile = true;
    else if (a == "--kv-bf16") kv_bf16 = true;
    else if (a == "--kv-int8") kv_int8 = true;
    else if (a == "--small-pages") small_pages = true;
    else if (a == "--folded") folded = true;
    else if (a == "--lmul") lmul_bits = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--lmul-all") lmul_all = true;
    else if (a == "--window") window = static_cast<int>(arg_int(argc, argv, i));
    else if (a == "--matmul-precision" && i + 1 < argc && (std::string(argv[i + 1]) == "medium" ||
                                                            std::string(argv[i + 1]) == "highest"))
      medium = std::string(argv[++i]) == "medium";
    else {
      std::fprintf(stderr, "usage: %s [--arch gpt2|llama] [--dtype f32|bf16|f16] [--threads N] [--repeats K] "
                   "[--prompt P] [--gen G] [--profile] [--matmul-precision highest|medium] [--kv-bf16 | --kv-int8] "
                   "[--small-pages] [--folded] [--lmul BITS [--lmul-all]] [--window W]\n", argv[0]);
      return 2;
    }
  }
  if (arch != "gpt2" && arch != "llama") { std::fprintf(stderr, "--arch: gpt2 or llama\n"); return 2; }
  DType wdt;
  if (dts == "f32") wdt = DType::F32;
  else if (dts == "bf16") wdt = DType::BF16;
  else if (dts == "f16") wdt = DType::F16;
  else { std::fprintf(stderr, "--dtype: f32, bf16 or f16\n"); return 2; }
  if (repeats < 1 || prompt < 1 || gen < 1) { std::fprintf(stderr, "--repeats/--prompt/--gen: >= 1\n"); return 2; }
  if (window < 0) { std::fprintf(stderr, "--window: >= 0\n"); return 2; }

  try {
    if (threads > 0) ne::set_num_threads(threads);
    const bool gpt2 = arch == "gpt2";
    ne::ModelSpec s;
    s.bf16_products = medium;  // "medium": prefill projections on AMX-BF16 tiles where the CPU has them
    s.kv_bf16 = kv_bf16;       // KV cache in bfloat16
    s.kv_int8 = kv_int8;       // or in int8 with a scale per head row
    if (lmul_bits > 0) s.lmul_scope = lmul_all ? 2 : 1, s.lmul_bits = lmul_bits;
    if (gpt2) {
      s.vocab = 50257; s.d_model = 768; s.n_layers = 12; s.n_heads = 12; s.n_kv_heads = 12; s.head_dim = 64;
      s.d_ff = 3072; s.max_seq_len = 1024; s.norm = 0; s.norm_eps = 1e-5; s.activation = 0; s.gated_mlp = false;
      s.learned_pos = true; s.qkv_bias = s.o_bias = s.mlp_bias = true; s.head_bias = false;
    } else {
      s.vocab = 32000; s.d_model = 768; s.n_layers = 12; s.n_heads = 12; s.n_kv_heads = 4; s.head_dim = 64;
      s.d_ff = 2048; s.max_seq_len = 2048; s.norm = 1; s.norm_eps = 1e-5; s.activation = 2; s.gated_mlp = true;
      s.learned_pos = false; s.rope_theta = 10000.0;
    }
    if (window > 0) s.window.assign(s.n_layers, window);
    const int64_t d = s.d_model, dq = int64_t(s.n_heads) * s.head_dim, dkv = int64_t(s.n_kv_heads) * s.head_dim,
                  f = s.d_ff, V = s.vocab;
    const float ws = 0.02f;  // GPT-2's init std, roughly: keeps activations finite over 12 layers

    // ---- the tensor list, then one arena holding them all
    std::vector<TensorDef> defs;
    auto add = [&](const std::string& n, std::vector<int64_t> shape, DType dt, float scale, float offset,
                   bool per_token) { defs.push_back({n, std::move(shape), dt, scale, offset, per_token}); };
    add("tok_emb.weight", {V, d}, wdt, ws, 0.f, gpt2);  // tied: read whole by the head each step
    if (gpt2) add("pos_emb.weight", {s.max_seq_len, d}, wdt, 0.01f, 0.f, false);
    auto norm = [&](const std::string& p) {
      add(p + ".weight", {d}, DType::F32, folded ? 0.f : 0.1f, 1.f, true);
      if (s.norm == 0) add(p + ".bias", {d}, DType::F32, folded ? 0.f : 0.01f, 0.f, true);
    };
    for (int i = 0; i < s.n_layers; ++i) {
      const std::string p = "blocks." + std::to_string(i);
      norm(p + ".attn_norm");
      add(p + ".attn.q.weight", {dq, d}, wdt, ws, 0.f, true);
      add(p + ".attn.k.weight", {dkv, d}, wdt, ws, 0.f, true);
      add(p + ".attn.v.weight", {dkv, d}, wdt, ws, 0.f, true);
      add(p + ".attn.o.weight", {d, dq}, wdt, ws, 0.f, true);
      if (s.qkv_bias) {
        add(p + ".attn.q.bias", {dq}, DType::F32, 0.01f, 0.f, true);
        add(p + ".attn.k.bias", {dkv}, DType::F32, 0.01f, 0.f, true);
        add(p + ".attn.v.bias", {dkv}, DType::F32, 0.01f, 0.f, true);
      }
      if (s.o_bias) add(p + ".attn.o.bias", {d}, DType::F32, 0.01f, 0.f, true);
      norm(p + ".mlp_norm");
      add(p + ".mlp.up.weight", {f, d}, wdt, ws, 0.f, true);
      if (s.gated_mlp) add(p + ".mlp.gate.weight", {f, d}, wdt, ws, 0.f, true);
      add(p + ".mlp.down.weight", {d, f}, wdt, ws, 0.f, true);
      if (s.mlp_bias) {
        add(p + ".mlp.up.bias", {f}, DType::F32, 0.01f, 0.f, true);
        add(p + ".mlp.down.bias", {d}, DType::F32, 0.01f, 0.f, true);
      }
    }
    norm("final_norm");
    if (!gpt2) add("lm_head.weight", {V, d}, wdt, ws, 0.f, true);

    size_t total = 0, per_token = 0;
    for (auto& t : defs) {
      t.off = total;
      total += (t.bytes() + 63) / 64 * 64;
      if (t.per_token) per_token += t.bytes();
    }
    per_token += static_cast<size_t>(d) * ne::dtype_size(wdt) * (gpt2 ? 2 : 1);  // one embedding (+ position) row
    Buffer arena(total, /*huge=*/!small_pages);  // huge pages, as normengine.load places the weights
    for (size_t i = 0; i < defs.size(); ++i)
      fill(arena.p + defs[i].off, defs[i].dtype, defs[i].numel(), i + 1, defs[i].scale, defs[i].offset);

    const int ctx = prompt + gen;
    ne::Runner runner(s, 1, ctx);
    for (auto& t : defs) runner.set_tensor(t.name, view_of(t, arena.p));
    if (gpt2) {
      // tied head: the very tok_emb buffer
      const TensorDef& e = defs[0];
      TensorDef h = e;
      h.name = "lm_head.weight";
      runner.set_tensor("lm_head.weight", view_of(h, arena.p));
    }
    runner.finalize();

    std::vector<int32_t> ids(prompt);
    std::mt19937_64 rng(1234);
    for (auto& t : ids) t = static_cast<int32_t>(rng() % static_cast<uint64_t>(V));
    std::vector<float> logits(V);
    const int32_t slot = 0;
    std::vector<int32_t> generated(gen);

    auto do_prefill = [&] {
      runner.reset(slot);
      const int32_t len = prompt;
      runner.forward(1, &slot, ids.data(), &len, logits.data(), false);
    };
    ne::SamplingParams greedy;
    auto do_decode = [&] {
      const int32_t one = 1;
      int32_t tok = ne::sample_token(logits.data(), s.vocab, greedy, rng);
      for (int i = 0; i < gen; ++i) {
        runner.forward(1, &slot, &tok, &one, logits.data(), false);
        generated[i] = tok;
        tok = ne::sample_token(logits.data(), s.vocab, greedy, rng);
      }
    };

    std::printf("normengine bench_runner: arch=%s dtype=%s isa=%s threads=%d repeats=%d (median) "
                "prompt=%d gen=%d matmul_precision=%s%s", arch.c_str(), dts.c_str(), ne::cpu_isa(), ne::num_threads(),
                repeats, prompt, gen, medium ? "medium" : "highest",
                medium && !ne::amx_bf16_available() ? " (no AMX-BF16 here: computes as highest)" : "");
    if (lmul_bits > 0) std::printf(" lmul=%d bits, scope %s", lmul_bits, lmul_all ? "all" : "attention");
    if (window > 0) std::printf(" sliding window=%d", window);
    std::printf("\n");
    std::printf("weights: %.1f MB in the arena (%s pages); %.1f MB read per decode step; norms %s\n", total / 1e6,
                small_pages ? "4 KiB" : "huge", per_token / 1e6,
                runner.fused_norms() ? "fused into the GEMMs (--folded)" : "as their own passes");
    std::fflush(stdout);

    // warm-up (every activation buffer and the KV cache reach their size), then the engine's peak RSS
    do_prefill();
    do_decode();
    const long hwm_engine = vm_hwm_kb();

    // copy bandwidth buffers: 256 MB copied (512 MB of traffic)
    const int64_t cbytes = int64_t(256) << 20;
    Buffer csrc(cbytes), cdst(cbytes);
    std::memset(csrc.p, 1, cbytes);
    auto copy = [&] { parallel_memcpy(cdst.p, csrc.p, cbytes); };
    auto read = [&] { parallel_read(csrc.p, cbytes); };
    copy();
    read();
    std::vector<double> tp, td, tc, tr;
    const long long mb0 = machine_busy_ticks(), sb0 = self_ticks();
    const double tw0 = now_s();
    for (int r = 0; r < repeats; ++r) {
      tp.push_back(seconds_of(do_prefill));
      td.push_back(seconds_of(do_decode));
      tc.push_back(seconds_of(copy));
      tr.push_back(seconds_of(read));
    }
    const double others = static_cast<double>((machine_busy_ticks() - mb0) - (self_ticks() - sb0)) /
                          static_cast<double>(sysconf(_SC_CLK_TCK)) / (now_s() - tw0);
    const double p = median(tp), dd = median(td), c = median(tc);
    const double bw = 2.0 * cbytes / c;                 // bytes/s of traffic
    const double step = dd / gen;                       // s per decode token
    const double bound_step = per_token / bw;           // s per token if only weights streamed at bw
    std::printf("prefill  %4d tok: %9.2f ms  %9.1f tok/s\n", prompt, p * 1e3, prompt / p);
    std::printf("decode   %4d tok: %9.2f ms  %9.1f tok/s  (%.3f ms/token)\n", gen, dd * 1e3, gen / dd, step * 1e3);
    std::printf("copy bandwidth:   %9.1f GB/s (memcpy of %lld MB on the pool, read + write)\n", bw / 1e9,
                static_cast<long long>(cbytes >> 20));
    std::vector<double> paired;
    for (int r = 0; r < repeats; ++r) paired.push_back(100.0 * (per_token * tc[r] / (2.0 * cbytes)) / (td[r] / gen));
    std::printf("bandwidth bound:  %9.1f tok/s  -> decode at %.1f%% of the bound (%.1f%%: median over repeats "
                "against the copy timed right after each)\n", 1.0 / bound_step, 100.0 * bound_step / step,
                median(paired));
    const double rbw = cbytes / median(tr);
    std::printf("(read-only stream: %.1f GB/s; decode streams its weights at %.1f GB/s = %.1f%% of that)\n",
                rbw / 1e9, per_token / step / 1e9, 100.0 * per_token / step / rbw);
    std::printf("other processes used %.2f cores on average while this was timed (0: the machine was ours)\n",
                others);
    std::printf("spread: prefill min/max %.2f/%.2f ms, decode min/max %.2f/%.2f ms\n",
                *std::min_element(tp.begin(), tp.end()) * 1e3, *std::max_element(tp.begin(), tp.end()) * 1e3,
                *std::min_element(td.begin(), td.end()) * 1e3, *std::max_element(td.begin(), td.end()) * 1e3);
    std::printf("peak RSS (VmHWM) after warm-up, before the copy buffers: %.1f MB = %.2f x the weights (%.1f MB)\n",
                hwm_engine * 1.024 / 1e3, hwm_engine * 1024.0 / total, total / 1e6);
    std::fflush(stdout);

    if (profile) {
      // ---- per-GEMV cost, cold caches, as in a decode step of a model much larger than the L3
      Buffer scratch(int64_t(128) << 20);
      std::vector<float> x(std::max<int64_t>(f, dq) + 64, 0.01f), y(V + 64);
      auto find = [&](const std::string& n) -> const TensorDef& {
        for (auto& t : defs) if (t.name == n) return t;
        std::fprintf(stderr, "no tensor %s\n", n.c_str());
        std::exit(1);
      };
      auto gemv_time = [&](const TensorDef& t) {
        const int64_t N = t.shape[0], K = t.shape[1];
        auto op = [&] { ne::gemm_f32(1, N, K, x.data(), K, arena.p + t.off, t.dtype, K, nullptr, y.data(), N); };
        op();
        std::vector<double> a;
        for (int r = 0; r < std::max(repeats, 5); ++r) {
          flush_caches(scratch);
          a.push_back(seconds_of(op));
        }
        return median(a);
      };
      std::printf("\nprofile: GEMV (M = 1, cold caches) per weight; bytes / time vs copy bandwidth\n");
      std::printf("%-22s %6s %6s %9s %8s %7s\n", "weight", "N", "K", "us", "GB/s", "%copy");
      std::vector<std::string> names = {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight",
                                        "blocks.0.attn.o.weight", "blocks.0.mlp.up.weight"};
      if (s.gated_mlp) names.push_back("blocks.0.mlp.gate.weight");
      names.push_back("blocks.0.mlp.down.weight");
      double layer = 0;
      for (auto& n : names) {
        const TensorDef& t = find(n);
        double tt = gemv_time(t);
        layer += tt;
        std::printf("%-22s %6lld %6lld %9.1f %8.1f %6.1f%%\n", n.c_str() + 9, static_cast<long long>(t.shape[0]),
                    static_cast<long long>(t.shape[1]), tt * 1e6, t.bytes() / tt / 1e9, 100.0 * t.bytes() / tt / bw);
      }
      const TensorDef& head = gpt2 ? find("tok_emb.weight") : find("lm_head.weight");
      double th = gemv_time(head);
      std::printf("%-22s %6lld %6lld %9.1f %8.1f %6.1f%%\n", "lm_head", static_cast<long long>(head.shape[0]),
                  static_cast<long long>(head.shape[1]), th * 1e6, head.bytes() / th / 1e9,
                  100.0 * head.bytes() / th / bw);
      const double blocks = layer * s.n_layers, sum = blocks + th;

      // ---- the other per-layer kernels of a decode step, at the mean decode position
      const ne::AttentionTable& AK = *NE_PICK_ISA(attention_table);
      const int32_t apos = prompt + gen / 2;
      std::vector<float> kc(static_cast<size_t>(ctx) * dkv, 0.01f), vc(static_cast<size_t>(ctx) * dkv, 0.02f);
      std::vector<float> q1(dq, 0.1f), o1(dq);
      for (size_t i = 0; i < kc.size(); ++i) { kc[i] = rnd(77, i); vc[i] = rnd(78, i); }
      const float* kp = kc.data();
      const float* vp = vc.data();
      auto attn = [&] {
        ne::AttnArgs aa{1, q1.data(), dq, o1.data(), dq, &kp, &vp, &apos, s.n_heads, s.n_kv_heads, s.head_dim,
                        0.125f};
        AK.attention(aa);
      };
      auto timed = [&](const std::function<void()>& op, bool cold) {
        op();
        std::vector<double> a;
        for (int r = 0; r < std::max(repeats, 5) * 3; ++r) {
          if (cold) flush_caches(scratch);
          a.push_back(seconds_of(op));
        }
        return median(a);
      };
      const double t_attn_cold = timed(attn, true), t_attn_warm = timed(attn, false);
      std::vector<float> xa(f), xb(f), xo(f), nw(d, 1.f), nb(d, 0.f), xr(d, 0.5f), yr(d);
      for (int64_t i = 0; i < f; ++i) { xa[i] = rnd(5, i); xb[i] = rnd(6, i); }
      auto act = [&] {
        AK.activation({static_cast<ne::Act>(s.activation), 1, f, xa.data(), f, s.gated_mlp ? xb.data() : nullptr,
                       s.gated_mlp ? f : 0, xo.data(), f});
      };
      auto nrm = [&] {
        ne::TensorView xv = ne::TensorView::make(xr.data(), DType::F32, {1, d});
        ne::TensorView yv = ne::TensorView::make(yr.data(), DType::F32, {1, d});
        ne::TensorView wv = ne::TensorView::make(nw.data(), DType::F32, {d});
        ne::TensorView bv = ne::TensorView::make(nb.data(), DType::F32, {d});
        ne::norm_forward(static_cast<ne::NormKind>(s.norm), xv, nullptr, &wv, s.norm == 0 ? &bv : nullptr,
                         s.norm_eps, yv, nullptr, nullptr, nullptr);
      };
      const double t_act = timed(act, false), t_norm = timed(nrm, false);
      // the pool's fork/join cost: an empty parallel_for over every thread
      auto empty = [&] {
        for (int i = 0; i < 1000; ++i) ne::parallel_for(ne::num_threads(), 1, [](int64_t, int64_t, int) {});
      };
      const double t_fork = timed(empty, false) / 1000;
      // parallel regions per decode step: q, k, v, attention, o, up, (gate), down per layer + head (+ rope)
      const int regions_per_layer = (s.gated_mlp ? 8 : 7) + (s.learned_pos ? 0 : 2);
      const int regions = s.n_layers * regions_per_layer + 1;
      const double t_other = s.n_layers * (t_attn_cold + t_act + 2 * t_norm);
      std::printf("%-22s %27.1f us cold, %.1f us warm (position %d, %d heads over %d KV heads)\n", "attention",
                  t_attn_cold * 1e6, t_attn_warm * 1e6, apos, s.n_heads, s.n_kv_heads);
      std::printf("%-22s %27.1f us\n", s.gated_mlp ? "silu(gate) * up" : "gelu_tanh(up)", t_act * 1e6);
      std::printf("%-22s %27.1f us\n", s.norm == 0 ? "layernorm (1 x 768)" : "rmsnorm (1 x 768)", t_norm * 1e6);
      std::printf("%-22s %27.1f us per parallel_for (empty, %d threads)\n", "pool fork/join", t_fork * 1e6,
                  ne::num_threads());

      std::printf("\ndecode step %.3f ms:\n", step * 1e3);
      std::printf("  blocks' GEMVs       %7.3f ms (%5.1f%%)  12 x layer 0's, cold\n", blocks * 1e3, 100 * blocks / step);
      std::printf("  head GEMV           %7.3f ms (%5.1f%%)\n", th * 1e3, 100 * th / step);
      std::printf("  attention+act+norms %7.3f ms (%5.1f%%)  attention cold\n", t_other * 1e3, 100 * t_other / step);
      std::printf("  fork/join floor     %7.3f ms (%5.1f%%)  %d parallel regions x the empty-region cost\n",
                  regions * t_fork * 1e3, 100 * regions * t_fork / step, regions);
      const double rest = step - sum - t_other - regions * t_fork;
      std::printf("  unexplained         %7.3f ms (%5.1f%%)  (embedding, KV writes, argmax, in-step effects)\n",
                  rest * 1e3, 100 * rest / step);
      std::printf("GEMVs alone at %.1f%% of the copy bandwidth; the step's bound is %.3f ms\n",
                  100.0 * bound_step / sum, bound_step * 1e3);
    }
    std::printf("(checksum: last token %d)\n", generated[gen - 1]);
  } catch (const ne::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
