"""Linear-family attention against softmax attention on the CPU, forward and forward+backward,
for T in {1024, 4096, 16384} (B 1, H 8, D 64, float32, causal):

  ours:  normengine.ops.linear_attention / mala_attention / norm_attention (chunked form; backward
         recomputes from q, k, v)
  peer:  torch.nn.functional.scaled_dot_product_attention (is_causal=True)
  also:  the engine's softmax attention over a KV cache (the runner's kernel, forward only: a
         one-layer, one-head-group prefill through normengine.Model is not isolated here, so the
         runner's C++ bench covers it)

Prints medians of --repeats runs and time(16384) / time(1024) per op (linear ops should grow ~16x,
softmax ~256x). Forward+backward of SDPA at 16384 builds a 16384^2 x 8 score matrix per batch
(8 GB in float32): it is skipped above --sdpa-max-bwd tokens and reported as such.

Usage: PYTHONPATH=python python3 benchmarks/compare_attention.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--sdpa-max-bwd", type=int, default=4096)
    a = ap.parse_args()
    import normengine as ne

    torch.set_num_threads(a.threads)
    ne.set_num_threads(a.threads)
    ops = {
        "linear": lambda q, k, v: ne.ops.linear_attention(q, k, v),
        "mala": lambda q, k, v: ne.ops.mala_attention(q, k, v),
        "norm": lambda q, k, v: ne.ops.norm_attention(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                                is_causal=True).transpose(1, 2),
    }
    lengths = [int(x) for x in a.lengths.split(",")]
    res = {}
    print(f"B 1, H {a.heads}, D {a.dim}, float32, causal, {a.threads} threads; median of {a.repeats}")
    print(f"{'op':>7} {'T':>6} {'fwd ms':>10} {'fwd+bwd ms':>11}")
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(1, T, a.heads, a.dim, generator=g) for _ in range(3))
        for name, f in ops.items():
            with torch.no_grad():
                tf = timeit(lambda: f(q, k, v), a.repeats)
            tb = float("nan")
            if name != "sdpa" or T <= a.sdpa_max_bwd:
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))

                def fb():
                    f(qq, kk, vv).sum().backward()

                tb = timeit(fb, a.repeats)
            res[(name, T)] = (tf, tb)
            print(f"{name:>7} {T:>6} {tf * 1e3:>10.1f} {tb * 1e3:>11.1f}", flush=True)
    lo, hi = lengths[0], lengths[-1]
    print(f"\ngrowth time({hi}) / time({lo}), and speed against SDPA (SDPA time / ours) per T:")
    for name in ("linear", "mala", "norm", "sdpa"):
        gf = res[(name, hi)][0] / res[(name, lo)][0]
        gb = res[(name, hi)][1] / res[(name, lo)][1]
        vs = "  ".join(f"T={T}: fwd {res[('sdpa', T)][0] / res[(name, T)][0]:.2f}x, "
                       f"fwd+bwd {res[('sdpa', T)][1] / res[(name, T)][1]:.2f}x" for T in lengths)
        print(f"{name:>7}: fwd {gf:.1f}x, fwd+bwd {gb:.1f}x | {vs}")


if __name__ == "__main__":
    main()
