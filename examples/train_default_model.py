#!/usr/bin/env python3
"""Train normengine's small default model (shipped in python/normengine/data/tiny-gpt2/).

1. Trains a byte-level BPE tokenizer (the `tokenizers` package; vocab 1024, "<|endoftext|>" = id 0,
   GPT-2 style ByteLevel pre-tokenizer/decoder without a prefix space) on the corpus built by
   examples/build_corpus.py (Python stdlib docstrings, PSF-2.0).
2. Trains a GPT-2 (Hugging Face GPT2LMHeadModel layout: 4 layers, d=128, 4 heads, 256 positions,
   gelu_new, tied head, bos = eos = 0) on it with AdamW, linear warmup + cosine decay, on CPU.
3. Saves config.json + model.safetensors (float16 by default) + tokenizer.json into --out.

Reproducibility: everything is seeded (--seed). With --time-budget (the default) the number of
steps is chosen from the measured speed of the first steps, so it depends on the machine; the
script prints the number it chose, and `--steps N --time-budget 0` replays exactly N steps.

Usage:
    python examples/build_corpus.py
    python examples/train_default_model.py                      # ~12 minutes on 2 CPU cores
    python examples/train_default_model.py --steps 200 --time-budget 0 --out /tmp/tiny   # quick
Needs: torch, transformers, tokenizers, safetensors.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import sys
import time

# Sleep rather than spin in OpenMP barriers: on a shared or busy machine, spinning threads that
# wait on a preempted one make a 2-thread step several times slower than a 1-thread step.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "python", "normengine", "data"))
EOT = "<|endoftext|>"


def train_tokenizer(corpus_path: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # add_prefix_space only affects offsets in these two, but say "no prefix space" everywhere
    tok.decoder = decoders.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown input
        min_frequency=2,
        show_progress=False,
    )
    tok.train([corpus_path], trainer)
    assert tok.token_to_id(EOT) == 0, "expected <|endoftext|> to get id 0"
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def load_documents(corpus_path: str) -> list[str]:
    with open(corpus_path, encoding="utf-8") as f:
        text = f.read()
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def token_stream(tok, docs: list[str], eot_id: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, total: int, warmup: int, peak: float, floor_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    losses = [model(input_ids=x, labels=x).loss.item() for x in batches]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the default tiny GPT-2 of normengine.")
    ap.add_argument("--corpus", default=os.path.join(DATA, "corpus.txt"))
    ap.add_argument("--out", default=os.path.join(DATA, "tiny-gpt2"))
    ap.add_argument("--steps", type=int, default=100_000, help="maximum optimizer steps")
    ap.add_argument("--time-budget", type=float, default=690.0,
                    help="seconds of training (0 = no limit: run exactly --steps); the schedule is sized to fit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05, help="final lr as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--val-every", type=int, default=20, help="every Nth document is held out for validation")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    args = ap.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    t0 = time.time()
    tok = train_tokenizer(args.corpus, args.vocab)
    eot = tok.token_to_id(EOT)
    docs = load_documents(args.corpus)
    train_docs = [d for i, d in enumerate(docs) if i % args.val_every != args.val_every - 1]
    val_docs = [d for i, d in enumerate(docs) if i % args.val_every == args.val_every - 1]
    train_ids = token_stream(tok, train_docs, eot)
    val_ids = token_stream(tok, val_docs, eot)
    n_bytes = sum(len(d) for d in docs)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, trained in {time.time() - t0:.1f}s; corpus {n_bytes} chars, "
          f"{len(train_ids)} train / {len(val_ids)} val tokens "
          f"({n_bytes / (len(train_ids) + len(val_ids)):.2f} chars/token)", flush=True)

    config = GPT2Config(
        vocab_size=args.vocab, n_positions=256, n_embd=128, n_layer=4, n_head=4,
        activation_function="gelu_new", tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    assert args.seq <= config.n_positions
    model = GPT2LMHeadModel(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 {config.n_layer} layers, d={config.n_embd}, {config.n_head} heads, "
          f"{n_params} parameters (tied head)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    gen = torch.Generator().manual_seed(args.seed)

    def batch(ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - args.seq, (args.batch,), generator=g)
        return torch.stack([ids[s: s + args.seq] for s in starts.tolist()])

    vgen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [batch(val_ids, vgen) for _ in range(16)]

    total = args.steps
    budget = args.time_budget
    # With a time budget, the schedule's length is fixed at the end of warmup (the lr of warmup
    # steps does not depend on it), from the speed measured over warmup: so `--steps N
    # --time-budget 0` with the N printed below replays the same run exactly.
    probe_from, probe_to = min(10, args.warmup // 2), max(args.warmup, 20)
    print(f"step {0:5d}  val {evaluate(model, val_batches):.3f}", flush=True)
    t_train = t_probe = time.time()
    run_loss, run_n = 0.0, 0
    step = 0
    while step < total:
        lr = lr_at(step, total, args.warmup, args.lr, args.min_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch(train_ids, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item()
        run_n += 1
        if budget > 0 and step == probe_from:
            t_probe = time.time()
        if budget > 0 and step == probe_to:
            per_step = (time.time() - t_probe) / (probe_to - probe_from)
            left = budget - (time.time() - t_train)
            # leave ~3% of the budget for the periodic validation passes
            total = max(step + 1, min(args.steps, step + int(left * 0.97 / per_step)))
            print(f"  {per_step * 1000:.0f} ms/step -> {total} steps fit in {budget:.0f}s "
                  f"(replay exactly with --steps {total} --time-budget 0)", flush=True)
        if budget > 0 and step < total and time.time() - t_train > 1.25 * budget:
            print(f"  stopping at step {step} of {total}: over 1.25x the time budget (machine slowed down)")
            total = step
        if step % args.log_every == 0 or step == total or step == 1:
            msg = f"step {step:5d}  lr {lr:.2e}  train {run_loss / run_n:.3f}"
            if step % (args.log_every * 4) == 0 or step == total:
                msg += f"  val {evaluate(model, val_batches):.3f}"
            print(msg + f"  ({time.time() - t_train:.0f}s)", flush=True)
            run_loss, run_n = 0.0, 0
    final_val = evaluate(model, val_batches)
    print(f"done: {step} steps, {step * args.batch * args.seq} tokens, {time.time() - t_train:.0f}s; "
          f"final val loss {final_val:.3f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    for name in ("pytorch_model.bin", "model.safetensors", "generation_config.json"):
        p = os.path.join(args.out, name)
        if os.path.exists(p):
            os.remove(p)
    model = model.to(getattr(torch, args.dtype))
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers < 5; v5 always writes safetensors
    model.save_pretrained(args.out, **kwargs)
    # generation_config.json only repeats bos/eos ids that config.json already carries
    gc = os.path.join(args.out, "generation_config.json")
    if os.path.exists(gc):
        with open(gc) as f:
            extra = {k: v for k, v in json.load(f).items() if k != "transformers_version"}
        defaults = ("_from_model_config", "use_cache", "output_attentions", "output_hidden_states")
        if all(k in defaults or getattr(config, k, None) == v for k, v in extra.items()):
            os.remove(gc)
        else:
            print(f"keeping {gc}: {extra}")
    tok.save(os.path.join(args.out, "tokenizer.json"))
    for name in os.listdir(args.out):
        os.chmod(os.path.join(args.out, name), 0o644)  # safetensors writes 0600; ship world-readable
    sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in sorted(os.listdir(args.out))}
    print(f"saved {args.out}: " + ", ".join(f"{n} {s}" for n, s in sizes.items()) + f"; total {sum(sizes.values())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
