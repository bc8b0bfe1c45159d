"""The LM-head loss of a training step: normengine.ops.linear_cross_entropy against torch's
F.cross_entropy(F.linear(x, W), t), forward + backward, time and peak memory, at a GPT-2 head
(hidden 768, vocab 50257) and tokens per step N.

    PYTHONPATH=python python3 benchmarks/compare_cross_entropy.py [--tokens 1024,4096] [--dtypes fp32,bf16]
        [--threads 2] [--repeats 5] [--device cpu|cuda]

Each (engine, dtype, N) runs in a fresh worker process, so its peak memory is its own: on the CPU the
worker's RSS high-water mark (VmHWM) minus its RSS after making the inputs (x, W, t and the gradient
buffers' first use excluded: both engines return the same dx and dW), on CUDA
torch.cuda.max_memory_allocated minus the allocation before the step. Time: median of --repeats steps
after one warm-up; the workers run round-robin, one at a time. Ratios: torch time / ours, torch peak / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from compare_model import rss_kb  # (this directory: the script's own, first on sys.path)

HIDDEN, VOCAB = 768, 50257


def worker(engine: str, dtype: str, n: int, repeats: int, threads: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    import normengine as ne

    torch.set_num_threads(threads)
    ne.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, HIDDEN, generator=g).to(dt).to(device).requires_grad_()
    W = (0.02 * torch.randn(VOCAB, HIDDEN, generator=g)).to(dt).to(device).requires_grad_()
    t = torch.randint(0, VOCAB, (n,), generator=g).to(device)

    def step():
        x.grad = W.grad = None
        if engine == "torch":
            loss = F.cross_entropy(F.linear(x, W).float(), t)
        else:
            loss = ne.ops.linear_cross_entropy(x, W, t)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    # gradients allocated once before the baseline, so neither engine's peak counts them
    x.grad = torch.zeros_like(x)
    W.grad = torch.zeros_like(W)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kb("VmRSS") * 1024
    loss = step()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss_kb("VmHWM") * 1024 - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"loss": float(loss), "times": times, "peak": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="workers per case (medians over them)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]), a.repeats, a.threads, a.device)))
        return 0
    here = os.path.abspath(__file__)
    rows = []
    print(f"device {a.device}, threads {a.threads}, repeats {a.repeats}, rounds {a.rounds}; hidden {HIDDEN}, "
          f"vocab {VOCAB}; forward + backward of the mean loss")
    for dtype in a.dtypes.split(","):
        for n in (int(v) for v in a.tokens.split(",")):
            res = {"torch": [], "ne": []}
            for _ in range(a.rounds):
                for engine in ("torch", "ne"):
                    out = subprocess.run([sys.executable, here, "--worker", engine, dtype, str(n), "--repeats",
                                          str(a.repeats), "--threads", str(a.threads), "--device", a.device],
                                         capture_output=True, text=True, check=True)
                    res[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {e: statistics.median(statistics.median(r["times"]) for r in res[e]) for e in res}
            peak = {e: statistics.median(r["peak"] for r in res[e]) for e in res}
            dl = abs(res["ne"][0]["loss"] - res["torch"][0]["loss"]) / abs(res["torch"][0]["loss"])
            rows.append((dtype, n, med, peak, dl))
            print(f"  {dtype} N={n}: torch {med['torch'] * 1e3:.1f} ms / {peak['torch'] / 2**20:.0f} MiB, "
                  f"ne {med['ne'] * 1e3:.1f} ms / {peak['ne'] / 2**20:.0f} MiB (loss rel diff {dl:.1e})", flush=True)
    print("\n| dtype | tokens | torch ms | ours ms | speed-up | torch peak MiB | ours peak MiB | memory ratio "
          "| loss rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, n, med, peak, dl in rows:
        print(f"| {dtype} | {n} | {med['torch'] * 1e3:.1f} | {med['ne'] * 1e3:.1f} | {med['torch'] / med['ne']:.2f}x | "
              f"{peak['torch'] / 2**20:.0f} | {peak['ne'] / 2**20:.0f} | {peak['torch'] / max(peak['ne'], 1):.1f}x | "
              f"{dl:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
