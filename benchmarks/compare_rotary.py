"""Rotary position embedding, forward + backward of q and k: normengine.ops.apply_rotary_pos_emb against
transformers' apply_rotary_pos_emb (x * cos + rotate_half(x) * sin in torch ops), at a Llama-like attention
shape: q [batch, heads, T, head_dim] and k [batch, kv_heads, T, head_dim], both transposed views of the
projections' [batch, T, heads, head_dim] output, as in the model.

    PYTHONPATH=python python3 benchmarks/compare_rotary.py [--batch 4 --heads 12 --kv-heads 4 --seq 512
        --head-dim 64] [--threads 2] [--repeats 15] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    import torch
    from transformers.models.llama import modeling_llama

    import normengine as ne

    torch.set_num_threads(a.threads)
    ne.set_num_threads(a.threads)
    B, H, Hk, T, D = a.batch, a.heads, a.kv_heads, a.seq, a.head_dim
    print(f"q [{B}, {H}, {T}, {D}], k [{B}, {Hk}, {T}, {D}]; {a.device}, {a.threads} threads; medians of {a.repeats}")
    print("| dtype | transformers ms | ours ms | speed-up |")
    print("|---|---:|---:|---:|")
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, T, H, D, generator=g).to(dt).to(a.device).transpose(1, 2).requires_grad_()
        k = torch.randn(B, T, Hk, D, generator=g).to(dt).to(a.device).transpose(1, 2).requires_grad_()
        f = torch.randn(B, T, D // 2, generator=g)
        emb = torch.cat([f, f], -1)
        cos, sin = emb.cos().to(dt).to(a.device), emb.sin().to(dt).to(a.device)
        dq = torch.randn(B, H, T, D, generator=g).to(dt).to(a.device)
        dk = torch.randn(B, Hk, T, D, generator=g).to(dt).to(a.device)

        def step(fn):
            q.grad = k.grad = None
            qe, ke = fn(q, k, cos, sin)
            torch.autograd.backward([qe, ke], [dq, dk])
            if a.device == "cuda":
                torch.cuda.synchronize()

        res = {}
        for name, fn in (("hf", modeling_llama.apply_rotary_pos_emb), ("ne", ne.ops.apply_rotary_pos_emb)):
            step(fn)
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                step(fn)
                ts.append(time.perf_counter() - t0)
            res[name] = statistics.median(ts)
        print(f"| {str(dt).split('.')[-1]} | {res['hf'] * 1e3:.2f} | {res['ne'] * 1e3:.2f} | "
              f"{res['hf'] / res['ne']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
