"""normengine norm ops against PyTorch: speedup (torch time / ours) forward and backward.

    PYTHONPATH=python python3 benchmarks/compare_norm_torch.py [--threads 2] [--repeats 9]
                                                               [--device cpu|cuda] [--shapes 4096x4096,...]

Pairs compared (same inputs, same thread count on both sides):
  layer_norm      vs F.layer_norm             rms_norm     vs F.rms_norm
  add_layer_norm  vs torch.add(x, r, out=h); F.layer_norm(h)    (add_rms_norm likewise)
  crms_norm       vs the formula in torch: x * rsqrt((sum x^2 + (sum x)^2) / (n + 1) + eps) * w (f32 math)
Forward: ours with out= (and residual_out=) into preallocated buffers, and ours allocating its
outputs; torch's norms have no out=, so they always allocate. "copy" is dst.copy_(src) of a
preallocated buffer moving the same bytes (read + written) as our forward; %copy = its time / ours.
Backward: y.backward(g) through autograd on both sides, x and the weights requiring grad (the
residual does not); "kernel" is our backward kernel alone on preallocated outputs.

Every timed call starts from cold caches (a 256 MB read on the CPU, a 256 MB memset on the GPU),
variants are timed round-robin and each figure is the median of --repeats calls.

On the CPU, glibc serves every allocation >= 32 MB with fresh pages (page faults on first touch),
which penalises whichever side allocates. normengine's ops take such outputs from their host cache
(normengine.cache_info(); NORMENGINE_CPU_CACHE_MB=0 turns it off), torch's from glibc. The suite
therefore runs twice: with glibc's defaults, then with mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=max),
which keeps freed blocks for reuse, the equivalent of a warm caching allocator for torch too.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

import normengine
from normengine import _C
from normengine.ops import add_layer_norm, add_rms_norm, crms_norm, layer_norm, rms_norm
from normengine.ops.norm import CRMS, LAYER, RMS, _forward

EPS_LN, EPS_RMS = 1e-5, 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ timing
class Timer:
    """Median time of each variant, timed round-robin. A variant is (prep, run): prep() is untimed
    and returns run's argument (e.g. the graph to backprop through)."""

    def __init__(self, device: torch.device, repeats: int, threads: int, warmup: int = 2):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.scratch = torch.empty(64 << 20, dtype=torch.float32, device=device)
        else:
            self.parts = np.array_split(np.ones(64 << 20, dtype=np.float32), max(threads, 1))

    def _cold(self):
        if self.cuda:
            self.scratch.zero_()  # evict L2
            return
        # Evict the caches by reading 256 MB (no dirty lines left behind) on plain threads, one per
        # core: a flush run by torch would leave its OpenMP threads spinning into our timed call
        # (measured: +40% on ours), one run by our pool would do the same to torch. No sleep(): on
        # this VM an idle vCPU takes ~0.3 ms to wake, which would dominate small calls.
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in self.parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def _time(self, prep, run) -> float:
        arg = prep()
        self._cold()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(arg)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        run(arg)
        return time.perf_counter() - t0

    def medians(self, variants: dict) -> dict:
        names = list(variants)
        times = {k: [] for k in names}
        for rep in range(self.warmup + self.repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]  # rotate: no fixed neighbour
            for k in order:
                t = self._time(*variants[k])
                if rep >= self.warmup:
                    times[k].append(t)
        return {k: statistics.median(v) for k, v in times.items()}


def fwd(fn):
    return (lambda: None, lambda _: fn())


# ------------------------------------------------------------------------------------------- cases
def crms_torch(x, w, eps=EPS_RMS):
    xf = x.float()
    ms = (xf.square().sum(-1, keepdim=True) + xf.sum(-1, keepdim=True).square()) / (x.size(-1) + 1)
    return (xf * torch.rsqrt(ms + eps) * w.float()).to(x.dtype)


def make_inputs(rows, cols, dtype, device):
    g = torch.Generator().manual_seed(0)
    t = lambda: torch.randn(rows, cols, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, r, dy = t(), t(), t()
    w32 = (1 + 0.1 * torch.randn(cols, generator=g)).to(device)
    b32 = (0.1 * torch.randn(cols, generator=g)).to(device)
    return x, r, dy, w32, b32


def forward_cases(x, r, w32, b32):
    """name -> (traffic bytes, ours(out, res_out) or ours() allocating, torch(h_buf))."""
    wt, bt = w32.to(x.dtype), b32.to(x.dtype)
    n, E = x.size(-1), x.numel() * x.element_size()
    return {
        "layer_norm": (2 * E, lambda o, h: layer_norm(x, w32, b32, EPS_LN, out=o),
                       lambda h: F.layer_norm(x, (n,), wt, bt, EPS_LN)),
        "rms_norm": (2 * E, lambda o, h: rms_norm(x, w32, EPS_RMS, out=o),
                     lambda h: F.rms_norm(x, (n,), wt, EPS_RMS)),
        "crms_norm": (2 * E, lambda o, h: crms_norm(x, w32, EPS_RMS, out=o),
                      lambda h: crms_torch(x, wt)),
        "add_layer_norm": (4 * E, lambda o, h: add_layer_norm(x, r, w32, b32, EPS_LN, out=o, residual_out=h),
                           lambda h: F.layer_norm(torch.add(x, r, out=h), (n,), wt, bt, EPS_LN)),
        "add_rms_norm": (4 * E, lambda o, h: add_rms_norm(x, r, w32, EPS_RMS, out=o, residual_out=h),
                         lambda h: F.rms_norm(torch.add(x, r, out=h), (n,), wt, EPS_RMS)),
    }


def backward_cases(x, r, dy, w32, b32):
    """name -> (ours(xg, w, b) -> y, torch(xg, w, b) -> y, kind or None)."""
    n = x.size(-1)
    return {
        "layer_norm": (lambda xg, w, b: layer_norm(xg, w, b, EPS_LN),
                       lambda xg, w, b: F.layer_norm(xg, (n,), w, b, EPS_LN), LAYER),
        "rms_norm": (lambda xg, w, b: rms_norm(xg, w, EPS_RMS),
                     lambda xg, w, b: F.rms_norm(xg, (n,), w, EPS_RMS), RMS),
        "crms_norm": (lambda xg, w, b: crms_norm(xg, w, EPS_RMS), lambda xg, w, b: crms_torch(xg, w), CRMS),
        "add_layer_norm": (lambda xg, w, b: add_layer_norm(xg, r, w, b, EPS_LN)[0],
                           lambda xg, w, b: F.layer_norm(xg + r, (n,), w, b, EPS_LN), None),
        "add_rms_norm": (lambda xg, w, b: add_rms_norm(xg, r, w, EPS_RMS)[0],
                         lambda xg, w, b: F.rms_norm(xg + r, (n,), w, EPS_RMS), None),
    }


def autograd_variant(build, x, dy, w, b):
    xg = x.detach().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    bg = b.detach().clone().requires_grad_()

    def prep():
        xg.grad = wg.grad = bg.grad = None
        return build(xg, wg, bg)

    return (prep, lambda y: y.backward(dy))


def kernel_variant(kind, x, dy, w32, b32):
    """Our backward kernel alone, into preallocated dx / dweight / dbias."""
    eps = EPS_LN if kind == LAYER else EPS_RMS
    rstd = _forward(kind, x, None, w32, b32 if kind == LAYER else None, eps)[3]
    dx, dw, db = torch.empty_like(x), torch.empty_like(w32), torch.empty_like(b32)
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    run = lambda _: _C.norm_backward(kind, dy, x, w32, rstd, None, dx, dw,  # noqa: E731
                                     db if kind == LAYER else None, stream)
    return (lambda: None, run)


# -------------------------------------------------------------------------------------------- main
def run_suite(args, device, shapes, title):
    timer = Timer(device, args.repeats, args.threads)
    ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    print(f"\n### {title}\n")
    print("Forward (speedup = torch time / ours; >1 means ours is faster)\n")
    print("| op | shape | dtype | ours out= ms | ours alloc ms | torch ms | speedup out= | speedup alloc "
          "| ours GB/s | copy GB/s | %copy |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (rows, cols), dname in shapes:
        dtype = DTYPES[dname]
        x, r, dy, w32, b32 = make_inputs(rows, cols, dtype, device)
        y_buf, h_buf, th_buf = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        src = torch.empty(2 * x.numel() * x.element_size() // 4, dtype=torch.float32, device=device).fill_(1)
        dst = torch.empty_like(src)
        with torch.no_grad():
            for op, (traffic, ours, ref) in forward_cases(x, r, w32, b32).items():
                nc = traffic // 2 // 4  # a copy of traffic/2 bytes reads and writes `traffic` bytes
                t = timer.medians({
                    "out": fwd(lambda: ours(y_buf, h_buf)),
                    "alloc": fwd(lambda: ours(None, None)),
                    "torch": fwd(lambda: ref(th_buf)),
                    "copy": fwd(lambda: dst[:nc].copy_(src[:nc])),
                })
                gbs, cgbs = traffic / t["out"] / 1e9, traffic / t["copy"] / 1e9
                print(f"| {op} | {rows}x{cols} | {dname} | {ms(t['out'])} | {ms(t['alloc'])} | {ms(t['torch'])} "
                      f"| {t['torch'] / t['out']:.2f}x | {t['torch'] / t['alloc']:.2f}x | {gbs:.1f} | {cgbs:.1f} "
                      f"| {100 * t['copy'] / t['out']:.0f}% |", flush=True)
        del x, r, dy, y_buf, h_buf, th_buf, src, dst

    print("\nBackward: y.backward(g) through autograd (speedup = torch / ours); kernel = ours alone, "
          "preallocated outputs\n")
    print("| op | shape | dtype | ours ms | torch ms | speedup | ours kernel ms |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (rows, cols), dname in shapes:
        dtype = DTYPES[dname]
        x, r, dy, w32, b32 = make_inputs(rows, cols, dtype, device)
        wt, bt = w32.to(dtype), b32.to(dtype)
        for op, (ours, ref, kind) in backward_cases(x, r, dy, w32, b32).items():
            variants = {"ours": autograd_variant(ours, x, dy, w32, b32),
                        "torch": autograd_variant(ref, x, dy, wt, bt)}
            if kind is not None:
                variants["kernel"] = kernel_variant(kind, x, dy, w32, b32)
            t = timer.medians(variants)
            kern = ms(t["kernel"]) if "kernel" in t else "-"
            print(f"| {op} | {rows}x{cols} | {dname} | {ms(t['ours'])} | {ms(t['torch'])} "
                  f"| {t['torch'] / t['ours']:.2f}x | {kern} |", flush=True)
        del x, r, dy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and normengine (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per variant, median reported (>= 7)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", default=None, help="comma-separated RxC (default 4096x4096,8192x1024)")
    args = p.parse_args()
    if args.repeats < 7:
        p.error("--repeats must be at least 7")

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("compare_norm_torch: --device cuda requested but torch sees no CUDA device; nothing to do.")
            return 0
        if not normengine.cuda_available():
            print("compare_norm_torch: a CUDA device is visible but this normengine build has no CUDA kernels "
                  "(rebuild with NORMENGINE_CUDA=ON).", file=sys.stderr)
            return 1
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    normengine.set_num_threads(args.threads)

    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or "4096x4096,8192x1024").split(",")]
    shapes = [(s, d) for s in sizes for d in DTYPES]
    if args.device == "cuda" and args.shapes is None:
        shapes.append(((16384, 4096), "bf16"))

    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
              f"normengine {normengine.__version__}; repeats {args.repeats}")
        run_suite(args, device, shapes, "CUDA (torch's caching allocator on both sides)")
        return 0

    print(f"device: cpu, isa {normengine.cpu_isa()}; threads: torch {torch.get_num_threads()}, "
          f"normengine {normengine.num_threads()}; torch {torch.__version__}; repeats {args.repeats}")
    run_suite(args, device, shapes, "CPU, glibc malloc defaults (allocations >= 32 MB get fresh pages)")
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        print("\nmallopt failed: warm-allocator pass skipped")
        return 0
    run_suite(args, device, shapes, "CPU, warm allocator (mallopt: freed memory reused, no fresh pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
