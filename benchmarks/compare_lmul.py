"""normengine L-Mul matmul against torch.matmul (fp32, MKL / oneDNN sgemm on the CPU; cuBLAS on CUDA):
speed ratios, and the accuracy of the L-Mul result against the exact product.

    PYTHONPATH=python python3 benchmarks/compare_lmul.py [--threads 2] [--repeats 7] [--device cpu|cuda]
                                                         [--bits 4]

Shapes as bench_lmul.cpp: 1024 x 1024 x 1024 and M x 4096 x 4096 for M = 1, 16, 128, 512
(y[M, N] = x[M, K] @ w[K, N]). Both sides use preallocated fp32 operands and the same thread count:
  ours   _C.lmul_bmm(x[None], w^T[None], out[None], bits)   (the entry under normengine.ops.lmul_matmul)
  torch  torch.matmul(x, w, out=out)
Timing: each side runs back to back for >= 20 ms per sample (first call untimed), sides alternate, the
figure is the median of --repeats samples. ratio = ours GFLOP-eq/s / torch GFLOP/s (2 M N K flops).
Also printed: the median relative error |lmul - exact| / |exact| of the outputs (exact = float64 matmul).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normengine
from normengine import _C

SHAPES = [(1024, 1024, 1024), (1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (512, 4096, 4096)]
MIN_SAMPLE_S = 0.02


def sample(fn, sync):
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= MIN_SAMPLE_S:
            return dt / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        normengine.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    stream = torch.cuda.current_stream().cuda_stream if dev.type == "cuda" else 0
    print(f"compare_lmul: device {dev}, isa {_C.cpu_isa()}, threads torch {torch.get_num_threads()} / "
          f"ours {_C.num_threads()}, {args.repeats} repeats (median), mantissa bits {args.bits}")
    print(f"{'M x K x N':<20} {'lmul GF/s':>10} {'torch GF/s':>11} {'ratio':>7} {'median rel err':>13}")
    g = torch.Generator().manual_seed(0)
    for M, K, N in SHAPES:
        x = torch.randn(M, K, generator=g).to(dev)
        w = torch.randn(K, N, generator=g).to(dev)
        wt = w.t().contiguous()
        out_l = torch.empty(1, M, N, device=dev)
        out_t = torch.empty(M, N, device=dev)
        ours = lambda: _C.lmul_bmm(x[None], wt[None], out_l, args.bits, stream)  # noqa: E731
        ref = lambda: torch.matmul(x, w, out=out_t)  # noqa: E731
        tl, tt = [], []
        for _ in range(args.repeats):
            tl.append(sample(ours, sync))
            tt.append(sample(ref, sync))
        flop = 2.0 * M * N * K
        gl, gt = flop / statistics.median(tl) * 1e-9, flop / statistics.median(tt) * 1e-9
        exact = x.double() @ w.double()
        err = ((out_l[0].double() - exact).abs() / exact.abs().clamp_min(1e-30)).median().item()
        print(f"{f'{M} x {K} x {N}':<20} {gl:>10.2f} {gt:>11.2f} {gl / gt:>7.3f} {err:>13.4f}")


if __name__ == "__main__":
    main()
