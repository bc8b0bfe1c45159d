"""normengine dense linear against PyTorch (MKL / oneDNN sgemm) on the CPU: speed ratios.

    PYTHONPATH=python python3 benchmarks/compare_gemm_torch.py [--threads 2] [--repeats 11]
                                                               [--gemm-only | --gemv-only]

Both sides write into preallocated outputs, with the same thread count (torch.set_num_threads and
normengine.set_num_threads), no bias:
  ours   _C.linear(x, w, None, out)            (the entry point under normengine.ops.linear)
  torch  torch.matmul(x, w.t(), out=out)       (fp32 weights)
GEMM (M = 16, 128, 512; GPT-2-small prefill shapes), fp32 weights; also ours with bf16 weights
(torch has no fp32 x bf16 matmul, so that column is ours only, its ratio against torch fp32).
GEMV (M = 1; decode), fp32 and bf16 weights; torch's bf16 column is torch.matmul on bf16 x and bf16
weights (bf16 output), for reference.

Timing: each variant runs back to back for >= 20 ms per sample (the first call untimed), variants
round-robin, the figure is the median of --repeats samples. Back-to-back calls keep each side's
worker threads awake, as in a model's forward pass; a 30 ms pause before each sample lets the other
side's spinning threads (libgomp's spin for ~10 ms after a parallel region, our pool's for 0.2 ms)
go idle first, and the sample's first call (untimed) wakes its own. For the GEMV, consecutive calls
cycle through distinct copies of the weight (>= 128 MB in all, 4x the L3), so every call streams its
weight from DRAM, as a decode step does, without a cache flush between calls.
ratio = torch time / our time (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normengine
from normengine import _C

SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]  # (K, N)
GEMV_SHAPES = [(768, 768)] + SHAPES
MIN_SAMPLE_S = 0.02
IDLE_S = 0.03  # libgomp's workers spin ~10 ms after a parallel region (measured here), ours 0.2 ms


def sample(fn) -> float:
    """Seconds per call of fn(i) (i = call index), over >= MIN_SAMPLE_S of back-to-back calls."""
    time.sleep(IDLE_S)  # let the previous variant's spinning workers go idle
    fn(0)
    n, t0 = 0, time.perf_counter()
    while True:
        fn(n)
        n += 1
        t = time.perf_counter() - t0
        if t >= MIN_SAMPLE_S and n >= 2:
            return t / n


def medians(variants: dict, repeats: int) -> dict:
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(sample(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def gemm(args):
    print("\nGEMM (warm caches), GFLOP/s and ratio = torch time / ours")
    print(f"{'M':>4} {'K':>5} {'N':>6} {'torch':>8} {'ours':>8} {'ratio':>6} {'ours-bf16w':>10} {'ratio':>6}")
    for K, N in SHAPES:
        for M in (16, 128, 512):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(M, K, generator=g)
            w = torch.randn(N, K, generator=g)
            wb = w.bfloat16()
            y1, y2, y3 = torch.empty(M, N), torch.empty(M, N), torch.empty(M, N)
            m = medians({
                "torch": lambda i: torch.matmul(x, w.t(), out=y1),
                "ours": lambda i: _C.linear(x, w, None, y2, 0),
                "ours_bf16": lambda i: _C.linear(x, wb, None, y3, 0),
            }, args.repeats)
            assert torch.allclose(y1, y2, rtol=1e-3, atol=1e-3)
            flops = 2.0 * M * N * K
            gf = {k: flops / v / 1e9 for k, v in m.items()}
            print(f"{M:>4} {K:>5} {N:>6} {gf['torch']:>8.1f} {gf['ours']:>8.1f} {m['torch'] / m['ours']:>6.2f} "
                  f"{gf['ours_bf16']:>10.1f} {m['torch'] / m['ours_bf16']:>6.2f}", flush=True)


def gemv(args):
    print("\nGEMV M=1 (weights from DRAM), GB/s of weights and ratio = torch time / ours")
    print(f"{'K':>5} {'N':>6} {'torch':>8} {'ours':>8} {'ratio':>6} {'torch-bf16':>10} {'ours-bf16':>9} {'ratio':>6}")
    for K, N in GEMV_SHAPES:
        g = torch.Generator().manual_seed(0)
        copies = max(2, -(-(128 << 20) // (4 * N * K)))
        ws = [torch.randn(N, K, generator=g) for _ in range(copies)]
        wbs = [w.bfloat16() for w in ws]
        x = torch.randn(1, K, generator=g)
        xb = x.bfloat16()
        y1, y2, y3, y4 = torch.empty(1, N), torch.empty(1, N), torch.empty(1, N, dtype=torch.bfloat16), torch.empty(1, N)
        c = len(ws)
        m = medians({
            "torch": lambda i: torch.matmul(x, ws[i % c].t(), out=y1),
            "ours": lambda i: _C.linear(x, ws[i % c], None, y2, 0),
            "torch_bf16": lambda i: torch.matmul(xb, wbs[i % c].t(), out=y3),
            "ours_bf16": lambda i: _C.linear(x, wbs[i % c], None, y4, 0),
        }, args.repeats)
        b32, b16 = 4.0 * N * K, 2.0 * N * K
        print(f"{K:>5} {N:>6} {b32 / m['torch'] / 1e9:>8.1f} {b32 / m['ours'] / 1e9:>8.1f} "
              f"{m['torch'] / m['ours']:>6.2f} {b16 / m['torch_bf16'] / 1e9:>10.1f} "
              f"{b16 / m['ours_bf16'] / 1e9:>9.1f} {m['torch_bf16'] / m['ours_bf16']:>6.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="threads for both (default: normengine's default)")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--gemm-only", action="store_true")
    p.add_argument("--gemv-only", action="store_true")
    args = p.parse_args()
    threads = args.threads if args.threads > 0 else normengine.num_threads()
    normengine.set_num_threads(threads)
    torch.set_num_threads(threads)
    print(f"normengine {normengine.cpu_isa()} vs torch {torch.__version__}, {threads} threads, "
          f"median of {args.repeats}")
    if not args.gemv_only:
        gemm(args)
    if not args.gemm_only:
        gemv(args)


if __name__ == "__main__":
    main()
