"""normengine dense linear against PyTorch (MKL / oneDNN sgemm) on the CPU: speed ratios.

    PYTHONPATH=python python3 benchmarks/compare_gemm_torch.py [--threads 2] [--repeats 15]
                                                               [--gemm-only | --gemv-only]

Both sides write into preallocated outputs, with the same thread count (torch.set_num_threads and
normengine.set_num_threads), no bias:
  ours   _C.linear(x, w, None, out)            (the entry point under normengine.ops.linear)
  torch  torch.matmul(x, w.t(), out=out)       (fp32 weights)
GEMM (M = 16, 128, 512; GPT-2-small prefill shapes): warm caches, fp32 weights; also ours with bf16
weights (torch has no fp32 x bf16 matmul, so that row is ours only, ratio against torch fp32).
GEMV (M = 1; decode): every call from cold caches (a 128 MB read first), fp32 and bf16 weights;
torch's bf16 row is F.linear on bf16 x and bf16 weights (bf16 output), for reference.
Variants are timed round-robin and each figure is the median of --repeats calls.
ratio = torch time / our time (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import normengine
from normengine import _C

SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]  # (K, N)
GEMV_SHAPES = [(768, 768)] + SHAPES


class Timer:
    def __init__(self, repeats: int, cold: bool):
        self.repeats, self.cold = repeats, cold
        self.scratch = torch.empty(32 << 20, dtype=torch.float32)  # 128 MB: 4x the L3

    def medians(self, variants: dict) -> dict:
        for fn in variants.values():  # warm-up
            fn()
            fn()
        times = {k: [] for k in variants}
        for _ in range(self.repeats):
            for k, fn in variants.items():
                if self.cold:
                    self.scratch.sum()
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in times.items()}


def gemm(args):
    t = Timer(args.repeats, cold=False)
    print(f"\nGEMM (warm caches), GFLOP/s and ratio = torch time / ours")
    print(f"{'M':>4} {'K':>5} {'N':>6} {'torch':>8} {'ours':>8} {'ratio':>6} {'ours-bf16w':>10} {'ratio':>6}")
    for K, N in SHAPES:
        for M in (16, 128, 512):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(M, K, generator=g)
            w = torch.randn(N, K, generator=g)
            wb = w.bfloat16()
            y1, y2, y3 = torch.empty(M, N), torch.empty(M, N), torch.empty(M, N)
            flops = 2.0 * M * N * K
            reps = t.repeats if flops < 2e10 else max(5, t.repeats // 3)
            t.repeats, saved = reps, t.repeats
            m = t.medians({
                "torch": lambda: torch.matmul(x, w.t(), out=y1),
                "ours": lambda: _C.linear(x, w, None, y2, 0),
                "ours_bf16": lambda: _C.linear(x, wb, None, y3, 0),
            })
            t.repeats = saved
            assert torch.allclose(y1, y2, rtol=1e-3, atol=1e-3)
            gf = {k: flops / v / 1e9 for k, v in m.items()}
            print(f"{M:>4} {K:>5} {N:>6} {gf['torch']:>8.1f} {gf['ours']:>8.1f} {m['torch'] / m['ours']:>6.2f} "
                  f"{gf['ours_bf16']:>10.1f} {m['torch'] / m['ours_bf16']:>6.2f}", flush=True)


def gemv(args):
    t = Timer(args.repeats, cold=True)
    print(f"\nGEMV M=1 (cold caches), GB/s of weights and ratio = torch time / ours")
    print(f"{'K':>5} {'N':>6} {'torch':>8} {'ours':>8} {'ratio':>6} {'torch-bf16':>10} {'ours-bf16':>9} {'ratio':>6}")
    for K, N in GEMV_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, K, generator=g)
        w = torch.randn(N, K, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        y1, y2, y4 = torch.empty(1, N), torch.empty(1, N), torch.empty(1, N)
        m = t.medians({
            "torch": lambda: torch.matmul(x, w.t(), out=y1),
            "ours": lambda: _C.linear(x, w, None, y2, 0),
            "torch_bf16": lambda: F.linear(xb, wb),
            "ours_bf16": lambda: _C.linear(x, wb, None, y4, 0),
        })
        b32, b16 = 4.0 * N * K, 2.0 * N * K
        print(f"{K:>5} {N:>6} {b32 / m['torch'] / 1e9:>8.1f} {b32 / m['ours'] / 1e9:>8.1f} "
              f"{m['torch'] / m['ours']:>6.2f} {b16 / m['torch_bf16'] / 1e9:>10.1f} "
              f"{b16 / m['ours_bf16'] / 1e9:>9.1f} {m['torch_bf16'] / m['ours_bf16']:>6.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="threads for both (default: normengine's default)")
    p.add_argument("--repeats", type=int, default=15)
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
