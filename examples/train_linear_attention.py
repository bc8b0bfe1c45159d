#!/usr/bin/env python3
"""Train a small linear-attention (or MALA, or NormAttention) language model with normengine's ops,
save it as a normengine checkpoint, and generate from it through the native runner.

The model is written in the engine's canonical layout (normengine.config), so its state_dict *is* a
checkpoint: RMSNorm, RoPE, SwiGLU MLP, untied head, and attention computed by
normengine.ops.linear_attention / mala_attention / norm_attention (chunked forward and backward
kernels), trained through normengine.ops.linear_cross_entropy (the head and the loss fused: the
[tokens, vocab] logits are never held whole). The runner then keeps one fixed-size state per layer
instead of a KV cache.

Data: the text shipped in the package (python/normengine/data/corpus.txt, Python stdlib docstrings),
tokenized with the default model's tokenizer (byte-level BPE, vocab 1024).

Usage:
    python examples/train_linear_attention.py --attention linear --steps 300 --out /tmp/la-model
    python examples/train_linear_attention.py --attention mala --steps 300 --out /tmp/mala-model
Prints the training loss as it falls, then the runner's logits against the torch model's and a
generated sample.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import normengine as ne  # noqa: E402
from normengine.checkpoint import save_checkpoint  # noqa: E402
from normengine.config import ModelConfig  # noqa: E402

DATA = os.path.join(os.path.dirname(ne.__file__), "data")


def rope(x, theta=10000.0):
    """Rotate-half RoPE over [B, T, H, D] with Hugging Face's float32 angles (as the runner)."""
    T, D = x.size(1), x.size(-1)
    half = D // 2
    inv = 1.0 / (torch.tensor(theta, dtype=torch.float32) ** (torch.arange(0, half, dtype=torch.float32) * 2 / D))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    cos = torch.cos(ang.double()).float()[None, :, None, :].to(x.dtype)
    sin = torch.sin(ang.double()).float()[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nn.Module):
    def __init__(self, d, heads, kind):
        super().__init__()
        self.h, self.hd, self.kind = heads, d // heads, kind
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = rope(self.q(x).view(B, T, self.h, self.hd))
        k = rope(self.k(x).view(B, T, self.h, self.hd))
        v = self.v(x).view(B, T, self.h, self.hd)
        if self.kind == "linear":
            a = ne.ops.linear_attention(q, k, v, feature_map="elu1", normalize=True, causal=True)
        elif self.kind == "mala":
            a = ne.ops.mala_attention(q, k, v, causal=True)
        elif self.kind == "norm":
            a = ne.ops.norm_attention(q, k, v, norm="rms", causal=True)
        else:
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)
        if isinstance(a, tuple):
            a = a[0]
        return self.o(a.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.up = nn.Linear(d, f, bias=False)
        self.gate = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d, heads, f, kind, eps):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        self.attn = Attention(d, heads, kind)
        self.mlp_norm = nn.RMSNorm(d, eps=eps)
        self.mlp = MLP(d, f)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    """Parameter names are normengine's canonical names: state_dict() is a checkpoint."""

    def __init__(self, vocab, d, layers, heads, f, kind, eps=1e-6):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads, f, kind, eps) for _ in range(layers)])
        self.final_norm = nn.RMSNorm(d, eps=eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def hidden(self, ids):
        x = self.tok_emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.final_norm(x)

    def forward(self, ids):
        return self.lm_head(self.hidden(ids))

    def loss(self, ids, targets):
        """Mean next-token loss, the head and the loss fused (ne.ops.linear_cross_entropy: the [tokens,
        vocab] logits are never held whole)."""
        return ne.ops.linear_cross_entropy(self.hidden(ids), self.lm_head.weight, targets)


def config_of(args, vocab) -> ModelConfig:
    return ModelConfig(
        arch="llama", vocab_size=vocab, d_model=args.d, n_layers=args.layers, n_heads=args.heads,
        n_kv_heads=args.heads, head_dim=args.d // args.heads, d_ff=args.ff, max_seq_len=args.max_len,
        norm="rmsnorm", norm_eps=1e-6, activation="silu", gated_mlp=True, learned_pos=False,
        rope_theta=10000.0, attention=[args.attention] * args.layers, linear_feature_map="elu1",
        linear_normalize=True, norm_attention_norm="rms", linear_eps=1e-6, bos_token_id=0, eos_token_id=0,
    )


def load_tokens():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(DATA, "tiny-gpt2", "tokenizer.json"))
    with open(os.path.join(DATA, "corpus.txt"), encoding="utf-8") as f:
        text = f.read()
    return tok, torch.tensor(tok.encode(text).ids, dtype=torch.long)


def train(model, data, steps, seq, batch, lr, seed, log_every=25, time_budget=0.0, out=sys.stdout):
    """AdamW with warm-up and cosine decay; returns the list of per-step losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    losses = []
    t0 = time.time()
    for step in range(steps):
        warm = max(1, steps // 20)
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if out is not None and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", file=out, flush=True)
        if time_budget and time.time() - t0 > time_budget:
            break
    return losses


def save(model, cfg, out_dir, tokenizer_path=None):
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_checkpoint(out_dir, cfg, sd)
    if tokenizer_path:
        shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attention", choices=["linear", "mala", "norm", "softmax"], default="linear")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=352)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=0.0, help="stop after this many seconds (0: none)")
    ap.add_argument("--out", default="/tmp/normengine-linear-attention")
    ap.add_argument("--prompt", default="Return the")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    tok, data = load_tokens()
    vocab = tok.get_vocab_size()
    cfg = config_of(args, vocab)
    model = TinyLM(vocab, args.d, args.layers, args.heads, args.ff, args.attention)
    print(f"{args.attention} attention LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{data.numel():,} training tokens")
    losses = train(model, data, args.steps, args.seq, args.batch, args.lr, args.seed, time_budget=args.time_budget)
    k = max(1, len(losses) // 10)
    print(f"loss: first {k} steps {sum(losses[:k]) / k:.3f} -> last {k} steps {sum(losses[-k:]) / k:.3f}")
    model.eval()
    save(model, cfg, args.out, os.path.join(DATA, "tiny-gpt2", "tokenizer.json"))
    print(f"saved {args.out}")

    m = ne.load(args.out)
    ids = data[:96].tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    got = m.logits(ids)[0]
    err = ((got - want).norm() / want.norm()).item()
    print(f"native runner vs torch model logits: relative error {err:.2e}, "
          f"argmax agreement {(got.argmax(-1) == want.argmax(-1)).float().mean().item():.1%}")
    print("sample:", repr(args.prompt + m.generate(args.prompt, max_new_tokens=40, temperature=0.0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
