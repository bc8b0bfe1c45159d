"""A transformers training step with and without normengine.nn.patch_hf: time and peak memory of forward +
backward of the next-token loss of a random Llama-shaped model.

    PYTHONPATH=python python3 benchmarks/compare_hf_patch.py [--layers 12 --d 768 --ff 2048 --vocab 32000]
        [--batch 4 --seq 512] [--dtype fp32|bf16] [--threads 2] [--repeats 3] [--rounds 2] [--device cpu|cuda] [--rope]

Each (engine, round) runs in a fresh worker process: the model is built (seeded, the same in both), one step
warms up, then --repeats steps are timed (median); peak = on the CPU the worker's RSS high-water mark minus its
RSS after building the model and the batch, on CUDA torch.cuda.max_memory_allocated minus the allocation
before the first step. Gradients are kept between steps (set to None before each), so the peak includes them
alike on both sides. Ratios: unpatched / patched, medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from compare_model import rss_kb  # (this directory: the script's own, first on sys.path)


def worker(a, patched: bool) -> dict:
    import torch
    import transformers

    import normengine as ne

    torch.set_num_threads(a.threads)
    ne.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.d, intermediate_size=a.ff,
                                   num_hidden_layers=a.layers, num_attention_heads=a.d // 64,
                                   num_key_value_heads=max(1, a.d // 192), max_position_embeddings=max(2048, a.seq),
                                   tie_word_embeddings=False)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = transformers.LlamaForCausalLM(cfg).to(dt).to(a.device)
    model.train()
    if patched:
        ne.nn.patch_hf(model, rope=a.rope)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)

    def step():
        for p in model.parameters():
            p.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if a.device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    if a.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kb("VmRSS") * 1024
    loss = step()
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) if a.device == "cuda" else rss_kb("VmHWM") * 1024 - base
    return {"loss": loss, "time": statistics.median(times), "peak": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--ff", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rope", action="store_true", help="patch_hf(rope=True): rotary embeddings too")
    ap.add_argument("--worker", choices=("plain", "patched"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a, a.worker == "patched")))
        return 0
    args = [a for a in (argv if argv is not None else sys.argv[1:])]
    res = {"plain": [], "patched": []}
    for _ in range(a.rounds):
        for who in ("plain", "patched"):
            out = subprocess.run([sys.executable, __file__, "--worker", who] + args, capture_output=True, text=True,
                                 check=True)
            res[who].append(json.loads(out.stdout.strip().splitlines()[-1]))
    t = {k: statistics.median(r["time"] for r in v) for k, v in res.items()}
    p = {k: statistics.median(r["peak"] for r in v) for k, v in res.items()}
    ratio_t = statistics.median(x["time"] / y["time"] for x, y in zip(res["plain"], res["patched"]))
    dl = abs(res["patched"][0]["loss"] - res["plain"][0]["loss"]) / abs(res["plain"][0]["loss"])
    print(f"Llama-shaped: {a.layers} layers, d {a.d}, d_ff {a.ff}, vocab {a.vocab}; batch {a.batch} x {a.seq} tokens, "
          f"{a.dtype}, {a.device}, {a.threads} threads; {a.rounds} rounds x {a.repeats} steps")
    print("| model | step s | peak MiB |")
    print("|---|---:|---:|")
    for k in ("plain", "patched"):
        name = "transformers" if k == "plain" else "transformers + patch_hf" + ("(rope=True)" if a.rope else "")
        print(f"| {name} | {t[k]:.3f} | {p[k] / 2**20:.0f} |")
    print(f"speed-up {ratio_t:.2f}x (paired by round), peak {p['plain'] / max(p['patched'], 1):.2f}x lower; "
          f"loss rel diff {dl:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
