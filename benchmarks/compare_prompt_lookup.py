"""Speculative decoding by prompt lookup (generate(prompt_lookup=k)), or with drafts from the same checkpoint
loaded quantized (generate(draft_model=ne.load(PATH, quant=Q), draft_tokens=k), --draft-quant), against plain
decoding, same model, same prompt, greedy or sampled under one seed: decode tokens/s, runner steps (of the model;
the drafter's are its cost), tokens per step, and whether the tokens are the same.

    PYTHONPATH=python python3 benchmarks/compare_prompt_lookup.py [--model PATH] [--k 4,8,16] [--gen 128]
        [--threads 2] [--repeats 5] [--temperature 0] [--top-p 1] [--seed 0] [--draft-quant int8,int4]
        [--draft-k 2,4]

--model: a checkpoint (default: the model shipped in the package; one without a tokenizer.json gets the
shipped tokenizer's ids). The prompt: a passage of the package's corpus followed by its first sentences again
(a model that has learned to continue text copies the rest: the case prompt lookup serves: quoting, editing,
extraction). A random-weight model's greedy text soon repeats itself, so its acceptance is not a trained
model's: what it shows is the cost side, k + 1 rows a step against one. Decode time: from the first generated
token to the last (streamed), medians over --repeats, the modes alternated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--k", default="4,8,16")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--passage", type=int, default=600, help="characters of the corpus in the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else sampled")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="the sampling seed of every run")
    ap.add_argument("--draft-quant", default="", help="drafters: the model loaded with these quant= (comma list)")
    ap.add_argument("--draft-k", default="4", help="draft_tokens of the drafters")
    a = ap.parse_args(argv)
    import normengine as ne

    ne.set_num_threads(a.threads)
    m = ne.load(a.model)
    with open(os.path.join(os.path.dirname(ne.__file__), "data", "corpus.txt"), encoding="utf-8") as f:
        corpus = f.read()
    passage = corpus[: a.passage]
    tok = m.tokenizer or ne.load().tokenizer  # (a checkpoint without tokenizer.json: the shipped model's ids)
    ids = tok.encode(passage + "\n" + passage[: a.passage // 6]).ids
    gen = min(a.gen, m.config.max_seq_len - len(ids))
    if gen < 2:
        ap.error(f"the prompt ({len(ids)} tokens) leaves no room in the model's context of "
                 f"{m.config.max_seq_len}: pass a smaller --passage")
    steps = []
    forward = m._forward

    def counting(*args):
        steps.append(1)
        return forward(*args)

    m._forward = counting

    def run(kw):
        steps.clear()
        it = m.generate(ids, max_new_tokens=gen, stream=True, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                        **kw)
        toks = [next(it)]
        t0 = time.perf_counter()
        toks += list(it)
        return time.perf_counter() - t0, toks, len(steps) - 1

    modes = [("off", {})] + [(f"lookup {k}", {"prompt_lookup": int(k)}) for k in a.k.split(",") if k]
    for q in filter(None, a.draft_quant.split(",")):
        d = ne.load(a.model, quant=q)
        modes += [(f"draft {q} {k}", {"draft_model": d, "draft_tokens": int(k)}) for k in a.draft_k.split(",")]
    res = {label: [] for label, _ in modes}
    for _ in range(a.repeats):
        for label, kw in modes:
            res[label].append(run(kw))
    base_t = statistics.median(r[0] for r in res["off"])
    base_toks = res["off"][0][1]
    print(f"model {a.model or 'shipped default'} ({m.config.n_layers} layers, d {m.config.d_model}); prompt "
          f"{len(ids)} tokens, {len(base_toks)} generated; {a.threads} threads; medians of {a.repeats}; "
          + (f"temperature {a.temperature}, top_p {a.top_p}, seed {a.seed}" if a.temperature else "greedy"))
    print("| drafts | decode tok/s | runner steps | tokens / step | speed-up | same tokens as without |")
    print("|---|---:|---:|---:|---:|---|")
    for label, _ in modes:
        t = statistics.median(r[0] for r in res[label])
        n_steps, toks = res[label][0][2], res[label][0][1]
        print(f"| {label} | {(len(toks) - 1) / t:.1f} | {n_steps} | {len(toks) / max(n_steps, 1):.2f} | "
              f"{base_t / t:.2f}x | {toks == base_toks} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
