"""The `normengine` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def cmd_ops(args) -> int:
    """Run every norm op on this machine: accuracy against the float64 reference and time against
    torch's own kernels on the same input, same thread count."""
    import torch
    import torch.nn.functional as F

    import normengine as ne
    from normengine import reference as ref

    torch.manual_seed(0)
    ne.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rows, cols = args.rows, args.cols
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    x = torch.randn(rows, cols).to(dtype)
    r = torch.randn(rows, cols).to(dtype)
    w = torch.randn(cols).to(dtype)
    b = torch.randn(cols).to(dtype)
    out, hout = torch.empty_like(x), torch.empty_like(x)
    xd, rd, wd, bd = x.double(), r.double(), w.double(), b.double()
    cases = [
        ("layer_norm", lambda: ne.ops.layer_norm(x, w, b, out=out), lambda: F.layer_norm(x, (cols,), w, b),
         ref.layer_norm(xd, wd, bd)),
        ("rms_norm", lambda: ne.ops.rms_norm(x, w, out=out), lambda: F.rms_norm(x, (cols,), w, 1e-6),
         ref.rms_norm(xd, wd)),
        ("crms_norm", lambda: ne.ops.crms_norm(x, w, out=out), lambda: ref.crms_norm(x, w), ref.crms_norm(xd, wd)),
        ("add_layer_norm", lambda: ne.ops.add_layer_norm(x, r, w, b, out=out, residual_out=hout)[0],
         lambda: F.layer_norm(x + r, (cols,), w, b), ref.layer_norm((x + r).double(), wd, bd)),
        ("add_rms_norm", lambda: ne.ops.add_rms_norm(x, r, w, out=out, residual_out=hout)[0],
         lambda: F.rms_norm(x + r, (cols,), w, 1e-6), ref.rms_norm((x + r).double(), wd)),
    ]
    print(f"normengine {ne.__version__}: cpu kernels '{ne.cpu_isa()}', {ne.num_threads()} threads, "
          f"[{rows} x {cols}] {args.dtype}")
    print(f"{'op':<16}{'max rel err':>14}{'ours ms':>10}{'torch ms':>10}{'speed-up':>10}")
    with torch.no_grad():
        for name, ours, theirs, want in cases:
            got = ours().double()
            err = ((got - want).abs().max() / want.abs().max()).item()
            t_ours = _median_time(ours, args.repeats)
            t_torch = _median_time(theirs, args.repeats)
            print(f"{name:<16}{err:>14.2e}{t_ours * 1e3:>10.2f}{t_torch * 1e3:>10.2f}{t_torch / t_ours:>9.2f}x")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="normengine", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("ops", help="check and time the native norm ops against torch on this machine")
    o.add_argument("--rows", type=int, default=4096)
    o.add_argument("--cols", type=int, default=4096)
    o.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    o.add_argument("--threads", type=int, default=0, help="0: one per core")
    o.add_argument("--repeats", type=int, default=7)
    o.set_defaults(fn=cmd_ops)
    args = p.parse_args(argv)
    if getattr(args, "threads", 1) == 0:
        import os

        args.threads = len(os.sched_getaffinity(0))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
