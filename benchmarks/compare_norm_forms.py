"""The paper's promise for Pre-RMSNorm / Pre-CRMSNorm (1% to 10% less time), measured in the engine.

1. One GPT-2-small-shaped model (random weights, LayerNorm gains 1 + 0.1 N(0,1), biases 0.1 N(0,1),
   so the conversions do real work) loaded three ways: the layernorm form (gains folded), the exactly
   equivalent rmsnorm form and the crmsnorm form (normengine.load(..., norm=...)). Prefill tok/s (a
   `--prompt`-token prompt) and decode tok/s (`--decode` one-token steps), the three forms timed
   round-robin, medians over rounds; the forms' logits are checked to agree first.
2. norm_linear (norm statistics applied in the GEMM epilogue) against norm-then-GEMM (the engine's
   own norm kernel writing the normalized rows, then its GEMM) at the model's shapes, decode (M = 1)
   and prefill (M = 128): K = 768 to N = 2304 (q, k, v), 3072 (MLP up) and 50257 (head); and against
   torch's norm-then-linear (F.layer_norm / F.rms_norm, then addmm, F.linear's kernel, into out=), the
   pair a PyTorch user replaces with the one op.

Usage: PYTHONPATH=python python3 benchmarks/compare_norm_forms.py [--threads 2] [--rounds 9] [--device cuda]

--device cuda: the same on a GPU (the CUDA runner's fused norms; norm_linear as cuda/gemm.cu's norm
epilogue against the engine's CUDA norm kernel then its GEMM, and torch's pair on cuBLAS), each timed
call synchronized.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def make_gpt2(path: str, seed: int = 0) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config())
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
    m.save_pretrained(path)


DEVICE = "cpu"


def timed(fn):
    t0 = time.perf_counter()
    fn()
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_forms(path, rounds, prompt_len, decode):
    import normengine as ne

    forms = {f: ne.load(path, norm=None if f == "layernorm" else f, device=DEVICE)
             for f in ("layernorm", "rmsnorm", "crmsnorm")}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (prompt_len,), generator=g).tolist()
    ref = forms["layernorm"].logits(ids)[0]
    for f, m in forms.items():
        got = m.logits(ids)[0]
        err = ((got - ref).norm() / ref.norm()).item()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"{f:>9}: fused norms {m.info()['fused_norms']}, residual width {m.config.residual_width}, "
              f"logits vs layernorm form: rel err {err:.2e}, argmax agreement {agree:.1%}")
    res = {f: {"prefill": [], "decode": []} for f in forms}
    for f, m in forms.items():  # warm-up (runner, caches)
        m.generate(ids, max_new_tokens=4)
    for _ in range(rounds):
        for f, m in forms.items():
            tp = timed(lambda: m.generate(ids, max_new_tokens=1))
            tt = timed(lambda: m.generate(ids, max_new_tokens=decode + 1))
            res[f]["prefill"].append(prompt_len / tp)
            res[f]["decode"].append(decode / max(tt - tp, 1e-9))
    print(f"\n{'form':>9} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill vs LN':>14} {'decode vs LN':>13}")
    base_p = statistics.median(res["layernorm"]["prefill"])
    base_d = statistics.median(res["layernorm"]["decode"])
    for f in forms:
        p, d = statistics.median(res[f]["prefill"]), statistics.median(res[f]["decode"])
        # same-round ratios, then their median (the machine's drift cancels within a round)
        rp = statistics.median(a / b for a, b in zip(res[f]["prefill"], res["layernorm"]["prefill"]))
        rd = statistics.median(a / b for a, b in zip(res[f]["decode"], res["layernorm"]["decode"]))
        print(f"{f:>9} {p:>14.1f} {d:>13.2f} {rp:>13.3f}x {rd:>12.3f}x")
    del base_p, base_d


def bench_norm_linear(repeats):
    import normengine as ne

    torch.manual_seed(0)
    print(f"\nnorm_linear vs norm-then-GEMM (engine kernels both) and torch, median of 5 blocks of "
          f"{max(3, repeats // 5)} calls each; K = 768")
    print(f"{'norm':>6} {'M':>4} {'N':>6} {'fused ms':>9} {'norm+GEMM ms':>13} {'speed-up':>9} {'torch ms':>9} "
          f"{'vs torch':>9}")
    for norm, normfn in (("layer", ne.ops.layer_norm), ("rms", ne.ops.rms_norm)):
        for M in (1, 128):
            for N in (2304, 3072, 50257):
                x = (torch.randn(M, 768) * 3 + 0.5).to(DEVICE)
                w = (torch.randn(N, 768) * 0.02).to(DEVICE)
                b = (torch.randn(N) * 0.02).to(DEVICE)
                y = torch.empty(M, N, device=DEVICE)
                xn = torch.empty_like(x)

                cs = w.sum(1) if norm == "layer" else None  # the runner precomputes it once per weight

                def fused():
                    ne.ops.norm_linear(x, w, b, norm=norm, col_sum=cs, out=y)

                def split():
                    normfn(x, out=xn)
                    ne.ops.linear(xn, w, b, out=y)

                def torch_pair():
                    if norm == "layer":
                        h = torch.nn.functional.layer_norm(x, (768,), eps=1e-5)
                    else:
                        h = torch.nn.functional.rms_norm(x, (768,), eps=1e-6)
                    torch.addmm(b, h, w.t(), out=y)  # F.linear's kernel, into out=

                for f in (fused, split, torch_pair):
                    f()
                # blocks of calls per variant, rounds alternating, each block after a 0.3 s pause:
                # torch's OpenMP workers spin on after its calls and would take the next variant's
                # cores (interleaving single calls made the fused op look 1.5-2x slower than it is)
                tf, ts, tt = [], [], []
                block = max(3, repeats // 5)
                for _ in range(5):
                    for f, acc in ((fused, tf), (split, ts), (torch_pair, tt)):
                        time.sleep(0.3 if DEVICE == "cpu" else 0.0)
                        acc.extend(timed(f) for _ in range(block))
                a, s, t = statistics.median(tf), statistics.median(ts), statistics.median(tt)
                print(f"{norm:>6} {M:>4} {N:>6} {a * 1e3:>9.3f} {s * 1e3:>13.3f} {s / a:>8.2f}x {t * 1e3:>9.3f} "
                      f"{t / a:>8.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=51)
    ap.add_argument("--workdir", default=None, help="where the GPT-2-shaped checkpoint is written (default: a temp dir)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import normengine as ne

    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not (torch.cuda.is_available() and ne.cuda_available()):
        raise SystemExit("no CUDA GPU visible to torch and normengine")
    ne.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"normengine cpu kernels '{ne.cpu_isa()}', {ne.num_threads()} threads")
    if not args.skip_model:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(args.workdir or tmp, "gpt2-perturbed-norms")
            if not os.path.exists(os.path.join(path, "config.json")):
                make_gpt2(path)
            bench_forms(path, args.rounds, args.prompt, args.decode)
    bench_norm_linear(args.repeats)


if __name__ == "__main__":
    main()
