"""Linear attention, MALA and norm attention on CUDA, both algorithms: "chunk" (the chunkwise-parallel
kernels of cuda/linear_attention_chunk.cu, what algorithm="auto" runs) and "recurrent" (the token-serial
kernels of cuda/linear_attention.cu), against torch SDPA (bf16, causal; FlashAttention-class softmax
attention) and, where installed, flash-linear-attention (`fla`, chunked linear attention). Forward and
forward+backward, B=1, H=8, Dk=Dv=64 (--dim), T in {1024, 4096, 16384}. Prints medians of --repeats
timings and ratios (ours / peer; < 1 is faster), and chunk / recurrent.

    python benchmarks/compare_attention_cuda.py [--repeats 7] [--dim 64] [--T 1024,4096,16384]
                                                [--algorithms chunk,recurrent]
"""

from __future__ import annotations

import argparse
import sys

import torch

from cuda_timing import timed  # benchmarks/cuda_timing.py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--T", default="1024,4096,16384")
    ap.add_argument("--algorithms", default="chunk,recurrent", help="comma-separated: chunk, recurrent")
    args = ap.parse_args()
    algorithms = [a for a in args.algorithms.split(",") if a]
    for a in algorithms:
        if a not in ("chunk", "recurrent"):
            ap.error(f"--algorithms: unknown algorithm {a!r} (chunk, recurrent)")
    if not torch.cuda.is_available():
        print("compare_attention_cuda: no CUDA GPU visible; skipped.")
        return 0
    import normengine
    from normengine import ops

    if not normengine.cuda_available():
        print("compare_attention_cuda: normengine was built without CUDA; skipped.")
        return 0
    try:
        from fla.ops.linear_attn import chunk_linear_attn  # flash-linear-attention
    except Exception as e:  # noqa: BLE001 - optional peer
        chunk_linear_attn = None
        print(f"(flash-linear-attention not available: {type(e).__name__}; fla columns omitted)")

    B, H, D = 1, args.heads, args.dim
    dev = torch.device("cuda")
    ours = {
        "linear": lambda q, k, v, alg: ops.linear_attention(q, k, v, causal=True, algorithm=alg),
        "mala": lambda q, k, v, alg: ops.mala_attention(q, k, v, causal=True, algorithm=alg),
        "norm": lambda q, k, v, alg: ops.norm_attention(q, k, v, causal=True, algorithm=alg),
    }
    print(f"# linear-family attention on {torch.cuda.get_device_name()}: B={B} H={H} D={D} bf16 causal, "
          f"median of {args.repeats} (ms); ratio = ours / peer")
    print()
    hdr = ("| op | algorithm | T | pass | ours ms | SDPA ms | ours/SDPA |" + (" fla ms | ours/fla |" if chunk_linear_attn else "")
           + (" chunk/recurrent |" if len(algorithms) == 2 else ""))
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for T in [int(t) for t in args.T.split(",")]:
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, generator=g) * D**-0.5 for _ in range(3))
        do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        dos = do.transpose(1, 2).contiguous()

        def leafs(*xs):
            return [x.detach().requires_grad_(True) for x in xs]

        def sdpa_f():
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        def sdpa_fb():
            a, b, c = leafs(qs, ks, vs)
            torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True).backward(dos)

        peers = {"fwd": timed(sdpa_f, args.repeats), "fwd+bwd": timed(sdpa_fb, args.repeats)}
        fla = {}
        if chunk_linear_attn is not None:
            def fla_f():
                return chunk_linear_attn(q, k, v, normalize=True)

            def fla_fb():
                a, b, c = leafs(q, k, v)
                o = chunk_linear_attn(a, b, c, normalize=True)
                (o[0] if isinstance(o, tuple) else o).backward(do)

            try:
                fla = {"fwd": timed(fla_f, args.repeats), "fwd+bwd": timed(fla_fb, args.repeats)}
            except Exception as e:  # noqa: BLE001 - API drift in the optional peer
                print(f"(fla failed at T={T}: {type(e).__name__}: {e})")
        for name, fn in ours.items():
            for pas in ("fwd", "fwd+bwd"):
                times = {}
                for alg in algorithms:
                    def f(alg=alg):
                        return fn(q, k, v, alg)

                    def fb(alg=alg):
                        a, b, c = leafs(q, k, v)
                        o = fn(a, b, c, alg)
                        (o[0] if isinstance(o, tuple) else o).backward(do)

                    t = times[alg] = timed(f if pas == "fwd" else fb, args.repeats)
                    line = f"| {name} | {alg} | {T} | {pas} | {t:.3f} | {peers[pas]:.3f} | {t / peers[pas]:.2f} |"
                    if chunk_linear_attn is not None:
                        line += (f" {fla[pas]:.3f} | {t / fla[pas]:.2f} |" if pas in fla else " - | - |")
                    if len(algorithms) == 2:
                        line += (f" {times['chunk'] / times['recurrent']:.2f} |" if len(times) == 2 else " |")
                    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
