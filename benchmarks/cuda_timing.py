"""CUDA event timing shared by the GPU comparison scripts (compare_*_cuda.py)."""
import statistics

import torch


def timed(fn, repeats, warmup=3):
    """Median milliseconds of fn() over `repeats` runs, each bracketed by CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)
