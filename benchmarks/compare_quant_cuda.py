"""Quantized GEMMs on CUDA (cuda/quant_gemm.cu) against cuBLAS bf16 (torch.matmul, x @ W^T with W
[N, K] bf16). Prefill/GEMM shapes (default 8192 x 8192 x 8192: the issue's target, int8 and fp8 at least
1.6x cuBLAS bf16) and decode shapes (M = 1: memory bound, also reported as GB/s of packed weight bytes).
Our time includes the activation quantization (one extra kernel), as a real call would. Prints medians
of --repeats timings (CUDA events) and speedups (peer time / our time; > 1 is faster). On an sm_90 GPU the
int8 / fp8 rows with M > 8 are timed on both tensor-core paths: the wgmma kernels (cuda/quant_gemm_sm90*.cu,
the default there) and the mma.sync kernel (_C.set_sm90_gemm(False)).

    python benchmarks/compare_quant_cuda.py [--repeats 9] [--shapes 8192x8192x8192,1x8192x8192] [--formats ...]
"""

from __future__ import annotations

import argparse
import sys

import torch

from cuda_timing import timed  # benchmarks/cuda_timing.py

CODE = {"int8": 0, "int8-weight": 1, "int4": 2, "fp8": 3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--shapes", default="8192x8192x8192,4096x4096x4096,1x8192x8192,1x4096x4096,8x4096x4096",
                    help="MxNxK list")
    ap.add_argument("--formats", default="int8,fp8,int8-weight,int4")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("compare_quant_cuda: no CUDA GPU visible; skipped.")
        return 0
    import normengine
    from normengine import _C
    from normengine.ops import quantize_weight

    if not normengine.cuda_available() or not hasattr(_C, "quant_linear_cuda"):
        print("compare_quant_cuda: normengine was built without CUDA kernels; skipped.")
        return 0
    dev = torch.device("cuda")
    wgmma = _C.sm90_gemm_compiled() and torch.cuda.get_device_capability() == (9, 0)
    stream = torch.cuda.current_stream().cuda_stream
    print(f"# quantized GEMM on {torch.cuda.get_device_name()}: y = x @ W^T, median of {args.repeats} (ms); "
          f"speedup = cuBLAS bf16 time / ours")
    print()
    print("| M x N x K | format | ours ms | cuBLAS bf16 ms | speedup | ours TFLOP/s | weight GB/s | of copy bw |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        M, N, K = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(M * 31 + N * 7 + K)
        x = torch.randn(M, K, device=dev, generator=g)
        w = torch.randn(N, K, device=dev, generator=g) / K**0.5
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        t_ref = timed(lambda: torch.matmul(xb, wb.t()), args.repeats)
        y = torch.empty(M, N, device=dev)
        for fmt in args.formats.split(","):
            group = {"int4": 128, "fp8": 128}.get(fmt)
            qw = quantize_weight(w, fmt, group)
            gs = qw.group_size if fmt in ("int4", "fp8") else 0
            xin = xb if fmt in ("int8", "fp8") else x  # quantized formats read bf16 activations like the peer

            def ours():
                _C.quant_linear_cuda(xin, CODE[fmt], qw.data, qw.scale, qw.zero, gs, N, K, None, y, False, stream)

            wbytes = qw.data.numel() * qw.data.element_size() + qw.scale.numel() * 4
            # memory-bound peer: a device copy of the packed weight moves 2 x its bytes
            dst = torch.empty_like(qw.data)
            t_copy = timed(lambda: dst.copy_(qw.data), args.repeats)
            paths = [("", None)]
            if wgmma and fmt in ("int8", "fp8") and M > 8:
                paths = [(" (wgmma)", True), (" (mma.sync)", False)]
            for label, sm90 in paths:
                if sm90 is not None:
                    _C.set_sm90_gemm(sm90)
                calls = _C.sm90_gemm_calls() if wgmma else 0
                t = timed(ours, args.repeats)
                if sm90 and _C.sm90_gemm_calls() == calls:
                    label = " (wgmma declined: mma.sync)"
                if wgmma:
                    _C.set_sm90_gemm(True)
                frac = (wbytes / t) / (2 * qw.data.numel() * qw.data.element_size() / t_copy)
                print(f"| {M}x{N}x{K} | {fmt}{label} | {t:.3f} | {t_ref:.3f} | {t_ref / t:.2f}x | "
                      f"{2 * M * N * K / t / 1e9:.1f} | {wbytes / t / 1e6:.0f} | {100 * frac:.0f}% |")
        del x, w, xb, wb, y
        torch.cuda.empty_cache()
    print()
    print("targets (8192x8192x8192): int8 >= 1.6x and fp8 >= 1.6x cuBLAS bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
