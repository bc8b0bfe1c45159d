"""normengine.load(checkpoint) -> Model: the native runner behind a small Python API.

The Model hands every weight to the C++ runner once (zero-copy views of tensors it keeps alive);
prefill, decode, the KV cache and sampling run natively. Python only shapes the inputs, streams
the outputs and decodes text.

Importing this module imports no torch: a checkpoint Model.save wrote, loaded on the CPU with the
default options, is read, placed and run without it (normengine._lite), and its Model generates
without it too. The methods that make or take torch tensors (logits, the tensors dict, save,
copies) import torch when called."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import sys
import threading
from typing import Iterator

import numpy as np

from . import _C, rope
from .config import ModelConfig, bf16_products
from .errors import ArgumentError, DeviceError, DTypeError, NumericalError, ShapeError, UnsupportedError

_NORM_KIND = {"layernorm": 0, "rmsnorm": 1, "crmsnorm": 2, "none": -1}
_ACT = {"gelu_tanh": 0, "gelu": 1, "silu": 2, "relu": 3}
_ATTN = {"softmax": 0, "linear": 1, "mala": 2, "norm": 3}
_FMAP = {"elu1": 0, "relu": 1, "identity": 2}
_QFORMAT = {"int8": 0, "int8-weight": 1, "int4": 2, "fp8": 3}
_LMUL_SCOPES = {"attention": 1, "all": 2}


def _torch():
    import torch

    return torch


def _torch_if_loaded():
    """The torch module if this process has imported it, else None (then no argument can be a tensor)."""
    return sys.modules.get("torch")


def _is_tensor(x) -> bool:
    torch = _torch_if_loaded()
    return torch is not None and isinstance(x, torch.Tensor)


def _is_weight_dtype(dtype) -> bool:
    """torch.float32, bfloat16 or float16: the dtypes the runner's linear weights come in."""
    torch = _torch_if_loaded()
    return torch is not None and dtype in (torch.float32, torch.bfloat16, torch.float16)


def _rope_spec(c: ModelConfig) -> dict:
    """The runner spec's RoPE table fields: none for plain RoPE (the runners compute theta^(-2i/D)
    themselves), else the variant's frequencies and attention factor (normengine.rope); and the
    sliding-window layers' own plain frequencies (Gemma 3's local RoPE)."""
    out = {}
    dim = c.rotary_dim or c.head_dim
    if not c.learned_pos and c.rope_scaling is not None:
        out.update(rope_inv_freq=rope.inv_freq(c.rope_theta, dim, c.rope_scaling).tolist(),
                   rope_attn_factor=rope.attention_factor(c.rope_scaling))
    if not c.learned_pos and c.rope_local_theta is not None:
        out.update(rope_inv_freq_local=rope.inv_freq(c.rope_local_theta, dim).tolist())
    return out


def _block_text(c: ModelConfig) -> str:
    """Model.info's block: how a block adds its branches to the stream, and its extras."""
    parts = ["parallel residual" if c.parallel_residual else "sequential residual"]
    if c.post_norms:
        parts.append("sandwich norms")
    if c.qk_norm:
        parts.append("q / k norms")
    if c.attn_softcap or c.final_softcap:
        parts.append(f"soft-capped scores {c.attn_softcap or 'no'} / logits {c.final_softcap or 'no'}")
    if c.emb_scale != 1.0:
        parts.append(f"embeddings x{c.emb_scale:g}")
    return ", ".join(parts)


def _experts_text(c: ModelConfig) -> str:
    """Model.info's mlp suffix for a mixture of experts: ', 8 experts (2 per token) of 14336 ...'."""
    if not c.n_experts:
        return ""
    n_moe = sum(c.is_moe_layer(i) for i in range(c.n_layers))
    text = (f", {c.n_experts} experts ({c.n_experts_used} per token{', renormalized' if c.moe_norm_topk else ''}) "
            f"of {c.moe_d_ff}")
    if c.shared_expert_d_ff:
        text += f" + a shared expert of {c.shared_expert_d_ff}"
    if n_moe < c.n_layers:
        text += f" in {n_moe} of {c.n_layers} layers"
    return text


def _quant_text(c) -> str:
    """config.quantization, and the weights held another way (config.quant_overrides) counted by format."""
    if c.quantization is None:
        return "none"
    if not c.quant_overrides:
        return c.quantization

    def text(f, g, sym):
        return "dense" if f == "none" else f + (f" g{g}" if g else "") + ("" if sym else " asym")

    count: dict = {}
    for name, o in c.quant_overrides.items():
        if name != "tok_emb.weight" or c.tied_head:
            key = text(o["format"], o["group_size"], o["symmetric"])
            count[key] = count.get(key, 0) + 1
    out = text(c.quantization, c.quant_group_size, c.quant_symmetric)
    if count:
        out += "; also " + ", ".join(f"{n} x {k}" for k, n in sorted(count.items()))
    emb = c.quant_overrides.get("tok_emb.weight")
    if emb is not None and not c.tied_head:
        out += "; embedding " + text(emb["format"], emb["group_size"], emb["symmetric"])
    return out


def _windows_text(w: list) -> str:
    """Model.info's sliding_window: 'none', '4096' (every layer) or '4096 (layers 3, 5)'."""
    used = sorted({x for x in w if x})
    if not used:
        return "none"
    if len(used) == 1 and all(w):
        return str(used[0])
    return "; ".join(f"{x} (layers {', '.join(str(i) for i, y in enumerate(w) if y == x)})" for x in used)


def _is_vector(name: str) -> bool:
    return name.endswith(".bias") or "norm" in name


def _parts(t) -> tuple:
    """The tensors a weight is made of: itself (a torch tensor, or a numpy array of a torch-free load),
    or a packed weight's data, scales (and zero points)."""
    return (t,) if isinstance(t, np.ndarray) or _is_tensor(t) else tuple(t.tensors().values())


def _nbytes(p) -> int:
    return p.nbytes if isinstance(p, np.ndarray) else p.numel() * p.element_size()


def _address(p) -> int:
    return p.ctypes.data if isinstance(p, np.ndarray) else p.data_ptr()


def _slots(tensors: dict) -> list:
    """(names, tensor, is_vector) for each tensor of the runner's: a tensor stored under several names
    (a tied head) is one slot, unless it serves as a vector under one and a matrix under another."""
    groups: dict = {}
    for name, t in tensors.items():
        groups.setdefault((id(t), _is_vector(name)), []).append(name)
    return [(names, tensors[names[0]], vec) for (_, vec), names in groups.items()]


def _stop_prefix_len(text: str, stops) -> int:
    """The length of the longest end of `text` that is a proper start of one of `stops`."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _int32s(torch, values):
    """An int32 vector for the runner: a torch tensor where torch is loaded (its binding path is the faster one),
    else a numpy array."""
    return np.array(values, dtype=np.int32) if torch is None else torch.tensor(values, dtype=torch.int32)


def _sampling(vocab, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty=None,
              presence_penalty=None):
    """generate()'s sampling options, checked: ((temperature, top_k, top_p, min_p) as the sampler takes them,
    (repetition, frequency, presence) penalties or None where all are off)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ArgumentError(f"temperature: expected a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ArgumentError(f"top_k: expected a non-negative int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ArgumentError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")
    if min_p is not None and not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        raise ArgumentError(f"min_p: expected a number in [0, 1] or None, got {min_p!r}")
    if repetition_penalty is not None and not (isinstance(repetition_penalty, (int, float)) and
                                               0 < repetition_penalty < float("inf")):
        raise ArgumentError(f"repetition_penalty: expected a number > 0 or None, got {repetition_penalty!r}")
    for name, v in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and -2 <= v <= 2):
            raise ArgumentError(f"{name}: expected a number in [-2, 2] or None, got {v!r}")
    rep = None if repetition_penalty in (None, 1, 1.0) else float(repetition_penalty)
    freq, pres = float(frequency_penalty or 0.0), float(presence_penalty or 0.0)
    # top_k at or past the vocabulary keeps every candidate (and stays within the sampler's int)
    return ((float(temperature), min(top_k or 0, vocab), 1.0 if top_p is None else float(top_p), float(min_p or 0.0)),
            (rep, freq, pres) if rep or freq or pres else None)


class _Penalty:
    """The penalties of one sequence, applied to each logits row before a token is chosen, in float32:
    - repetition (transformers' RepetitionPenaltyLogitsProcessor, CTRL's): the logit of every token id already in
      the sequence (its prompt and its new tokens, each id once) is divided by it where positive and multiplied by
      it where negative;
    - then frequency and presence (OpenAI's API, as vLLM applies them: over the new tokens only): the logit of a
      token generated c > 0 times so far is lowered by frequency * c + presence."""

    def __init__(self, spec, ids):
        self.rep, self.freq, self.pres = spec
        self.seen, self.idx = set(ids), None
        self.counts, self.cidx = {}, None

    def add(self, tok):
        if tok not in self.seen:
            self.seen.add(tok)
            self.idx = None
        self.counts[tok] = self.counts.get(tok, 0) + 1
        self.cidx = None

    def apply(self, row):
        """row: one float32 CPU logits row (torch or numpy), changed in place. Through a numpy view of a torch row:
        torch's own ops here would wake its thread pool, whose spinning threads then slow the runner's next step
        (measured: 3.3 ms a decode step on 2 cores)."""
        a = row if isinstance(row, np.ndarray) else row.numpy()
        if self.rep:
            if self.idx is None:
                self.idx = np.fromiter(self.seen, dtype=np.int64, count=len(self.seen))
            v = a[self.idx]
            a[self.idx] = np.where(v < 0, v * np.float32(self.rep), v / np.float32(self.rep))
        if (self.freq or self.pres) and self.counts:
            if self.cidx is None:
                self.cidx = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
                self.cval = (np.float32(self.freq) * np.fromiter(self.counts.values(), dtype=np.float32,
                                                                 count=len(self.counts)) + np.float32(self.pres))
            a[self.cidx] -= self.cval


@dataclasses.dataclass
class Generation:
    """generate(..., logprobs=n)'s result for one prompt (chat's too)."""

    output: object  # what generate returns without logprobs: the new text, or the list of new ids
    tokens: list  # every new token id (a text cut at a stop string may end before the last of them)
    logprobs: list  # per new token, its log-probability under the model: the log-softmax of the raw logits
    top_logprobs: list  # per new token, the n likeliest [(id, logprob)], likeliest first


def _split_stops(stop):
    """generate()'s `stop` (one or a list of token ids and strings) as (set of ids, list of strings)."""
    stop_ids, stop_strs = set(), []
    for s in ([] if stop is None else (stop if isinstance(stop, (list, tuple, set)) else [stop])):
        if isinstance(s, str):
            stop_strs.append(s)
        elif isinstance(s, int) and not isinstance(s, bool):
            stop_ids.add(s)
        else:
            raise ArgumentError(f"stop: expected token ids or strings, got {s!r}")
    return stop_ids, stop_strs


def _choose(row, sampler, params, penalty, watch):
    """The next token of a sequence from its logits row (a CPU float32 row, changed in place by the penalties):
    the row as the model gave it is kept for logprobs (watch), the penalties apply, the sampler draws, and the
    penalties count the token. Returns (token, (logprob, top) or None). The sampler's ArgumentError (NaN / +Inf
    logits) passes through for the caller to name the sequence."""
    raw = watch.raw(row) if watch is not None else None
    if penalty:
        penalty.apply(row)
    tok = sampler.sample(row, *params)
    if penalty:
        penalty.add(tok)
    return tok, (watch.info(tok, raw) if raw is not None else None)


def _check_logprobs(logprobs, stream) -> None:
    if logprobs is None:
        return
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20:
        raise ArgumentError(f"logprobs: expected an int in 0..20 (alternatives per token) or None, got {logprobs!r}")
    if stream:
        raise ArgumentError("logprobs: not with stream=True (the result carries them: a Generation)")


def _with_logprobs(out, watches, batched):
    """generate()'s result (one output or a list) as Generation objects."""
    outs = out if batched else [out]
    res = [Generation(o, list(w.tokens), [lp for lp, _ in w.logprobs], [top for _, top in w.logprobs])
           for o, w in zip(outs, watches)]
    return res if batched else res[0]


class _Watch:
    """What a caller (the server) reads of sequence 0 of a generation: its new token ids as they are made, and with
    top >= 0 the log-probability of each under the model (the log-softmax of its raw logits, before penalties
    and sampling cuts) with the `top` likeliest ids and theirs."""

    def __init__(self, top=None):
        self.tokens, self.top, self.logprobs = [], top, []

    def raw(self, row):
        """A float64 copy of a logits row before the penalties change it (None: logprobs not asked for); numpy's,
        not torch's (see _Penalty.apply)."""
        if self.top is None:
            return None
        return (row if isinstance(row, np.ndarray) else row.numpy()).astype(np.float64)

    def info(self, tok, raw):
        """(logprob of tok, [(id, logprob) of the top ids, likeliest first]) from a raw row."""
        mx = raw.max()
        lse = mx + np.log(np.exp(raw - mx).sum())
        top = []
        if self.top:
            ids = np.argpartition(-raw, self.top - 1)[:self.top]
            top = [(int(i), float(raw[i] - lse)) for i in sorted(ids, key=lambda i: (-raw[i], i))]
        return float(raw[tok] - lse), top


def _draft_plan(target, prompt_lookup, draft_model, draft_tokens, batched):
    """generate()'s speculative decoding options, checked: None (none), or (k, draft_model or None): up to k
    draft tokens a step, from prompt lookup or from the draft model's greedy decoding."""
    def tokens(k, what):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 64:
            raise ArgumentError(f"{what}: expected an int in 1..64 (draft tokens per step) or None, got {k!r}")
        return k

    if draft_model is None:
        if draft_tokens is not None:
            raise ArgumentError("draft_tokens: given without a draft_model")
        if prompt_lookup is None:
            return None
        k = tokens(prompt_lookup, "prompt_lookup")
    else:
        if prompt_lookup is not None:
            raise ArgumentError("prompt_lookup and draft_model: choose one source of drafts")
        if not isinstance(draft_model, Model):
            raise ArgumentError(f"draft_model: expected a normengine Model, got {type(draft_model).__name__}")
        if draft_model is target:
            raise ArgumentError("draft_model: the model itself (it cannot hold two caches): load the checkpoint "
                                "again, e.g. quantized (quant='int4')")
        if draft_model.config.vocab_size != target.config.vocab_size:
            raise ArgumentError(f"draft_model: its vocabulary ({draft_model.config.vocab_size} tokens) is not the "
                                f"model's ({target.config.vocab_size}): drafts must be the same token ids")
        if not all(a == "softmax" for a in draft_model.config.attention):
            raise ArgumentError("draft_model: its linear-family layers cannot give rejected drafts back; a draft "
                                "model needs softmax attention in every layer")
        k = tokens(4 if draft_tokens is None else draft_tokens, "draft_tokens")
    if batched:
        raise ArgumentError("speculative decoding (prompt_lookup / draft_model) is for one prompt, not a batch")
    return k, draft_model


def _sampler_seed(seed, torch) -> int:
    """The base seed of a generation's samplers: `seed`, else a draw from torch's generator where torch is
    loaded (torch.manual_seed governs unseeded sampling, as torch's own), else from the system."""
    if seed is not None:
        return seed
    if torch is not None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return random.SystemRandom().getrandbits(62)


class _NgramIndex:
    """Prompt-lookup drafts: for n = 1..3, the latest position at which each n-gram of the text so far was
    followed by another token; a draft continues the text's last n-gram (the longest n found) from its latest
    earlier occurrence. Updated per appended token (O(1) each)."""

    N = 3

    def __init__(self, tokens):
        self.tokens = []
        self.maps = [dict() for _ in range(self.N + 1)]
        for t in tokens:
            self.append(t)

    def append(self, tok):
        toks = self.tokens
        i = len(toks)  # tok's index: the n-grams ending just before it are followed by it
        for n in range(1, self.N + 1):
            if i >= n:
                self.maps[n][tuple(toks[i - n:i])] = i
        toks.append(tok)

    def draft(self, k):
        toks = self.tokens
        for n in range(min(self.N, len(toks)), 0, -1):
            at = self.maps[n].get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + k]
        return []


class _ModelDrafter:
    """Drafts for generate(draft_model=...): the draft model's greedy continuation of the text so far. Its own
    KV cache (slot 0 of its runner) follows the text: before each draft, what it holds past the longest prefix
    the text still has (its rejected drafts) is cut back and only the rest is fed. Another call on the draft
    model in between takes its runner: the text is then prefilled again."""

    def __init__(self, model, tokens, ctx):
        self.m, self.tokens, self.ctx = model, list(tokens), min(ctx, model.config.max_seq_len)
        self.me, self.held, self.r = object(), [], None
        self.sampler = _C.Sampler(0)
        torch = _torch_if_loaded()
        self.ints = functools.partial(_int32s, torch)  # (the step's inputs and its logits row, made once)
        vocab = model.config.vocab_size
        self.row = np.empty((1, vocab), dtype=np.float32) if torch is None else \
            torch.empty(1, vocab, dtype=torch.float32, device=model.device)

    def append(self, tok):
        self.tokens.append(tok)

    def prime(self):
        """Prefill the text so far (generate calls this with the model's own prefill: the drafter's prefill is
        part of the time to the first token, not of the first step)."""
        self.draft(0)

    def draft(self, k):
        m, toks = self.m, self.tokens
        k = min(k, self.ctx - len(toks))  # (the text's end within the draft model's context, too)
        if k < 0:
            return []
        ints, row = self.ints, self.row
        with m._lock:
            if self.r is None or m._user is not self.me:
                self.r, self.held = m._runner_for(1, self.ctx, self.me), []
            n = 0  # the prefix of the text its cache holds (one token at least is fed: its logits draft)
            for a, b in zip(self.held, toks[:-1]):
                if a != b:
                    break
                n += 1
            if n < len(self.held) and not self.r.truncate(0, n):  # pragma: no cover - softmax caches cut back
                self.r, self.held, n = m._runner_for(1, self.ctx, self.me), [], 0
            del self.held[n:]
            feed = toks[n:]
            out = []
            while True:
                m._forward(self.r, ints([0]), ints(feed), ints([len(feed)]), row, False)
                self.held.extend(feed)
                if k == 0:  # (prime: the text is in the cache)
                    return out
                tok = self.sampler.sample(row[0].cpu() if m._cuda else row[0], 0.0, 0, 1.0)
                out.append(tok)
                if len(out) == k:
                    return out
                feed = [tok]


class Model:
    """A loaded model. Use `normengine.load(path)` to make one.

    logits(ids) -> float32 [B, T, vocab];  generate(prompt, ...) -> new ids or text."""

    def __init__(self, config: ModelConfig, tensors: dict, *, device: str = "cpu", dtype=None, tokenizer=None,
                 path: str | None = None, arithmetic: str | None = None, lmul_bits: int = 4,
                 lmul_scope: str = "attention", matmul_precision: str = "highest", kv_cache_dtype=None,
                 _owned: bool = False):
        import torch

        from . import _arena
        from .checkpoint.safetensors_io import copy_releasing, release_pages
        from .ops.quant import QuantizedWeight
        from .convert.norms import check_float16_range
        from .convert.quant import is_quantized

        dev = torch.device(device)
        if dev.type == "cuda":
            dev = _cuda_device(dev, device)
        elif dev.type != "cpu":
            raise DeviceError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        if dtype is not None and not _is_weight_dtype(dtype):
            raise DTypeError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if self._set_options(config, arithmetic, lmul_bits, lmul_scope, matmul_precision, kv_cache_dtype):
            dtype = torch.float32  # L-Mul reads float32 operands
        self.path = path
        self.tokenizer = tokenizer
        self._device = dev
        # Linear weights and embeddings in the requested dtype (or as stored); norm gains and biases
        # in float32, as the kernels read them. Tensors shared in the checkpoint stay shared.
        # _owned (normengine.load): `tensors` is ours to consume; each source leaves the dict once
        # converted and the pages of a mapped source are handed back, so the old and the new copy of
        # the weights never coexist in full.
        converted: dict = {}
        plans = []  # (names, source, the dtype the runner reads it in; None: a packed weight)
        for names, t, vec in _slots(tensors):
            if is_quantized(t):  # packed weights stay packed (the runner reads them as they are)
                plans.append((names, t, None))
                continue
            if not t.is_floating_point():
                raise DTypeError(f"{names[0]}: expected a floating-point tensor, got {t.dtype}")
            want = torch.float32 if vec else (dtype or (t.dtype if _is_weight_dtype(t.dtype) else torch.float32))
            plans.append((names, t, want))
        # normengine.load on the CPU: every weight is written into its slot of one huge-page arena
        # (normengine._arena: fewer TLB misses while a decode step streams them), [q; k; v] and
        # [gate; up] back to back there, so the runner reads each group as one GEMM's matrix
        arena = None
        if _owned and dev.type == "cpu":
            plans = _adjacent_order(plans, config.n_layers)
            # a dense weight takes the dtype it is converted to, a packed one's parts keep theirs
            arena = _arena.Arena(sum(_arena.Arena.room(p.shape, want or p.dtype)
                                     for _, t, want, _ in plans for p in _parts(t)))
        else:
            plans = [p + (False,) for p in plans]
        for k in range(len(plans)):
            (names, t, want, follow), plans[k] = plans[k], None  # the source's last references go below
            if want is None:
                if arena is not None:
                    parts = {key: arena.take(p.shape, p.dtype) for key, p in t.tensors().items()}
                    t.write_into(parts)  # (a GGUF file's blocks: unpacked straight into the arena)
                    c = QuantizedWeight.from_tensors(parts, t.format, t.group_size, t.shape)
                else:
                    c = t.to(dev)
            else:
                if arena is not None:
                    # a mapped source leaves memory block by block as it is copied
                    c = copy_releasing(t.detach(), want, out=arena.take(t.shape, want, follow))
                else:
                    c = t.detach().to(device=dev, dtype=want)
                    if not c.is_contiguous():
                        c = c.contiguous()
                check_float16_range(c, t, names[0])
            for n in names:
                converted[n] = c
            if _owned:
                if isinstance(c, torch.Tensor) and c.data_ptr() != t.data_ptr():
                    release_pages(t)
                if arena is not None:
                    arena.freed(sum(p.numel() * p.element_size() for p in _parts(t)))
                for n in names:
                    del tensors[n]
            del t
        # Projections reading the same input run as one GEMM in the runner when their weights lie
        # back to back: place [q; k; v] and [gate; up] (and their biases) in one buffer each (the
        # arena has done so already).
        for i in range(config.n_layers):
            p = f"blocks.{i}."
            for group in _ADJACENT:
                for suffix in (".weight", ".bias"):
                    _make_adjacent(converted, [p + g + suffix for g in group], release_pages if _owned else None)
        self._weights, self._arrays = converted, False
        self._dtype = dtype or next(
            (t.dtype for n, t in converted.items() if n.endswith("attn.q.weight") and isinstance(t, torch.Tensor)),
            torch.float32,
        )
        self._init_runtime()

    def _set_options(self, config, arithmetic, lmul_bits, lmul_scope, matmul_precision, kv_cache_dtype) -> bool:
        """Check and record the run options (both constructors); True when they need float32 weights."""
        if arithmetic not in (None, "exact", "lmul"):
            raise ArgumentError(f"arithmetic: expected None, 'exact' or 'lmul', got {arithmetic!r}")
        f32 = False
        if arithmetic == "lmul":
            if lmul_scope not in _LMUL_SCOPES:
                raise ArgumentError(f"lmul_scope: expected 'attention' or 'all', got {lmul_scope!r}")
            if isinstance(lmul_bits, bool) or not isinstance(lmul_bits, int) or not 1 <= lmul_bits <= 23:
                raise ArgumentError(f"lmul_bits: expected an int mantissa width in 1..23, got {lmul_bits!r}")
            if lmul_scope == "all" and config.quantization is not None:
                raise ArgumentError("arithmetic='lmul' with lmul_scope='all' needs full-precision weights, "
                                    f"but the model is quantized ({config.quantization})")
            f32 = lmul_scope == "all"
        bf16_products(matmul_precision)  # a bad value raises here, at load
        self.matmul_precision = matmul_precision
        torch = _torch_if_loaded()
        if kv_cache_dtype is not None and (torch is None or
                                           kv_cache_dtype not in (torch.float32, torch.bfloat16, torch.int8)):
            raise DTypeError("kv_cache_dtype: expected None, torch.float32, torch.bfloat16 or torch.int8, got "
                             f"{kv_cache_dtype}")
        self._kv_bf16 = torch is not None and kv_cache_dtype == torch.bfloat16
        self._kv_int8 = torch is not None and kv_cache_dtype == torch.int8
        if (self._kv_bf16 or self._kv_int8) and arithmetic == "lmul":
            raise ArgumentError(f"kv_cache_dtype={kv_cache_dtype}: L-Mul attention reads a float32 KV cache")
        self.arithmetic = "lmul" if arithmetic == "lmul" else "exact"
        self.lmul_bits = int(lmul_bits) if arithmetic == "lmul" else 0
        self.lmul_scope = lmul_scope if arithmetic == "lmul" else None
        self.config = config
        return f32

    @classmethod
    def _from_arrays(cls, config: ModelConfig, arrays: dict, dtype: str, *, path=None, tokenizer=None,
                     arithmetic=None, lmul_bits: int = 4, lmul_scope: str = "attention",
                     matmul_precision: str = "highest") -> "Model":
        """A CPU model over numpy arrays the runner reads as they are (normengine._lite: final dtypes,
        contiguous, [q; k; v] and [gate; up] adjacent); dtype names the linear weights' dtype."""
        self = cls.__new__(cls)
        if self._set_options(config, arithmetic, lmul_bits, lmul_scope, matmul_precision, None) \
                and dtype != "float32":
            raise AssertionError("_from_arrays: L-Mul over every matmul needs float32 weights")  # _lite checks
        self.path, self.tokenizer, self._device = path, tokenizer, "cpu"
        self._weights, self._arrays, self._dtype = arrays, True, dtype
        self._init_runtime()
        return self

    def _init_runtime(self) -> None:
        self._runner = None
        self._slots = self._ctx = 0
        # The runner (its KV caches) serves one call at a time: _lock is held for each step, and
        # _user is the call whose sequences the caches hold. A streaming generation suspended
        # between tokens may find another call has used the runner since (its caches reset): it then
        # prefills its sequences again (prompt + tokens so far) before going on, so interleaved
        # calls, or calls from several threads, each get what they would get alone.
        self._lock = threading.RLock()
        self._user = None
        self._handed = self._handed_tensors = None
        # Prompt caching: (the generation that last used the runner, the token ids its slot 0 holds). A
        # single-sequence generate whose prompt starts with some of those tokens keeps them and prefills
        # only the rest (as llama.cpp's cached prompt), while no other call has used the runner since.
        self._prefix = None
        # the chat template: False until read from self.path (a copy keeps the one it was given)
        self.__dict__.setdefault("_chat_template", False)

    # ------------------------------------------------------------------ torch views of the state
    @property
    def tensors(self) -> dict:
        """The weights by canonical name: torch tensors (or packed QuantizedWeights) the runner reads in
        place. A torch-free load holds numpy arrays: they become torch views of the same memory on
        first use here (importing torch)."""
        if self._arrays:
            from ._packed import QuantizedWeight
            from .checkpoint.safetensors_io import as_torch

            def view(a):  # a numpy array, or a packed weight of them
                if isinstance(a, np.ndarray):
                    return as_torch(a)
                parts = {k: as_torch(p) for k, p in a.tensors().items()}
                return QuantizedWeight.from_tensors(parts, a.format, a.group_size, a.shape)

            with self._lock:
                if self._arrays:
                    current = self._runner is not None and not self._stale()
                    views: dict = {}
                    for a in self._weights.values():
                        if id(a) not in views:
                            views[id(a)] = view(a)
                    self._weights = {n: views[id(a)] for n, a in self._weights.items()}
                    self._arrays = False
                    if current:  # the same memory: the runner stays valid
                        self._handed = self._weights_state()
        return self._weights

    @tensors.setter
    def tensors(self, value: dict) -> None:
        self._weights, self._arrays = value, False

    @property
    def dtype(self):
        """The linear weights' torch dtype."""
        return getattr(_torch(), self._dtype) if isinstance(self._dtype, str) else self._dtype

    @property
    def device(self):
        """The torch.device the model runs on."""
        return _torch().device(self._device) if isinstance(self._device, str) else self._device

    @property
    def kv_cache_dtype(self):
        """torch.float32, torch.bfloat16 or torch.int8: the softmax layers' K and V cache."""
        torch = _torch()
        return torch.bfloat16 if self._kv_bf16 else torch.int8 if self._kv_int8 else torch.float32

    @property
    def _cuda(self) -> bool:
        return not isinstance(self._device, str) and self._device.type == "cuda"

    def _dtype_name(self) -> str:
        return str(self._dtype).replace("torch.", "")

    # ------------------------------------------------------------------ copies
    _RUNTIME = ("_runner", "_slots", "_ctx", "_lock", "_user", "_handed", "_handed_tensors", "_prefix")

    def _state(self) -> dict:
        """Everything but the runtime (the runner, its lock and bookkeeping)."""
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __getstate__(self):
        """pickle: the weights, config and settings; the runner (native memory, KV caches) and its lock
        are rebuilt by the copy on its first call. torch pickles a tensor with the whole storage it
        views, once per tensor: the weights of a loaded model are views of one arena, so each is
        pickled as a compact copy of its own bytes (tensors shared under several names stay shared)."""
        from .convert.quant import is_quantized
        from .ops.quant import QuantizedWeight

        def compact(t):
            return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t

        state = self._state()
        done: dict = {}
        tensors = {}
        for name, t in self.tensors.items():  # (torch views, for a torch-free load)
            if id(t) not in done:
                if is_quantized(t):
                    parts = {key: compact(p) for key, p in t.tensors().items()}
                    done[id(t)] = QuantizedWeight.from_tensors(parts, t.format, t.group_size, t.shape)
                else:
                    done[id(t)] = compact(t)
            tensors[name] = done[id(t)]
        state["_weights"], state["_arrays"] = tensors, False
        return state

    def __deepcopy__(self, memo):
        """copy.deepcopy: the state deep-copied as is (torch copies a storage shared by several views
        once), the runtime rebuilt as after unpickling."""
        import copy

        new = Model.__new__(Model)
        memo[id(self)] = new
        self.tensors  # noqa: B018 (torch views first, for a torch-free load: deepcopy copies tensors)
        new.__setstate__(copy.deepcopy(self._state(), memo))
        return new

    def __setstate__(self, state):
        state = dict(state)
        if "tensors" in state:  # pickled before the weights could be numpy arrays (plain attributes then)
            state["_weights"], state["_arrays"] = state.pop("tensors"), False
            state["_dtype"], state["_device"] = state.pop("dtype"), state.pop("device")
            state["_kv_bf16"] = str(state.pop("kv_cache_dtype")) == "torch.bfloat16"
        state.setdefault("_kv_int8", False)  # (pickled before int8 caches)
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------ runner management
    def _spec(self) -> dict:
        c = self.config
        return dict(
            vocab=c.vocab_size, d_model=c.residual_width, n_layers=c.n_layers, n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, d_ff=c.d_ff, max_seq_len=c.max_seq_len,
            norm=_NORM_KIND[c.norm], norm_eps=float(c.norm_eps), activation=_ACT[c.activation],
            gated_mlp=c.gated_mlp, learned_pos=c.learned_pos, rope_theta=float(c.rope_theta),
            qkv_bias=c.qkv_bias, o_bias=c.o_bias, mlp_bias=c.mlp_bias, head_bias=c.head_bias,
            attention=[_ATTN[a] for a in c.attention], linear_feature_map=_FMAP[c.linear_feature_map],
            linear_normalize=bool(c.linear_normalize), norm_attention_norm=0 if c.norm_attention_norm == "rms" else 1,
            linear_eps=float(c.linear_eps), lmul_scope=_LMUL_SCOPES.get(self.lmul_scope, 0),
            lmul_bits=self.lmul_bits or 4, bf16_products=bf16_products(self.matmul_precision),
            kv_bf16=self._kv_bf16, kv_int8=self._kv_int8, qk_norm=c.qk_norm, window=list(c.sliding_window),
            emb_scale=float(c.emb_scale),
            attn_scale=float(c.attn_scale or 0.0), post_norms=c.post_norms, rope_dim=c.rotary_dim,
            parallel_residual=c.parallel_residual, attn_softcap=float(c.attn_softcap or 0.0),
            final_softcap=float(c.final_softcap or 0.0), n_experts=c.n_experts, n_experts_used=c.n_experts_used,
            moe_d_ff=c.moe_d_ff, shared_d_ff=c.shared_expert_d_ff, moe_norm_topk=c.moe_norm_topk,
            moe_layers=[int(b) for b in c.moe_layers], **_rope_spec(c),
        )

    def _runner_for(self, slots: int, ctx: int, user=None):
        """A runner with at least `slots` sequences of `ctx` positions (made anew only when larger), its
        caches reset for `user` (the call about to use it; the caller holds self._lock across its step)."""
        if ctx > self.config.max_seq_len:
            raise ShapeError(
                f"sequence length {ctx} exceeds the model's context of {self.config.max_seq_len} tokens"
            )
        # The runner reads the weights in place (no copies). A weight replaced in self.tensors since
        # (the old one possibly freed), or changed in place by a torch op (its version counter moved;
        # the runner derives things from some weights when it is built, e.g. whether the norms are
        # bare), means a new runner: a stale one would read freed memory or outdated weights.
        if self._stale():
            self._runner, self._handed_tensors = None, None
        if self._runner is None or slots > self._slots or ctx > self._ctx:
            slots = max(slots, self._slots)
            ctx = max(ctx, self._ctx)
            self._runner = None  # free the old caches first
            if self._cuda:
                r = _C.CudaRunner(self._spec(), slots, ctx, self._device.index)
            else:
                r = _C.Runner(self._spec(), slots, ctx)
            from .checkpoint.safetensors_io import is_bf16

            for name, t in self._weights.items():
                if isinstance(t, np.ndarray):  # a torch-free load's
                    r.set_tensor(name, t, is_bf16(t))
                elif _is_tensor(t):
                    r.set_tensor(name, t)
                else:  # a packed weight
                    r.set_quant_tensor(name, _QFORMAT[t.format], t.data, t.scale, t.zero, t.group_size,
                                       t.sub, t.sub_zero, t.super_groups)
            r.finalize()
            self._runner, self._slots, self._ctx = r, slots, ctx
            self._handed_tensors = dict(self._weights)  # kept alive for as long as the runner reads them
            self._handed = self._weights_state()
        for s in range(slots):
            self._runner.reset(s)
        self._user = object() if user is None else user  # whatever a suspended generation held is gone
        return self._runner

    def _stale(self) -> bool:
        """No runner yet, or one built over weights replaced or changed in place since."""
        return self._runner is None or self._handed != self._weights_state()

    def _weights_state(self) -> tuple:
        """Identity and version counter of every weight tensor (those of packed weights included)."""
        state = []
        for name, t in self._weights.items():  # (a numpy array has no version counter)
            state.append((name, id(t)) + tuple(getattr(p, "_version", 0) for p in _parts(t)))
        return tuple(state)

    def _fused_norms(self) -> bool:
        with self._lock:
            if self._stale():
                self._runner_for(1, 1)
            return bool(self._runner.fused_norms())

    def _forward(self, r, slots, tokens, lens, logits, all_logits: bool) -> None:
        """One runner step. On CUDA it is enqueued on torch's current stream (logits: a CUDA tensor)."""
        if self._cuda:
            r.forward(slots, tokens, lens, logits, all_logits, _torch().cuda.current_stream(self._device).cuda_stream)
        else:
            r.forward(slots, tokens, lens, logits, all_logits)

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _as_id_lists(ids, what):
        """Token ids in a numpy array or an int tensor, [T] or [B, T], as a list or a list of lists;
        anything else unchanged (checked as lists later)."""
        if isinstance(ids, np.ndarray):
            if ids.dtype.kind not in "iu":
                raise DTypeError(f"{what}: expected integer token ids, got a numpy array of {ids.dtype}")
            if ids.ndim not in (1, 2):
                raise ShapeError(f"{what}: expected shape [T] or [B, T], got {tuple(ids.shape)}")
            return ids.tolist()
        if _is_tensor(ids):
            if ids.dtype.is_floating_point or ids.dtype == _torch().bool:
                raise DTypeError(f"{what}: expected integer token ids, got a tensor of {ids.dtype}")
            if ids.dim() not in (1, 2):
                raise ShapeError(f"{what}: expected shape [T] or [B, T], got {tuple(ids.shape)}")
            return ids.tolist()
        return ids

    def _check_ids(self, seq, what="prompt") -> list:
        if _is_tensor(seq):
            seq = seq.tolist()
        if not isinstance(seq, (list, tuple)):
            raise DTypeError(f"{what}: expected a list of token ids, got {type(seq).__name__}")
        if len(seq) == 0:
            raise ShapeError(f"{what}: empty prompt (at least one token is needed)")
        out = []
        for i, t in enumerate(seq):
            if isinstance(t, bool) or not isinstance(t, int):
                try:
                    if isinstance(t, np.integer):
                        t = int(t)
                    else:
                        raise TypeError
                except TypeError:
                    raise DTypeError(f"{what}[{i}]: expected an int token id, got {type(t).__name__}") from None
            if not 0 <= t < self.config.vocab_size:
                raise ArgumentError(f"{what}[{i}]: token id {t} out of range [0, {self.config.vocab_size})")
            out.append(t)
        return out

    def _batch_ids(self, ids) -> tuple[list, bool]:
        """(list of id lists, was_batched)."""
        ids = self._as_id_lists(ids, "ids")
        if isinstance(ids, (list, tuple)) and ids and (isinstance(ids[0], (list, tuple)) or _is_tensor(ids[0])):
            return [self._check_ids(r, f"ids[{i}]") for i, r in enumerate(ids)], True
        return [self._check_ids(ids, "ids")], False

    # ------------------------------------------------------------------ logits
    def logits(self, ids):
        """Logits of every position: ids is a list of ids, a list of equal-length lists, or an int
        tensor [B, T]; returns a float32 torch tensor [B, T, vocab] (a 1-D input still gets B = 1), on
        the model's device."""
        import torch

        from .ops._tensor import empty

        seqs, _ = self._batch_ids(ids)
        T = len(seqs[0])
        if any(len(s) != T for s in seqs):
            raise ShapeError("ids: sequences of different lengths; logits() needs equal lengths (or call it per sequence)")
        B = len(seqs)
        # [T, vocab] float32 passes 32 MiB from T = 168 on GPT-2: from the host cache (ops._tensor.empty)
        out = empty((B * T, self.config.vocab_size), torch.float32, self.device)
        tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
        with self._lock:
            r = self._runner_for(B, T)
            self._forward(r, torch.arange(B, dtype=torch.int32), tokens, torch.full((B,), T, dtype=torch.int32), out,
                          True)
        return out.view(B, T, -1)

    # ------------------------------------------------------------------ generation
    def _encode(self, text: str) -> list:
        if self.tokenizer is None:
            raise UnsupportedError(
                "prompt: a text prompt needs a tokenizer.json beside the checkpoint; pass token ids instead"
            )
        return self.tokenizer.encode(text).ids

    def _eos(self) -> set:
        e = self.config.eos_token_id
        if e is None:
            return set()
        return set(e) if isinstance(e, (list, tuple)) else {e}

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop=None, stream: bool = False,
                 cache_prompt: bool = False, prompt_lookup: int | None = None, draft_model=None,
                 draft_tokens: int | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, frequency_penalty: float | None = None,
                 presence_penalty: float | None = None, logprobs: int | None = None):
        """Generate up to max_new_tokens after each prompt.

        prompt: a list of ids (returns the list of new ids), a string when the checkpoint has a
        tokenizer.json (returns the new text), or a list of either, of any lengths (returns a list).
        temperature 0 is greedy; otherwise softmax sampling restricted by top_k / top_p / min_p (in that
        order, as transformers' warpers: min_p keeps the tokens whose probability is at least min_p times the
        top token's), reproducible under `seed`, any int (each sequence of a batch draws from its own
        generator seeded seed + i, so a batch gives what its prompts give one by one). repetition_penalty
        (greedy or sampled; transformers' and CTRL's): the logit of every token already in the sequence,
        prompt included, is divided by it where positive and multiplied where negative before the token is
        chosen (> 1 discourages repeats; 1 or None: off). frequency_penalty / presence_penalty (OpenAI's,
        in [-2, 2], over the new tokens as vLLM applies them): after that, the logit of a token generated c > 0
        times so far is lowered by frequency_penalty * c + presence_penalty. Generation of a sequence stops at the
        model's eos token (kept in the output) or at any of `stop` (token ids, or strings for text prompts).
        stream=True returns an iterator yielding each new token (id, or text piece) as it is made;
        for a batch it yields (index, token) pairs. Calls on one Model may interleave (a stream left
        suspended while other calls run, or calls from several threads): the runner serves one step at
        a time, and a stream whose KV cache another call has reset prefills its text so far again
        before going on (same tokens, up to float rounding of prefill against decode; slower).
        cache_prompt=True (a single prompt): when the previous call on this Model was a single-sequence
        generation, the KV cache still holds its text (prompt and tokens fed back), and the new prompt
        starts with some of it (a chat going on, a prompt regenerated), only the rest is prefilled (the
        caches are then sized for twice the call's text, up to the model's context, so that the next
        turns fit: a runner grown anew starts empty). The logits then differ from a fresh prefill's by
        float rounding (other kernels' summation orders), so a near-tie can pick another token: off by
        default, as a seed reproduces tokens exactly only without it.
        prompt_lookup=k (one prompt): speculative decoding by prompt lookup. Each step drafts up to k tokens by
        finding the latest earlier occurrence of the text's last 3 (else 2, else 1) tokens and copying what
        followed it, and verifies the draft in the same forward as the next token (k + 1 rows of a GEMM that
        streams the weights once, about the cost of one token on a memory-bound CPU): the token after each
        position is chosen as without drafts (the argmax, or with temperature > 0 a draw from the same sampler),
        drafted tokens are kept while those choices equal them, and the KV cache is cut back past the first one
        that differs. Text that repeats its context (code edits, quoting, summaries, extraction) then takes
        several tokens a step. When sampling this is exact speculative sampling (a draft that is one token
        accepts it with probability p(token) and otherwise draws from p without it, which is what one draw from
        p compared with the draft does), and under a seed the tokens are those of generate without
        prompt_lookup. In both modes up to float rounding: a step verifies several rows at once, so a near-tie
        may resolve differently than in one-token decoding.
        draft_model=m, draft_tokens=k (default 4; one prompt): speculative decoding with drafts from another
        Model of the same vocabulary: m's greedy continuation of the text, k tokens a step (its own KV cache
        follows the text; rejected drafts are cut from it), verified as prompt-lookup drafts are: the same
        tokens as without drafts, greedy or sampled. It pays when m is much cheaper per token than this model
        and agrees with it often: a smaller model of the same family, or this checkpoint loaded again quantized
        (ne.load(path, quant="int4")) as its own drafter.
        logprobs=n (0..20, not with stream): the result is a Generation (a list of them for a batch) holding the
        output above, the new token ids, each one's log-probability under the model (the log-softmax of its raw
        logits, before penalties and sampling cuts) and the n likeliest alternatives at each step."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ArgumentError(f"max_new_tokens: expected a non-negative int, got {max_new_tokens!r}")
        sampling = _sampling(self.config.vocab_size, temperature, top_k, top_p, min_p, repetition_penalty,
                             frequency_penalty, presence_penalty)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ArgumentError(f"seed: expected an int or None, got {seed!r}")
        if not isinstance(cache_prompt, bool):
            raise ArgumentError(f"cache_prompt: expected True or False, got {cache_prompt!r}")
        prompt = self._as_id_lists(prompt, "prompt")  # [T] -> one prompt, [B, T] -> a batch
        batched = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], (str, list, tuple))
        draft = _draft_plan(self, prompt_lookup, draft_model, draft_tokens, batched)
        _check_logprobs(logprobs, stream)
        prompts = list(prompt) if batched else [prompt]
        text = [isinstance(p, str) for p in prompts]
        ids = [self._encode(p) if t else self._check_ids(p) for p, t in zip(prompts, text)]
        watches = None if logprobs is None else [_Watch(logprobs) for _ in ids]
        out = self._generate_ids(ids, text, batched, max_new_tokens, sampling, seed, stop, stream, cache_prompt,
                                 draft, watches)
        return out if watches is None else _with_logprobs(out, watches, batched)

    def _generate_ids(self, ids, text, batched, max_new_tokens, sampling, seed, stop, stream, cache_prompt,
                      draft=None, watches=None):
        """generate() on prompts already tokenized (text[i]: yield / return sequence i as text). watches: one _Watch
        a sequence, which receives its new token ids (and their logprobs) as they are made."""
        for i, s in enumerate(ids):
            if len(s) == 0:
                raise ShapeError(f"prompt[{i}]: empty prompt (at least one token is needed)" if batched
                                 else "prompt: empty prompt (at least one token is needed)")
            if len(s) > self.config.max_seq_len:
                raise ShapeError(f"prompt: {len(s)} tokens exceed the model's context of {self.config.max_seq_len}")
        stop_ids, stop_strs = _split_stops(stop)
        if draft:
            gen = self._generate_lookup(ids[0], text[0], max_new_tokens, sampling, seed, stop_ids | self._eos(),
                                        stop_strs, cache_prompt, *draft, watch=watches[0] if watches else None)
        else:
            gen = self._generate(ids, text, max_new_tokens, sampling, seed, stop_ids | self._eos(), stop_strs,
                                 cache_prompt, watches=watches)
        if stream:
            return self._stream(gen, batched)
        results = [[] for _ in ids]
        for i, tok in gen:
            results[i].append(tok)
        outs = [self._finish(r, t, stop_strs) for r, t in zip(results, text)]
        return outs if batched else outs[0]

    # ------------------------------------------------------------------ chat
    @property
    def chat_template(self):
        """The checkpoint's chat template (normengine.chat.ChatTemplate; None where it declares none),
        read on first use; assign a ChatTemplate, a built-in name ("chatml"), a .jinja path or a template
        string to replace it."""
        if self._chat_template is False:
            from . import chat

            self._chat_template = chat.load_template(self.path) if self.path else None
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template):
        from . import chat

        self._chat_template = None if template is None else chat.resolve(template, None)

    def _template(self, chat_template):
        from . import chat

        t = self.chat_template if chat_template is None else chat.resolve(chat_template, None)
        if t is None:
            raise UnsupportedError("this checkpoint declares no chat template (no chat_template.jinja, "
                                   "chat_template.json or tokenizer_config.json 'chat_template'): pass "
                                   "chat_template='chatml', a .jinja file or a template string")
        return t

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, chat_template=None,
                            **variables) -> str:
        """The prompt text of a conversation (as transformers' tokenizer.apply_chat_template(...,
        tokenize=False)); normengine.chat documents where the template comes from and how it renders."""
        return self._template(chat_template).render(messages, add_generation_prompt, **variables)

    def chat(self, messages, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop=None, stream: bool = False,
             cache_prompt: bool = True, chat_template=None, prompt_lookup: int | None = None, draft_model=None,
             draft_tokens: int | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
             frequency_penalty: float | None = None, presence_penalty: float | None = None,
             logprobs: int | None = None, **variables):
        """The assistant's reply to a conversation: `messages` rendered by the chat template, tokenized
        without added special tokens (the template writes them), then generate(). Stops at the model's
        eos ids, at the template's end-of-turn token (its eos_token), and at `stop`. Returns the reply
        text, or with stream=True an iterator of its pieces. cache_prompt=True (the default here): a
        conversation that goes on from the previous call's prompt and reply prefills only its new turn
        (see generate); min_p, the penalties, prompt_lookup, draft_model, draft_tokens and logprobs as generate's.
        Needs the checkpoint's tokenizer.json."""
        ids, stops = self._chat_ids(messages, stop, chat_template, variables)
        if not isinstance(stream, bool):
            raise ArgumentError(f"stream: expected True or False, got {stream!r}")
        sampling = _sampling(self.config.vocab_size, temperature, top_k, top_p, min_p, repetition_penalty,
                             frequency_penalty, presence_penalty)
        draft = _draft_plan(self, prompt_lookup, draft_model, draft_tokens, False)
        _check_logprobs(logprobs, stream)
        watches = None if logprobs is None else [_Watch(logprobs)]
        out = self._generate_ids([ids], [True], False, max_new_tokens, sampling, seed, stops, stream, cache_prompt,
                                 draft, watches)
        return out if watches is None else _with_logprobs(out, watches, False)

    def _chat_ids(self, messages, stop, chat_template, variables):
        """A conversation's prompt ids (rendered by the chat template, tokenized without added special tokens: the
        template writes them) and the stops of its reply (`stop`, and the template's end-of-turn token)."""
        if self.tokenizer is None:
            raise UnsupportedError("chat: needs a tokenizer.json beside the checkpoint")
        t = self._template(chat_template)
        text = t.render(messages, True, **variables)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        stops = [] if stop is None else list(stop) if isinstance(stop, (list, tuple, set)) else [stop]
        if t.end_of_turn:
            tid = self.tokenizer.token_to_id(t.end_of_turn)
            stops.append(tid if tid is not None else t.end_of_turn)
        return ids, stops

    def _finish(self, new, is_text, stop_strs):
        if not is_text:
            return new
        s = "".join(new)  # for a text prompt _generate yields text pieces, not ids
        for st in stop_strs:
            k = s.find(st)
            if k >= 0:
                s = s[:k]
        return s

    def _stream(self, gen, batched) -> Iterator:
        for i, tok in gen:
            yield (i, tok) if batched else tok

    def _generate(self, ids, text, max_new, sampling, seed, stop_ids, stop_strs, cache_prompt=False, watches=None):
        """Yields (sequence index, new token id, or text piece for text prompts) as tokens are made."""
        if max_new == 0:
            return
        B = len(ids)
        need = ctx = min(self.config.max_seq_len, max(len(s) for s in ids) + max_new)
        if cache_prompt:  # room for the next turns too: a runner made anew (to grow) starts with no cache
            ctx = max(ctx, min(self.config.max_seq_len, 2 * ctx))
        torch = _torch_if_loaded()  # None in a torch-free process: numpy buffers then
        base = _sampler_seed(seed, torch)
        samplers = [_C.Sampler((base + i) % 2**64) for i in range(B)]  # any int seed (negative, huge) works
        params, penalty = sampling
        penalties = [_Penalty(penalty, s) for s in ids] if penalty else None
        vocab = self.config.vocab_size
        on_gpu = self._cuda

        ints = functools.partial(_int32s, torch)

        if torch is None:
            logits = np.empty((B, vocab), dtype=np.float32)
        else:
            logits = torch.empty(B, vocab, dtype=torch.float32, device=self.device)
        tokens = ints([t for s in ids for t in s])
        lens = ints([len(s) for s in ids])
        active = list(range(B))
        me = object()  # this generation, as the runner's user
        # the decode step's inputs, made once and reused (new tensors each step cost ~5 us of a ~95 us
        # step of the default model): the slots and logits rows of the active sequences (remade when a
        # sequence stops), one new token each, and a lone sequence's newest token (written in place)
        ones = ints([1] * B)
        cur1 = ints([0])
        step_n = 0  # how many active sequences slots / one / rows were made for
        with self._lock:
            kept = self._cached_prefix(ids, need) if cache_prompt else 0
            if kept:  # slot 0 already holds ids[0][:kept]: only the rest goes through the layers
                r, self._user = self._runner, me
                self._forward(r, ints([0]), ints(ids[0][kept:]), ints([len(ids[0]) - kept]), logits, False)
            else:
                r = self._runner_for(B, ctx, me)
                self._forward(r, ints(active), tokens, lens, logits, False)
            held = list(ids[0]) if B == 1 else None  # what slot 0 holds, while this call is the user
            self._prefix = (me, held) if B == 1 else None
        host = logits.cpu() if on_gpu else logits  # the sampler reads CPU rows
        produced = [[] for _ in range(B)]
        if watches:
            produced = [w.tokens for w in watches]
        shown = [""] * B  # text already yielded, per text sequence
        n = 0
        while active:
            nxt = []
            for row, i in enumerate(active):
                try:
                    tok, info = _choose(host[row], samplers[i], params, penalties and penalties[i],
                                        watches and watches[i])
                except ArgumentError as e:  # NaN / +Inf logits (the arguments themselves were checked)
                    raise NumericalError(f"generate: sequence {i}, new token {len(produced[i]) + 1}: {e}") from None
                if info is not None:
                    watches[i].logprobs.append(info)
                produced[i].append(tok)
                done = tok in stop_ids or len(ids[i]) + len(produced[i]) >= self.config.max_seq_len
                if text[i]:
                    piece, done = self._text_piece(produced[i], shown, i, stop_strs, done, n + 1 >= max_new)
                    if piece:
                        yield i, piece
                else:
                    yield i, tok
                if not done:
                    nxt.append(i)
            n += 1
            active = nxt if n < max_new else []
            if active:
                if len(active) != step_n:  # the first step, or a sequence stopped (active only shrinks)
                    step_n = len(active)
                    slots, one, rows = ints(active), ones[:step_n], logits[:step_n]
                with self._lock:
                    if self._user is me:  # the caches still hold our sequences: one token each
                        if step_n == 1:
                            cur1[0] = produced[active[0]][-1]
                            cur = cur1
                        else:  # (one list -> tensor beats step_n item writes)
                            cur = ints([produced[i][-1] for i in active])
                        self._forward(r, slots, cur, one, rows, False)
                    else:  # another call used the runner while we were suspended: prefill again
                        r = self._runner_for(B, ctx, me)
                        seqs = [ids[i] + produced[i] for i in active]
                        self._forward(r, slots, ints([t for q in seqs for t in q]), ints([len(q) for q in seqs]),
                                      rows, False)
                        if held is not None:
                            held[:] = ids[0] + produced[0][:-1]  # (the last one is appended below)
                            self._prefix = (me, held)
                    if held is not None:
                        held.append(produced[0][-1])
                host = rows.cpu() if on_gpu else logits

    def _text_piece(self, produced, shown, i, stop_strs, done, at_max):
        """The new text of a text sequence after its latest token (or ""), and whether it is done (a stop string
        reached). What may be the start of a stop string, or of a multi-byte character, is held back until the
        next token shows whether it is: streamed text never has to be taken back."""
        full = self.tokenizer.decode(produced, skip_special_tokens=True)
        hits = [full.find(s) for s in stop_strs if s in full]
        if hits:  # cut at the earliest stop string
            full, done = full[:min(hits)], True
        last = done or at_max
        keep = len(full) if last else len(full) - _stop_prefix_len(full, stop_strs)
        if not last and full.endswith("\ufffd"):
            keep = min(keep, len(shown[i]))
        if keep > len(shown[i]):
            piece, shown[i] = full[len(shown[i]):keep], full[:keep]
            return piece, done
        return "", done

    def _generate_lookup(self, prompt, is_text, max_new, sampling, seed, stop_ids, stop_strs, cache_prompt, k,
                         draft_model=None, watch=None):
        """Generation of one sequence with drafts of up to k tokens a step, from prompt lookup
        (generate(prompt_lookup=k)) or from draft_model's greedy decoding (generate(draft_model=...)); yields
        (0, token or text piece) as _generate does.

        Verifying a draft when sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a
        draft distribution q that puts all its mass on the drafted token d accepts d with probability
        min(1, p(d) / q(d)) = p(d) and otherwise draws from norm(max(0, p - q)), which is p without d,
        renormalized. Drawing one token x from p and accepting d iff x == d does exactly that: P(x = d) = p(d),
        and x given x != d is p without d, renormalized. So each position draws its token from the sampler as
        plain sampling does (one draw per token, in the same order, from a generator seeded the same way), the
        draft is kept while those tokens equal it, and the tokens under a seed are plain sampling's (up to the float
        rounding of rows computed several at a time)."""
        if max_new == 0:
            return
        need = min(self.config.max_seq_len, len(prompt) + max_new + k)  # (drafts may reach past the last token)
        ctx = max(need, min(self.config.max_seq_len, 2 * need)) if cache_prompt else need
        torch = _torch_if_loaded()
        vocab = self.config.vocab_size
        # seeded as _generate's sampler of a lone sequence; temperature 0 draws nothing (the argmax)
        sampler = _C.Sampler(_sampler_seed(seed, torch) % 2**64)
        params, penalty = sampling
        penalty = _Penalty(penalty, prompt) if penalty else None  # (row j's sequence: the text and draft[:j])

        ints = functools.partial(_int32s, torch)

        rows_buf = (np.empty((k + 1, vocab), dtype=np.float32) if torch is None else
                    torch.empty(k + 1, vocab, dtype=torch.float32, device=self.device))
        index = _NgramIndex(prompt) if draft_model is None else _ModelDrafter(draft_model, prompt, need)
        # a linear-family layer's state cannot give back rejected draft tokens: such models decode one at a time
        drafts = all(a == "softmax" for a in self.config.attention)
        me = object()
        slot0 = ints([0])

        def feed(r, toks, rows):  # append toks to slot 0's cache; their logits into rows
            self._forward(r, slot0, ints(toks), ints([len(toks)]), rows, rows.shape[0] > 1)

        with self._lock:
            kept = self._cached_prefix([prompt], need) if cache_prompt else 0
            if kept:
                r, self._user = self._runner, me
            else:
                r = self._runner_for(1, ctx, me)
            rows = rows_buf[:1]
            feed(r, prompt[kept:], rows)
            held = list(prompt)  # what slot 0's cache holds
            self._prefix = (me, held)
        if draft_model is not None:
            index.prime()
        produced, shown, draft = [] if watch is None else watch.tokens, [""], []
        while True:
            host = rows.cpu() if self._cuda else rows
            accepted, infos = [], []
            for j in range(len(draft) + 1):  # the token after each fed position, while the draft agrees
                try:
                    tok, info = _choose(host[j], sampler, params, penalty, watch)
                except ArgumentError as e:
                    raise NumericalError(f"generate: new token {len(produced) + j + 1}: {e}") from None
                accepted.append(tok)
                infos.append(info)
                if j == len(draft) or tok != draft[j]:
                    break
            matched = len(accepted) - 1  # drafted tokens the model agreed with (they are in the cache)
            if draft:  # the cache holds the fed token and the whole draft: cut it back past the agreed part
                keep = len(held) - len(draft) + matched
                with self._lock:
                    if self._user is me and not r.truncate(0, keep):  # pragma: no cover - drafts only where it can
                        raise AssertionError("speculative decoding: the KV cache could not be cut back")
                del held[keep:]
            for a, tok in enumerate(accepted):
                produced.append(tok)
                if infos[a] is not None:
                    watch.logprobs.append(infos[a])
                index.append(tok)
                done = tok in stop_ids or len(prompt) + len(produced) >= self.config.max_seq_len
                last = done or len(produced) >= max_new
                if is_text:
                    piece, done = self._text_piece(produced, shown, 0, stop_strs, done, len(produced) >= max_new)
                    if piece:
                        yield 0, piece
                else:
                    yield 0, tok
                if done or last:
                    return
            room = min(k if drafts else 0, max_new - len(produced), ctx - len(prompt) - len(produced))
            draft = index.draft(room) if room > 0 else []
            with self._lock:
                if self._user is not me:  # another call used the runner since: prefill the text so far again
                    r = self._runner_for(1, ctx, me)
                    held[:] = prompt + produced[:-1]
                    self._prefix = (me, held)
                    feed(r, held, rows_buf[:1])
                rows = rows_buf[:len(draft) + 1]
                feed(r, [produced[-1]] + draft, rows)
                held.extend([produced[-1]] + draft)

    def _cached_prefix(self, ids, ctx) -> int:
        """How many leading tokens of a single prompt ids[0] slot 0 of the runner still holds from the last
        generation (which no other call has followed), truncated to them; 0: prefill the whole prompt.
        At least one token is always fed again (its logits start the generation)."""
        if len(ids) != 1 or self._prefix is None or self._prefix[0] is not self._user or self._runner is None:
            return 0
        if self._stale() or ctx > self._ctx:
            return 0
        held, prompt = self._prefix[1], ids[0]
        n = 0
        for a, b in zip(held, prompt[:-1]):
            if a != b:
                break
            n += 1
        if n == 0 or not self._runner.truncate(0, n):
            return 0
        for s in range(1, self._slots):  # (other slots' sequences belong to no one now)
            self._runner.reset(s)
        return n

    # ------------------------------------------------------------------ description
    def num_parameters(self) -> int:
        seen, n = set(), 0
        for t in self._weights.values():
            dense = isinstance(t, np.ndarray) or _is_tensor(t)
            key = _address(t) if dense else id(t)
            if key not in seen:
                seen.add(key)
                n += int(np.prod(t.shape)) if dense else t.shape[0] * t.shape[1]
        return n

    def active_parameters(self) -> int:
        """Parameters one token's forward pass reads: num_parameters() less, in each mixture-of-experts layer,
        the experts it does not use (n_experts - n_experts_used of them)."""
        c = self.config
        idle = 3 * c.residual_width * c.moe_d_ff * (c.n_experts - c.n_experts_used)
        return self.num_parameters() - idle * sum(c.is_moe_layer(i) for i in range(c.n_layers))

    def weight_bytes(self) -> int:
        """Bytes of the weights as the runner holds them (packed weights: data, scales, zero points)."""
        seen, n = set(), 0
        for t in self._weights.values():
            for p in _parts(t):
                if _address(p) not in seen:
                    seen.add(_address(p))
                    n += _nbytes(p)
        return n

    def multiply_counts(self, n_tokens: int = 1, context: int | None = None) -> dict:
        """Multiplications one forward pass makes per `n_tokens` new tokens at a context of `context`
        positions (default the model's context / 2), split into the attention products (q.k and p.v of
        softmax layers over the keys they read, the state products of linear ones) and the linear layers
        (projections, MLP, head)."""
        c = self.config
        if context is not None and (isinstance(context, bool) or not isinstance(context, int)
                                    or not 1 <= context <= c.max_seq_len):
            raise ArgumentError(f"context: expected an int in 1..{c.max_seq_len} (the model's context), got {context!r}")
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ArgumentError(f"n_tokens: expected a positive int, got {n_tokens!r}")
        ctx = c.max_seq_len // 2 if context is None else context
        d, dq, dkv, f = c.residual_width, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.d_ff
        attn_proj = d * dq + 2 * d * dkv + dq * d
        mlp = (3 if c.gated_mlp else 2) * d * f
        # a mixture-of-experts layer: the router, each token's experts and the shared expert with its gate
        moe = d * c.n_experts + 3 * d * (c.n_experts_used * c.moe_d_ff + c.shared_expert_d_ff) + (
            d if c.shared_expert_d_ff else 0)
        linear = n_tokens * (sum(attn_proj + (moe if c.is_moe_layer(i) else mlp) for i in range(c.n_layers))
                             + d * c.vocab_size)
        attn = 0
        for i, t in enumerate(c.attention or ["softmax"] * c.n_layers):
            if t == "softmax":  # (a sliding-window layer reads its last W keys only)
                w = c.sliding_window[i] if c.sliding_window else 0
                attn += n_tokens * 2 * c.n_heads * c.head_dim * (min(ctx, w) if w else ctx)
            else:  # state update + readout with the (head_dim + 1)^2 augmented state
                attn += n_tokens * 2 * c.n_heads * (c.head_dim + 1) ** 2
        return {"attention": attn, "linear": linear, "total": attn + linear, "context": ctx, "tokens": n_tokens}

    def arithmetic_report(self, mantissa_bits: int | None = None, scope: str | None = None,
                          context: int | None = None) -> dict:
        """Estimated multiply energy per generated token with L-Mul (in `scope`: 'attention' or 'all')
        against exact fp32 multiplies (normengine.ops.lmul.multiply_energy: per-operation energies
        from the published figures it names)."""
        from .ops.lmul import multiply_energy

        bits = mantissa_bits or self.lmul_bits or 4
        scope = scope or self.lmul_scope or "attention"
        counts = self.multiply_counts(1, context)
        n = counts["attention"] if scope == "attention" else counts["total"]
        e = multiply_energy(n, bits)
        return {"scope": scope, "mantissa_bits": bits, "multiplies_per_token": counts, "lmul_multiplies": n,
                "energy": e}

    def info(self) -> dict:
        c = self.config
        return {
            "path": self.path,
            "architecture": c.arch,
            "layers": c.n_layers,
            "d_model": c.d_model,
            "heads": c.n_heads,
            "kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "d_ff": c.d_ff,
            "vocab": c.vocab_size,
            "context": c.max_seq_len,
            "norm": c.norm,
            "positions": "learned" if c.learned_pos else rope.describe(c.rope_theta, c.rope_scaling, c.rotary_dim,
                                                                       c.head_dim, c.rope_local_theta),
            "block": _block_text(c),
            "mlp": ("gated " if c.gated_mlp else "") + c.activation + _experts_text(c),
            "active_parameters": self.active_parameters(),
            "tied_head": c.tied_head,
            "parameters": self.num_parameters(),
            "dtype": self._dtype_name(),
            "source_dtype": c.source_dtype,
            "conversions": list(c.conversions),
            "fused_norms": self._fused_norms() if c.norm != "none" else False,
            "attention": ",".join(sorted(set(c.attention))) if c.attention else "softmax",
            "sliding_window": _windows_text(c.sliding_window),
            "quantization": _quant_text(c),
            "weight_bytes": self.weight_bytes(),
            "arithmetic": self.arithmetic if self.arithmetic == "exact"
            else f"lmul (mantissa {self.lmul_bits} bits, scope {self.lmul_scope})",
            "matmul_precision": self.matmul_precision,
            "kv_cache_dtype": "bfloat16" if self._kv_bf16 else "int8" if self._kv_int8 else "float32",
        }

    def save(self, path: str) -> None:
        """Write this model (with its conversions, recorded in the metadata) as a checkpoint directory
        that normengine.load reads back: config.json + model.safetensors (+ tokenizer.json)."""
        import torch

        from .checkpoint import save_checkpoint
        from .convert.quant import pack_quantized

        from ._packed import _spec, record_packing
        from .config import quant_of

        held = {n: t.to("cpu") if not isinstance(t, torch.Tensor) else t.detach().cpu()
                for n, t in self.tensors.items()}
        cfg = self.config
        # packed weights held otherwise than the config says (two-level scales on a GPU are expanded to one scale
        # per group: QuantizedWeight.to): the config recorded anew from the weights, so the files agree
        if any(_spec(t) != quant_of(cfg, n) for n, t in held.items() if not isinstance(t, torch.Tensor)):
            cfg = record_packing(cfg, held, "single-level-scales")
        tensors = pack_quantized(cfg, held)
        if cfg.tied_head and "tok_emb.weight" in tensors:  # keep the tie explicit for the alias table
            tensors["lm_head.weight"] = tensors["tok_emb.weight"]
        save_checkpoint(path, cfg, tensors)
        if self.tokenizer is not None:
            self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        if self.chat_template is not None:
            from .chat import save_template

            save_template(self.chat_template, path)

    def __repr__(self):
        i = self.info()
        return (f"normengine.Model({i['architecture']}, {i['layers']} layers, d={i['d_model']}, "
                f"{i['parameters'] / 1e6:.1f}M params, {i['dtype']})")


_ADJACENT = (("attn.q", "attn.k", "attn.v"), ("mlp.gate", "mlp.up"))


def _adjacent_order(plans: list, n_layers: int) -> list:
    """plans (names, source, dtype) in their order, except that the members of each group the runner
    reads as one matrix ([q; k; v] and [gate; up], weights and biases apart) follow each other, in
    group order: (names, source, dtype, follow) with follow True for each member after the first.
    Members shared with other names or of other dtypes than the first are left where they are."""
    by_name = {n: i for i, p in enumerate(plans) for n in p[0]}
    group_of = {}
    for li in range(n_layers):
        for group in _ADJACENT:
            for suffix in (".weight", ".bias"):
                members = [by_name.get(f"blocks.{li}.{g}{suffix}") for g in group]
                members = [i for i in members if i is not None and len(plans[i][0]) == 1]
                if len(members) > 1 and all(plans[i][2] is not None and plans[i][2] == plans[members[0]][2]
                                            for i in members):
                    for i in members:
                        group_of[i] = members
    out, done = [], set()
    for i, p in enumerate(plans):
        if i in done:
            continue
        for k, j in enumerate(group_of.get(i, [i])):
            out.append(plans[j] + (k > 0,))
            done.add(j)
    return out


def _make_adjacent(tensors: dict, names: list, release=None) -> None:
    """Make the dense tensors `names` consecutive rows of one buffer (views), unless they already are
    or cannot be (missing, packed, mixed dtypes or widths, shared with another name)."""
    import torch

    ts = [tensors.get(n) for n in names]
    if any(not isinstance(t, torch.Tensor) for t in ts):
        return
    t0 = ts[0]
    if any(t.dtype != t0.dtype or t.device != t0.device or t.dim() != t0.dim() or t.shape[1:] != t0.shape[1:]
           for t in ts):
        return
    others = {id(v) for k, v in tensors.items() if k not in names}
    if any(id(t) in others for t in ts):
        return
    es = t0.element_size()
    if all(t.is_contiguous() for t in ts) and all(
            b.data_ptr() == a.data_ptr() + a.numel() * es for a, b in zip(ts, ts[1:])):
        return
    buf = torch.cat(ts, 0)
    off = 0
    for n, t in zip(names, ts):
        tensors[n] = buf[off:off + t.shape[0]]
        off += t.shape[0]
        if release is not None:
            release(t)


def _cuda_device(dev, asked):
    """The CUDA device the model runs on (an index always set), or DeviceError naming what is missing."""
    import torch

    if not _C.built_with_cuda() or not hasattr(_C, "CudaRunner"):
        raise DeviceError(
            f"device={asked!r}: this build of normengine has no CUDA kernels (it was built without nvcc); "
            "use device='cpu'"
        )
    if not _C.cuda_available():
        raise DeviceError(f"device={asked!r}: no CUDA GPU is visible to normengine (no GPU or no driver); "
                          "use device='cpu'")
    if not torch.cuda.is_available():
        raise DeviceError(f"device={asked!r}: this PyTorch build cannot use the GPU "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device='cpu'")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise DeviceError(f"device={asked!r}: no such GPU ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def _load_tokenizer(path: str):
    from .checkpoint.gguf import gguf_path

    g = gguf_path(path)
    if g is not None:  # the vocabulary inside the GGUF file
        from .checkpoint.gguf import tokenizer_of
        from .checkpoint.gguf_io import read_gguf

        return tokenizer_of(read_gguf(g))
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    f = os.path.join(d, "tokenizer.json")
    if not os.path.exists(f):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return None
    return Tokenizer.from_file(f)


DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "data", "tiny-gpt2")


def load(path: str | None = None, device: str = "cpu", dtype=None, norm: str | None = None, *,
         quant: str | None = None, group_size: int | None = None, symmetric: bool | None = None,
         smooth: float | None = None,
         attention=None, arithmetic: str | None = None, lmul_bits: int = 4, lmul_scope: str = "attention",
         matmul_precision: str = "highest", kv_cache_dtype=None, progress: bool | None = None) -> Model:
    """Load a checkpoint (Hugging Face directory, sharded or not, safetensors or pytorch_model.bin;
    or one .safetensors/.pt/.bin file with config.json beside it; or a directory Model.save wrote)
    into the native runner.

    path None loads the small default model shipped in the package. dtype: None keeps the
    checkpoint's (16-bit stays 16-bit), or torch.float32 / bfloat16 / float16 for the linear weights.
    norm: None keeps the checkpoint's kind of normalization, with the norms' gains (and biases) folded
    into the linear layers that read them (exact); 'rmsnorm' turns a Pre-LN model into the exactly
    equivalent Pre-RMSNorm one (an RMSNorm model: gains folded); 'crmsnorm' goes on to the compressed
    form (d - 1 wide residual stream); see normengine.convert. With folded norms the runner applies
    every norm inside the following GEMM (norm_linear).

    quant: quantize the linear weights at load time ('int8' W8A8, 'int8-weight', 'int4', 'fp8'; after
    the norm folding), with group_size (int4: 32/64/128, default 128; int8-weight: 0, a scale per output
    row (default), or 16/32/64/128, a scale per group of columns; fp8: 128 x 128 blocks or 0 for
    one scale per tensor) and symmetric (int4 zero points when False; default True); progress shows a bar (default:
    for models above 50M weights). smooth=alpha (e.g. 0.5) first applies SmoothQuant-style smoothing
    folded into the norms' gains (normengine.convert.smooth_model; calibrated on random prompts), which
    helps W8A8 on models with outlier channels (the norms then run as their own pass). A checkpoint Model.save wrote from a quantized model loads
    quantized, without re-quantizing.

    attention: read the checkpoint's q/k/v/o weights with another attention type, 'linear', 'mala' or
    'norm' (or a list, one per layer): the starting point for linearization by fine-tuning; those
    layers keep a fixed-size state instead of a KV cache (CPU and CUDA runners). A checkpoint whose
    config names these types loads with them (see normengine.config).

    arithmetic='lmul' runs the model with L-Mul products (lmul_bits of mantissa): lmul_scope
    'attention' for the attention products only, 'all' for every matmul (float32 weights). CPU and
    CUDA runners (the CUDA one holds a row of ctx attention scores in shared memory, which bounds the
    context it takes).

    matmul_precision, as torch.set_float32_matmul_precision: 'highest' (default) multiplies in fp32
    (16-bit weights widened exactly); 'medium' lets the CPU runner's dense projections round their
    operands to bfloat16 (activations after the norm's statistics, float32 weights on the fly),
    products exact and sums in fp32, on the CPU's AMX-BF16 tiles where it has them (else its AVX512-BF16 dot
    products: AMD Zen 4) and for 16 or more
    rows at a time (prefill): with AMX about 2.5x (float32 weights) to 4.5x (bfloat16 weights) faster GEMMs at a
    relative error of ~2e-3 per projection; int8-weight / int4 / fp8 weights likewise multiply their
    dequantized prefill panels in bf16, and int4 weights' decode steps (on a CPU with AVX-512 VNNI or AVX2) and
    int8-weight ones' (AVX-512 VNNI) round x to int8 per 32 columns for integer products, as llama.cpp's 4- and
    8-bit kernels do. Other
    decode steps, int8 (W8A8) weights and CPUs without AMX-BF16 or AVX512-BF16 compute as 'highest'.
    The CUDA runner's bfloat16 weights take the tensor cores under 'medium' for
    more than 16 rows (activations rounded to bf16, fp32 sums: mma.sync bf16, sm_80+); its other weights
    and its decode steps compute as 'highest'.

    kv_cache_dtype: None / torch.float32 (default) keeps the softmax layers' K and V cache in float32;
    torch.bfloat16 stores it in bfloat16 (each K / V row rounded once as it is written, attention sums
    in float32), as llama.cpp's 16-bit default cache: half its memory and half the bytes each decode
    step reads from it, which at long contexts is a large part of a step. torch.int8 stores each row of
    each kv head as int8 with a float32 scale (absmax / 127, rounded to nearest; as llama.cpp's q8_0 cache
    but one scale per head row): a quarter of the float32 cache plus 4 bytes a head row, with logits within
    about 1e-2 relative of the float32 cache's. CPU and CUDA runners, exact arithmetic (not with L-Mul
    attention).

    GGUF files (llama.cpp's format: path a .gguf file, or a directory holding one and no config.json;
    architectures gpt2, llama (and Mixtral-style experts), qwen2, qwen3, phi3, qwen2moe, qwen3moe, gemma, gemma2,
    gemma3; see normengine.checkpoint.gguf)
    load like any checkpoint: float weights as stored, quantized ones (Q4_0 ... Q8_0, Q2_K ... Q6_K)
    dequantized to float32, exactly llama.cpp's values; the tokenizer (byte-level BPE) and chat template
    come from the file's metadata. quant='int4' on a GGUF file (without group_size / symmetric / norm /
    smooth) keeps its Q4_0 / Q4_1 / Q4_K weights as they are: repacked, not re-quantized, as asymmetric
    int4 with groups of 32 (and Q3_K / Q2_K with groups of 16); quant='int8-weight' likewise every quantized
    weight as int8 codes (a scale per
    32 columns, per 16 for Q6_K / Q3_K / Q2_K, zero points where the blocks have an offset; the model's
    group_size 32). The norms' gains then stay in the norms, not folded; the other linear weights (int4: the
    non-4-bit types; both: float ones) are quantized to that format from their values. Without quant (and dtype, norm,
    smooth, attention), each quantized weight of the file (and an untied token embedding) stays packed in
    the format that holds its blocks exactly, as llama.cpp runs each tensor in its own type: Q4_0 / Q4_1 /
    Q4_K as int4 g32 with zero points, Q3_K / Q2_K as int4 g16 with offsets, Q8_0 / Q5_0 as int8-weight g32,
    Q6_K as int8-weight g16, Q5_1 / Q5_K (g32) as int8-weight with zero points, the K-quants with their
    two-level scales (a float per 256 weights, an int8 per group: ggml's own products) (config.quant_overrides
    records the formats per weight; so a Q4_K_M file runs its own values); its float weights stay as stored. dtype=
    loads the values instead (float32 or 16-bit).

    A checkpoint Model.save wrote (norms folded; quantized or not), or a GGUF file with quantized weights
    (packed per weight as above), loaded on the CPU without dtype, quant, smooth, attention or
    kv_cache_dtype, is read and run without importing torch (normengine._lite): a process that never
    imports torch itself stays about 200-250 MB smaller and starts about a second sooner."""
    if dtype is not None and not _is_weight_dtype(dtype):
        raise DTypeError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    path = DEFAULT_MODEL if path is None else os.fspath(path)
    if (device == "cpu" and dtype is None and quant is None and group_size is None and smooth is None
            and attention is None and kv_cache_dtype is None):
        from . import _lite

        model = _lite.load(path, norm=norm, arithmetic=arithmetic, lmul_bits=lmul_bits, lmul_scope=lmul_scope,
                           matmul_precision=matmul_precision)
        if model is not None:
            model.tokenizer = _load_tokenizer(path)
            return model

    import torch

    from .checkpoint import load_checkpoint
    from .convert import convert_norm, fold_norm_affine, smooth_model, swap_attention, unpack_quantized
    from .convert.quant import Quantizer, record_packing

    from .checkpoint.safetensors_io import live_maps, release_unused

    maps_before = live_maps()
    # a GGUF file's 4-bit weights (Q4_0 / Q4_1 / Q4_K) are normengine's int4 with groups of 32, its Q8_0 (and
    # Q4_0 / Q5_0) int8-weight with groups of 32: with quant='int4' / 'int8-weight' (and no other group size
    # or symmetry asked for, nor a conversion that rewrites the weights) they are repacked exactly instead
    # of re-quantized, and the norms' gains stay in the norms
    from .checkpoint.gguf import gguf_path

    repack = None
    if (quant in ("int4", "int8-weight") and group_size in (None, 32) and norm is None and smooth is None
            and (quant != "int4" or symmetric is not True) and gguf_path(path) is not None):
        repack, group_size = quant, 32
        symmetric = False if quant == "int4" else symmetric
    elif (quant is None and dtype is None and group_size is None and norm is None and smooth is None
          and attention is None and gguf_path(path) is not None):
        repack = "auto"  # each quantized weight in the format of its blocks (dtype=: values)
    symmetric = True if symmetric is None else symmetric
    # GPT-2's Conv1D weights stay transposed views of the mapped file until folded or converted (each
    # result is written once, contiguous, in the target dtype; its source pages then leave memory)
    cfg, tensors = load_checkpoint(path, transposed_views=True, gguf_repack=repack)
    from .convert.quant import is_quantized

    repacked = [n for n, t in tensors.items() if is_quantized(t)] if repack else []
    if cfg.quantization is not None:  # (a checkpoint Model.save wrote from a quantized model)
        tensors = unpack_quantized(cfg, tensors)
        if quant is not None and quant != cfg.quantization:
            raise ArgumentError(f"quant={quant!r}: the checkpoint is already quantized as {cfg.quantization!r}; "
                                "load the full-precision checkpoint to quantize it another way")
        if norm is not None and norm != cfg.norm:
            raise ArgumentError(f"norm={norm!r}: the checkpoint is quantized; norm conversions need the "
                                "full-precision weights")
        quant = None
    if repack == "auto" and repacked:
        # every weight is as the file holds it: packed in its blocks' format, or dense (config.quant_overrides)
        cfg = record_packing(cfg, tensors, "gguf-blocks")
    if attention is not None:
        cfg = swap_attention(cfg, attention)
    if smooth is not None and quant is None:
        raise ArgumentError("smooth: SmoothQuant smoothing is applied before quantizing; pass quant= too")

    def quantizer():
        # release_shared: a tied embedding kept beside its quantized head is a mapped tensor never
        # written (fold_norm_affine does not fold into a head it keeps tied; the norm conversions and
        # smoothing build new tensors), so its pages can leave memory as they are quantized: lookups
        # read back only the rows of the tokens used
        q = Quantizer(cfg, quant, group_size, symmetric, progress, consume=True, release_shared=True)
        q.packed.update(repacked)  # (already packed: the GGUF file's own codes)
        return q

    streaming = None
    if norm is not None and cfg.quantization is None:
        cfg, tensors = convert_norm(cfg, tensors, norm, dtype=dtype)
    elif (cfg.norm != "none" and "fold_norm_affine" not in cfg.conversions and cfg.quantization is None
          and not repacked):
        # the mapped checkpoint is ours; 16-bit targets are rounded once, from the float64 products.
        # Quantizing (without smoothing, which needs every folded weight first): each group of readers
        # is packed as soon as it is folded, so the folded full-precision weights never pile up
        streaming = quantizer() if quant is not None and smooth is None else None
        cfg, tensors = fold_norm_affine(cfg, tensors, inplace=True, dtype=dtype, keep_tied_head=True,
                                        after_group=streaming.weights if streaming else None)
    if smooth is not None:
        cfg, tensors = smooth_model(cfg, tensors, smooth)
    if quant is not None:
        cfg, tensors = (streaming or quantizer()).finish(cfg, tensors, tensors)
    elif group_size is not None:
        raise ArgumentError("group_size: only meaningful with quant=")
    model = Model(cfg, tensors, device=device, dtype=dtype, tokenizer=_load_tokenizer(path), path=path,
                  arithmetic=arithmetic, lmul_bits=lmul_bits, lmul_scope=lmul_scope,
                  matmul_precision=matmul_precision, kv_cache_dtype=kv_cache_dtype, _owned=True)
    # what the conversions touched of this load's mapped files and no tensor of the model reads
    release_unused([p for t in model.tensors.values() for p in _parts(t) if isinstance(p, torch.Tensor)],
                   maps=[m for m in live_maps() if m not in maps_before])
    return model
