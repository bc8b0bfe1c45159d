"""What an arithmetic choice does to a model, measured on text: perplexity through the native runner, and
against a baseline model (the same checkpoint loaded exactly) the top-1 agreement and the mean KL divergence
of the next-token distributions, as llama.cpp's `perplexity --kl-divergence` reports for its quantizations.

    r = normengine.evaluate.perplexity(ne.load(path, quant="int4"), text, baseline=ne.load(path))
    r["perplexity"], r["baseline_perplexity"], r["top1_agreement"], r["kl_mean"]

The token stream is cut into windows of `context` tokens, evaluated independently (each window a fresh
sequence from position 0, no overlap): every position but a window's first is scored, its target the next
token. Sums in float64.
"""

from __future__ import annotations

import math
import time

from .errors import ArgumentError, UnsupportedError

_LOGIT_BYTES = 256 << 20  # logits of one batch of windows: at most this much float32
_ROWS = 64  # positions whose float64 log-probabilities are formed at once


def _ids(model, text_or_ids) -> list:
    if isinstance(text_or_ids, str):
        if model.tokenizer is None:
            raise UnsupportedError("text: this checkpoint has no tokenizer.json; pass token ids instead")
        return model.tokenizer.encode(text_or_ids).ids
    try:
        ids = [int(t) for t in text_or_ids]
    except (TypeError, ValueError):
        raise ArgumentError("text: expected a str or a sequence of token ids") from None
    return ids


def perplexity(model, text_or_ids, *, context: int | None = None, baseline=None, max_tokens: int | None = None) -> dict:
    """Perplexity of `model` on a text (its tokenizer) or token ids, in windows of `context` tokens (default:
    the model's context, at most 512). With `baseline` (a Model of the same vocabulary, e.g. the checkpoint
    loaded without quantization or L-Mul): its perplexity on the same windows, the fraction of scored
    positions where both models' argmax agree, and the mean KL(baseline || model) in nats. `max_tokens`
    caps the tokens read. Returns a dict of floats and counts."""
    import torch

    ids = _ids(model, text_or_ids)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ArgumentError(f"max_tokens: expected an int >= 2, got {max_tokens!r}")
        ids = ids[:max_tokens]
    cfg = model.config
    if context is None:
        context = min(cfg.max_seq_len, 512)
    if not isinstance(context, int) or not 2 <= context <= cfg.max_seq_len:
        raise ArgumentError(f"context: expected an int in 2..{cfg.max_seq_len} (the model's context), got {context!r}")
    if baseline is not None and baseline.config.vocab_size != cfg.vocab_size:
        raise ArgumentError(f"baseline: vocabulary of {baseline.config.vocab_size} tokens, the model has {cfg.vocab_size}")
    n_win = len(ids) // context
    if n_win == 0:
        raise ArgumentError(f"text: {len(ids)} tokens, fewer than one window of context={context}")
    windows = [ids[i * context:(i + 1) * context] for i in range(n_win)]
    per_batch = max(1, _LOGIT_BYTES // (context * cfg.vocab_size * 4))

    nll = nll_base = kl = 0.0
    agree = scored = 0
    elapsed = 0.0
    for b0 in range(0, n_win, per_batch):
        batch = windows[b0:b0 + per_batch]
        target = torch.tensor(batch, dtype=torch.int64)[:, 1:]
        t0 = time.perf_counter()
        logits = model.logits(batch)
        elapsed += time.perf_counter() - t0
        base = baseline.logits(batch) if baseline is not None else None
        scored += target.numel()
        # float64 statistics, _ROWS positions at a time (a float64 copy of a whole batch's logits would
        # be twice its size again, per temporary)
        for w in range(len(batch)):
            for r0 in range(0, context - 1, _ROWS):
                r1 = min(context - 1, r0 + _ROWS)
                t = target[w, r0:r1, None]
                lp = torch.log_softmax(logits[w, r0:r1].double().cpu(), dim=-1)
                nll -= lp.gather(-1, t).sum().item()
                if base is not None:
                    lq = torch.log_softmax(base[w, r0:r1].double().cpu(), dim=-1)
                    nll_base -= lq.gather(-1, t).sum().item()
                    kl += (lq.exp() * (lq - lp)).sum().item()
                    agree += (lq.argmax(-1) == lp.argmax(-1)).sum().item()
        del logits, base
    out = {"tokens_scored": scored, "windows": n_win, "context": context, "nll_mean": nll / scored,
           "perplexity": math.exp(nll / scored), "tokens_per_second": n_win * context / elapsed}
    if baseline is not None:
        out.update(baseline_nll_mean=nll_base / scored, baseline_perplexity=math.exp(nll_base / scored),
                   top1_agreement=agree / scored, kl_mean=kl / scored)
    return out
