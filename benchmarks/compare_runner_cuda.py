"""Generation with the native runner on a GPU (or the CPU, to check the script) against transformers on
the same device: prefill and decode tokens/s of a GPT-2-small-shaped random model (12 layers, 768 wide,
vocab 50257), for the runner's weight formats (fp32, bf16 (also with matmul_precision "medium"), and the packed int8 / int4 / fp8 weights the
CUDA runner takes through cuda::quant_linear) and transformers' fp32 / bf16.

    python benchmarks/compare_runner_cuda.py [--device cuda] [--prompt 512] [--gen 64] [--repeats 3]

Timing: greedy generate() of 1 new token (the prefill, plus one head row) and of `gen` new tokens, each
the median of `repeats` runs after a warm-up; decode tokens/s = (gen - 1) / (t_gen - t_1). Both engines
return token ids on the host, so every timed call ends synchronized. Ratios are transformers' time over
the runner's, transformers in the same dtype (fp32 for the packed formats)."""

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers

import normengine as ne

FORMATS = {  # name -> load() keywords, and the transformers dtype it is compared with
    "fp32": (dict(), torch.float32),
    "bf16": (dict(dtype=torch.bfloat16), torch.bfloat16),
    # bf16 weights with matmul_precision "medium": the prefill's projections on the tensor cores
    # (cuda::bf16_linear), as transformers' bf16 matmuls are
    "bf16-medium": (dict(dtype=torch.bfloat16, matmul_precision="medium"), torch.bfloat16),
    "int8": (dict(quant="int8"), torch.float32),
    "int4": (dict(quant="int4", group_size=128), torch.float32),
    "fp8": (dict(quant="fp8"), torch.float32),
}


def timed(fn, repeats):
    fn()  # warm-up (allocations, kernel selection)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rates(gen_fn, prompt_len, gen, repeats):
    """(prefill tok/s, decode tok/s) of gen_fn(n_new)."""
    t1 = timed(lambda: gen_fn(1), repeats)
    tg = timed(lambda: gen_fn(gen), repeats)
    return prompt_len / t1, (gen - 1) / max(tg - t1, 1e-9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    a = ap.parse_args()
    if a.device.startswith("cuda") and not (torch.cuda.is_available() and ne.cuda_available()):
        raise SystemExit("no CUDA GPU visible to torch and normengine (use --device cpu to check the script)")
    formats = a.formats.split(",")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"--formats: unknown {bad}; choose from {list(FORMATS)}")
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({ne.cpu_isa()}, {ne.num_threads()} threads)"
    print(f"device: {name}; prompt {a.prompt}, gen {a.gen}, median of {a.repeats}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                                  bos_token_id=None, eos_token_id=None)  # no eos: every run makes `gen` tokens
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (a.prompt,), generator=torch.Generator().manual_seed(1))
    hf_rates = {}
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        for dt in sorted({FORMATS[f][1] for f in formats}, key=str):
            h = hf.to(device=dev, dtype=dt)
            x = ids[None].to(dev)

            def hf_gen(n, h=h, x=x):
                with torch.no_grad():
                    return h.generate(x, max_new_tokens=n, do_sample=False,
                                      pad_token_id=0).cpu()

            hf_rates[dt] = rates(hf_gen, a.prompt, a.gen, a.repeats)
        hf.to("cpu")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{'engine':24s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill vs hf':>14s} {'decode vs hf':>13s}")
        for dt, (p, g) in hf_rates.items():
            print(f"{'transformers ' + str(dt).replace('torch.', ''):24s} {p:14.1f} {g:13.2f}")
        prompt = ids.tolist()
        for f in formats:
            kw, dt = FORMATS[f]
            m = ne.load(d, device=a.device, progress=False, **kw)
            p, g = rates(lambda n: m.generate(prompt, max_new_tokens=n), a.prompt, a.gen, a.repeats)
            hp, hg = hf_rates[dt]
            print(f"{'normengine ' + f:24s} {p:14.1f} {g:13.2f} {p / hp:13.2f}x {g / hg:12.2f}x")
            del m
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
