"""Gated MLP activations, forward + backward: normengine.ops.swiglu / geglu against torch's compositions
F.silu(gate) * up and F.gelu(gate, approximate="tanh") * up, at MLP shapes [tokens, d_ff].

    PYTHONPATH=python python3 benchmarks/compare_activation.py [--shapes 4096x3072,2048x8192] [--dtypes fp32,bf16]
        [--threads 2] [--repeats 9] [--device cpu|cuda]

Time: median of --repeats forward + backward steps (after a warm-up) with the gradient buffers reused
(glibc's fresh pages for large allocations are kept out: M_MMAP_THRESHOLD / M_TRIM_THRESHOLD raised, as
compare_norm_torch.py's warm-allocator half). Memory: the bytes autograd keeps for the backward (the saved
tensors, counted with torch.autograd.graph.saved_tensors_hooks, each storage once), which is what a
training step holds per layer until its backward runs. Ratios: torch / ours.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time


def warm_allocator():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def saved_bytes(fn, *inputs) -> int:
    import torch

    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*inputs)
    # the inputs themselves (gate, up: the projections' outputs, alive anyway) are not extra memory
    for t in inputs:
        if (t.untyped_storage().data_ptr(), t.device) in seen:
            total -= t.untyped_storage().nbytes()
    del y
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x3072,2048x8192")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    warm_allocator()
    import torch
    import torch.nn.functional as F

    import normengine as ne

    torch.set_num_threads(a.threads)
    ne.set_num_threads(a.threads)
    dev = a.device
    print(f"device {dev} ({ne.cpu_isa() if dev == 'cpu' else torch.cuda.get_device_name()}), threads {a.threads}, "
          f"repeats {a.repeats}; forward + backward; saved = bytes kept for backward beyond gate and up")
    print("| op | shape | dtype | torch ms | ours ms | speed-up | torch saved MiB | ours saved MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    cases = [("swiglu", lambda g, u: F.silu(g) * u, ne.ops.swiglu),
             ("geglu", lambda g, u: F.gelu(g, approximate="tanh") * u, ne.ops.geglu)]
    for dt_name in a.dtypes.split(","):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        for shape in a.shapes.split(","):
            T, Fd = (int(v) for v in shape.split("x"))
            gen = torch.Generator().manual_seed(0)
            gate = torch.randn(T, Fd, generator=gen).to(dt).to(dev).requires_grad_()
            up = torch.randn(T, Fd, generator=gen).to(dt).to(dev).requires_grad_()
            dy = torch.randn(T, Fd, generator=gen).to(dt).to(dev)
            for name, theirs, ours in cases:
                times = {}
                for who, fn in (("torch", theirs), ("ne", ours)):
                    def step():
                        gate.grad = up.grad = None
                        fn(gate, up).backward(dy)
                        if dev == "cuda":
                            torch.cuda.synchronize()
                    step()
                    ts = []
                    for _ in range(a.repeats):
                        t0 = time.perf_counter()
                        step()
                        ts.append(time.perf_counter() - t0)
                    times[who] = statistics.median(ts)
                with torch.no_grad():
                    err = ((ours(gate, up).double() - theirs(gate, up).double()).norm() /
                           theirs(gate, up).double().norm()).item()
                st, so = saved_bytes(theirs, gate, up), saved_bytes(ours, gate, up)
                print(f"| {name} | {T}x{Fd} | {dt_name} | {times['torch'] * 1e3:.2f} | {times['ne'] * 1e3:.2f} | "
                      f"{times['torch'] / times['ne']:.2f}x | {st / 2**20:.0f} | {so / 2**20:.0f} |  "
                      f"(rel diff {err:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
