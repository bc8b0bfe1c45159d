"""Quantized GEMMs on the CPU against torch, in one run (issue 5's CPU targets):

  ours   normengine.ops.quantized_linear: int8 (W8A8, every int8 kernel this CPU has: amx,
         avx512vnni, avxvnni, isa = AVX2 vpmaddubsw), int8-weight, int4 (group 128), fp8 (128 blocks)
  peers  torch fp32 F.linear (oneDNN / MKL sgemm), torch's dynamic int8 Linear
         (torch.ao.nn.quantized.dynamic.Linear: fbgemm, per-token activation quantization like ours)

K = N = 4096 by default, M in {1, 16, 128, 512}; x float32 random, weights N(0, 1/K). Every figure is
the median of --repeats calls after a warm-up; ratios are torch time / ours (higher = ours faster).
Calls shorter than 30 ms are timed in bulk (each sample runs back to back for >= 30 ms). Each
measurement starts after a 0.3 s pause, so that the previous engine's spinning worker threads
(torch's OpenMP pool spins after a parallel region) do not compete with the next one's.
Targets (issue 5): int8 >= 2x torch fp32 at M >= 16 and >= torch dynamic int8; int4 at M = 1 >= 3x
torch fp32 GEMV.

Usage: PYTHONPATH=python python3 benchmarks/compare_quant_torch.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats, sample_s=0.03):
    """Median over `repeats` samples of the time per call; each sample runs fn back to back for at
    least sample_s (sub-millisecond calls are timed in bulk: a VM's timer and scheduling noise)."""
    # the previous engine's worker threads (torch's OpenMP pool, ours) spin for a while after their
    # last job and would take this engine's cores on a small machine: let them go to sleep first
    time.sleep(0.3)
    t0 = time.perf_counter()
    fn()
    n = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-6)))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n)
    return 1e3 * statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", default="1,16,128,512")
    a = ap.parse_args()
    import normengine as ne
    from normengine import _C

    torch.set_num_threads(a.threads)
    ne.set_num_threads(a.threads)
    K, N = a.k, a.n
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) / K**0.5
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data.copy_(w)
    dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    qw = {"int8": ne.ops.quantize_weight(w, "int8"), "int8-weight": ne.ops.quantize_weight(w, "int8-weight"),
          "int4-g128": ne.ops.quantize_weight(w, "int4", group_size=128),
          "fp8": ne.ops.quantize_weight(w, "fp8", group_size=128)}
    kernels = _C.int8_kernels()
    print(f"K = {K}, N = {N}, {a.threads} threads, median of {a.repeats}; normengine cpu isa "
          f"{ne.cpu_isa()}, int8 kernels {kernels}; torch {torch.__version__} "
          f"(quantized engine {torch.backends.quantized.engine})\n")
    print("| M | torch fp32 ms | torch dyn int8 ms | " + " | ".join(f"ours int8[{k}] ms" for k in kernels) +
          " | ours int8-weight ms | ours int4-g128 ms | ours fp8 ms | int8 (best) vs fp32 | int8 (best) vs dyn int8 |"
          " int4 vs fp32 |")
    print("|" + "---|" * (9 + len(kernels)))
    for M in [int(m) for m in a.m.split(",")]:
        x = torch.randn(M, K, generator=g)
        out = torch.empty(M, N)
        t_fp32 = median_ms(lambda: torch.matmul(x, w.t(), out=out), a.repeats)
        with torch.no_grad():
            t_dyn = median_ms(lambda: dyn(x), a.repeats)
        t_k = {}
        for k in kernels:
            _C.force_int8_kernel(k)
            t_k[k] = median_ms(lambda: ne.ops.quantized_linear(x, qw["int8"], out=out), a.repeats)
        _C.force_int8_kernel("auto")
        t_o = {f: median_ms(lambda f=f: ne.ops.quantized_linear(x, qw[f], out=out), a.repeats)
               for f in ("int8-weight", "int4-g128", "fp8")}
        best = min(t_k.values())
        print(f"| {M} | {t_fp32:.2f} | {t_dyn:.2f} | " + " | ".join(f"{t_k[k]:.2f}" for k in kernels) +
              f" | {t_o['int8-weight']:.2f} | {t_o['int4-g128']:.2f} | {t_o['fp8']:.2f} | {t_fp32 / best:.2f}x |"
              f" {t_dyn / best:.2f}x | {t_fp32 / t_o['int4-g128']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
