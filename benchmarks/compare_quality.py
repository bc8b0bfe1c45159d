"""What each load option does to a model's predictions: perplexity on held-out text, and against the
checkpoint loaded exactly (float32, no options) the top-1 agreement and the mean KL divergence of the
next-token distributions (normengine.evaluate.perplexity). Prints a markdown table (RESULTS.md, "What each
load option does to the shipped model").

    PYTHONPATH=python python3 benchmarks/compare_quality.py [PATH] [--text FILE] [--max-tokens 16384]

PATH defaults to the shipped model. The default text is held out from it: the docstrings of numpy's public
objects (inspect.getdoc of every numpy.* with 200+ characters, ASCII, joined by blank lines), made here,
so the figures depend on the numpy version (printed).
"""

from __future__ import annotations

import argparse
import inspect
import sys

# (label, normengine.load keyword arguments)
OPTIONS = [
    ("as stored", {}),
    ("dtype=bfloat16", {"dtype": "bfloat16"}),
    ("matmul_precision='medium', float32", {"matmul_precision": "medium", "dtype": "float32"}),
    ("quant='int8'", {"quant": "int8"}),
    ("quant='int8-weight'", {"quant": "int8-weight"}),
    ("quant='fp8'", {"quant": "fp8"}),
    ("quant='int4'", {"quant": "int4"}),
    ("quant='int4', group_size=32", {"quant": "int4", "group_size": 32}),
    ("arithmetic='lmul', lmul_bits=4", {"arithmetic": "lmul", "lmul_bits": 4}),
    ("arithmetic='lmul', lmul_bits=3", {"arithmetic": "lmul", "lmul_bits": 3}),
    ("arithmetic='lmul', lmul_bits=4, lmul_scope='all'", {"arithmetic": "lmul", "lmul_bits": 4, "lmul_scope": "all"}),
    ("kv_cache_dtype=bfloat16", {"kv_cache_dtype": "bfloat16"}),
    ("kv_cache_dtype=int8", {"kv_cache_dtype": "int8"}),
    ("norm='crmsnorm'", {"norm": "crmsnorm"}),
    ("norm='rmsnorm', float32", {"norm": "rmsnorm", "dtype": "float32"}),
    ("norm='crmsnorm', float32", {"norm": "crmsnorm", "dtype": "float32"}),
    ("attention='linear'", {"attention": "linear"}),
    ("attention='mala'", {"attention": "mala"}),
]


def numpy_docstrings() -> str:
    import numpy

    parts = []
    for name in sorted(dir(numpy)):
        obj = getattr(numpy, name, None)
        doc = inspect.getdoc(obj) if obj is not None else None
        if doc and len(doc) > 200:
            parts.append(doc)
    return "\n\n".join(parts).encode("ascii", "ignore").decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?", default=None)
    ap.add_argument("--text", default=None, help="UTF-8 text file (default: numpy's docstrings)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=None)
    args = ap.parse_args()
    import numpy
    import torch

    import normengine as ne
    from normengine import evaluate

    text = open(args.text, encoding="utf-8").read() if args.text else numpy_docstrings()
    base = ne.load(args.path, dtype=torch.float32)
    print(f"# {base!r}; text: {args.text or f'numpy {numpy.__version__} docstrings'} ({len(text)} characters)")
    rows = []
    for label, kw in OPTIONS:
        kw = {k: getattr(torch, v) if k in ("dtype", "kv_cache_dtype") else v for k, v in kw.items()}
        r = evaluate.perplexity(ne.load(args.path, **kw), text, context=args.context, baseline=base,
                                max_tokens=args.max_tokens)
        rows.append(f"| {label} | {r['perplexity']:.4f} | {100 * r['top1_agreement']:.2f}% | {r['kl_mean']:.3e} |")
    print(f"{r['tokens_scored']} positions scored in {r['windows']} windows of {r['context']}; exact (float32) "
          f"perplexity {r['baseline_perplexity']:.4f}\n")
    print("| load option | perplexity | top-1 agreement with exact | mean KL(exact ‖ this), nats |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
