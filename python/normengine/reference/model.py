"""The whole model as plain torch, written as the formulas (float64-safe): the reference the native
runner is tested against for every variant it runs (norm kinds, attention types per layer,
quantized weights read as their dequantized values, L-Mul products).

forward(cfg, tensors, ids) -> logits [T, vocab] for one sequence of token ids, computed from the
canonical tensors (normengine.config) in `dtype` (float64 by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .norm import crms_norm, layer_norm, rms_norm


def _w(t, dtype):
    """A weight as a dense tensor: packed weights (normengine.ops.QuantizedWeight) dequantized."""
    if not isinstance(t, torch.Tensor):
        t = t.dequantize()
    return t.to(dtype)


def _norm(cfg, x, w, b):
    if cfg.norm == "none":
        return x
    if cfg.norm == "layernorm":
        return layer_norm(x, w, b, cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        return rms_norm(x, w, cfg.norm_eps)
    return crms_norm(x, w, cfg.norm_eps)


def _act(name, x):
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    return F.relu(x)


def _rope(cfg, x, pos, local=False):
    """Rotate-half RoPE with Hugging Face's float32 angles pos * inv_freq_i (plain or scaled frequencies,
    normengine.rope), cos and sin times the variant's attention factor (YaRN; else 1). x [T, H, D].
    local: a sliding-window layer of a model with its own local theta (Gemma 3): plain RoPE with it."""
    from ..rope import attention_factor, inv_freq

    D = cfg.rotary_dim or cfg.head_dim  # partial rotary: the first rotary_dim values rotate, the rest pass
    half = D // 2
    theta, scaling = (cfg.rope_local_theta, None) if local else (cfg.rope_theta, cfg.rope_scaling)
    inv = torch.from_numpy(inv_freq(theta, D, scaling))
    f = torch.tensor(attention_factor(scaling), dtype=torch.float32)
    ang = pos.to(torch.float32)[:, None] * inv[None, :]
    cos = (torch.cos(ang.double()).to(torch.float32) * f).to(x.dtype)[:, None, :]
    sin = (torch.sin(ang.double()).to(torch.float32) * f).to(x.dtype)[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half:D], x[..., D:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def _matmul(a, b, lmul_bits):
    """a @ b, or with every product an L-Mul (normengine.reference.lmul) when lmul_bits > 0."""
    if not lmul_bits:
        return a @ b
    from .lmul import lmul

    # products of the float32 operands (exact in float32), summed in the caller's precision
    return lmul(a.unsqueeze(-1), b.unsqueeze(-3), lmul_bits).to(a.dtype).sum(-2)


def _softmax_attention(q, k, v, scale, lmul_bits, operands=None, window=0, softcap=None):
    """Causal softmax attention. q [T, H, D], k/v [T, H, D] (GQA already expanded). operands: a dtype
    the operands of both matmuls (q, k, then p, v) are rounded to before exact products. window W > 0:
    query i sees keys i - W + 1 .. i only. softcap c: scores s -> c tanh(s / c) before the softmax."""
    T = q.size(0)
    r = (lambda t: t.to(operands).to(t.dtype)) if operands is not None else (lambda t: t)  # noqa: E731
    s = _matmul(r(q).transpose(0, 1), r(k).transpose(0, 1).transpose(1, 2), lmul_bits) * scale  # [H, T, T]
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if window:
        mask &= torch.ones(T, T, dtype=torch.bool).triu(1 - window)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    return _matmul(r(p), r(v).transpose(0, 1), lmul_bits).transpose(0, 1)  # [T, H, D]


def _linear_family(kind, cfg, q, k, v, decay):
    """The linear-attention family, causal, as per-token recurrences on the augmented state
    S'_t = lambda S'_{t-1} + [f(k_t); 1][v_t; 1]^T (ops/linear_attention.h). q/k/v [T, H, D]."""
    T, H, D = q.shape
    eps = cfg.linear_eps
    if kind == "linear":
        fm = cfg.linear_feature_map
        phi = (lambda x: F.elu(x) + 1) if fm == "elu1" else (F.relu if fm == "relu" else (lambda x: x))
    elif kind == "mala":
        phi = lambda x: F.elu(x) + 1  # noqa: E731
    else:
        phi = lambda x: x  # noqa: E731
    fq, fk = phi(q), phi(k)
    S = torch.zeros(H, D, D, dtype=q.dtype)
    z = torch.zeros(H, D, dtype=q.dtype)
    vs = torch.zeros(H, D, dtype=q.dtype)
    lam = decay.to(q.dtype)[:, None, None] if (kind == "norm" and decay is not None) else None
    out = []
    for t in range(T):
        if lam is not None:
            S = lam * S
        S = S + fk[t][:, :, None] * v[t][:, None, :]
        z = z + fk[t]
        vs = vs + v[t]
        n = t + 1
        num = torch.einsum("hd,hde->he", fq[t], S)
        if kind == "linear":
            o = num / ((fq[t] * z).sum(-1, keepdim=True) + eps) if cfg.linear_normalize else num
        elif kind == "mala":
            c = 1.0 / math.sqrt(D)
            zt = c * (fq[t] * z).sum(-1, keepdim=True) / n
            beta = 1 + 1 / (zt + eps)
            o = beta * (c / n) * num - zt * vs / n
        else:
            if cfg.norm_attention_norm == "rms":
                o = num / torch.sqrt((num * num).mean(-1, keepdim=True) + eps)
            else:
                mu = num.mean(-1, keepdim=True)
                o = (num - mu) / torch.sqrt(((num - mu) ** 2).mean(-1, keepdim=True) + eps)
        out.append(o)
    return torch.stack(out)


def _moe(cfg, h, linear, p):
    """A mixture-of-experts MLP of the normalized rows h [T, d]: router probabilities softmax(h Wr^T), each
    row's n_experts_used most probable experts with those probabilities as weights (renormalized to sum 1
    when moe_norm_topk), the sum of weight x gated expert MLP, plus sigmoid(h . w_sg) x the shared expert."""
    probs = torch.softmax(linear(h, p + "router.weight"), dim=-1)
    top, idx = probs.topk(cfg.n_experts_used, dim=-1)
    if cfg.moe_norm_topk:
        top = top / top.sum(-1, keepdim=True)

    def mlp(x, q):
        up = _act(cfg.activation, linear(x, q + "gate.weight")) * linear(x, q + "up.weight")
        return linear(up, q + "down.weight")

    out = torch.zeros_like(h)
    for e in range(cfg.n_experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, mlp(h[rows], f"{p}experts.{e}.") * top[rows, slot, None])
    if cfg.shared_expert_d_ff:
        out = out + torch.sigmoid(linear(h, p + "shared_gate.weight")) * mlp(h, p + "shared.")
    return out


def quantize_kv_int8(x):
    """The int8 KV cache's rounding (kv_cache_dtype=torch.int8), per token and head over the last dim:
    s = max |x| / 127, x -> s * round(x / s) (to nearest even); a row of zeros stays zero."""
    s = x.abs().amax(-1, keepdim=True) / 127
    return torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1)) * s, torch.zeros_like(x))


def forward(cfg, tensors: dict, ids, dtype=torch.float64, lmul_bits: int = 0, lmul_scope: str | None = None,
            stats: dict | None = None, attention_operands=None, kv_int8: bool = False):
    """Logits [T, vocab] of one sequence `ids` (list or 1-D tensor of token ids), computed in `dtype`.
    lmul_bits > 0 with lmul_scope 'attention' makes the softmax attention products L-Mul, 'all' every
    matmul too. attention_operands: a dtype (e.g. torch.float8_e4m3fn) that the softmax attention's
    matmul operands are rounded to before exact products (the fp8 baselines of the L-Mul paper). stats: a dict that collects, per norm ('blocks.{i}.attn_norm', ..., 'final_norm'), the
    per-channel maximum |output| over the tokens seen (calibration for SmoothQuant). kv_int8: the softmax
    layers' keys (after RoPE) and values rounded as the int8 KV cache stores them (quantize_kv_int8)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    T = ids.numel()
    W = lambda n: _w(tensors[n], dtype)  # noqa: E731
    V = lambda n: tensors[n].to(dtype) if n in tensors else None  # noqa: E731
    lin_bits = lmul_bits if lmul_scope == "all" else 0
    att_bits = lmul_bits if lmul_scope in ("attention", "all") else 0

    def record(name, h):
        if stats is not None:
            m = h.detach().abs().amax(0).to(torch.float64)
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
        return h

    def linear(x, n, bias=None):
        y = _matmul(x, W(n).t(), lin_bits)
        b = V(bias) if bias else None
        return y + b if b is not None else y

    x = W("tok_emb.weight")[ids]
    if cfg.emb_scale != 1.0:  # Gemma: times sqrt(d), as a float32 number
        x = x * torch.tensor(cfg.emb_scale, dtype=torch.float32).to(dtype)
    pos = torch.arange(T)
    if cfg.learned_pos:
        x = x + W("pos_emb.weight")[pos]
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    types = cfg.attention or ["softmax"] * cfg.n_layers
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = record(p + "attn_norm", _norm(cfg, x, V(p + "attn_norm.weight"), V(p + "attn_norm.bias")))
        q = linear(h, p + "attn.q.weight", p + "attn.q.bias" if cfg.qkv_bias else None).view(T, H, D)
        k = linear(h, p + "attn.k.weight", p + "attn.k.bias" if cfg.qkv_bias else None).view(T, Hkv, D)
        v = linear(h, p + "attn.v.weight", p + "attn.v.bias" if cfg.qkv_bias else None).view(T, Hkv, D)
        if cfg.qk_norm:  # Qwen3: each head of q and k RMS-normalized, with its own gain
            q = rms_norm(q, V(p + "attn.q_norm.weight"), cfg.norm_eps)
            k = rms_norm(k, V(p + "attn.k_norm.weight"), cfg.norm_eps)
        w = cfg.sliding_window[i] if cfg.sliding_window else 0
        if not cfg.learned_pos:
            local = bool(w) and cfg.rope_local_theta is not None
            q, k = _rope(cfg, q, pos, local), _rope(cfg, k, pos, local)
        if kv_int8 and types[i] == "softmax":
            k, v = quantize_kv_int8(k), quantize_kv_int8(v)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        if types[i] == "softmax":
            scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(D)
            a = _softmax_attention(q, k, v, scale, att_bits, attention_operands, w, cfg.attn_softcap)
        else:
            a = _linear_family(types[i], cfg, q, k, v, tensors.get(p + "attn.decay"))
        o = linear(a.reshape(T, H * D), p + "attn.o.weight", p + "attn.o.bias" if cfg.o_bias else None)
        o = rms_norm(o, V(p + "attn_post_norm.weight"), cfg.norm_eps) if cfg.post_norms else o
        block_in = x  # parallel residual: the MLP reads the block's input, not x + o
        x = x + o
        h = record(p + "mlp_norm", _norm(cfg, block_in if cfg.parallel_residual else x, V(p + "mlp_norm.weight"),
                                         V(p + "mlp_norm.bias")))
        if cfg.is_moe_layer(i):
            o = _moe(cfg, h, linear, p + "moe.")
        else:
            up = linear(h, p + "mlp.up.weight", p + "mlp.up.bias" if cfg.mlp_bias else None)
            if cfg.gated_mlp:
                g = linear(h, p + "mlp.gate.weight", p + "mlp.gate.bias" if cfg.mlp_bias else None)
                up = _act(cfg.activation, g) * up
            else:
                up = _act(cfg.activation, up)
            o = linear(up, p + "mlp.down.weight", p + "mlp.down.bias" if cfg.mlp_bias else None)
        x = x + (rms_norm(o, V(p + "mlp_post_norm.weight"), cfg.norm_eps) if cfg.post_norms else o)
    h = record("final_norm", _norm(cfg, x, V("final_norm.weight"), V("final_norm.bias")))
    logits = linear(h, "lm_head.weight", "lm_head.bias" if cfg.head_bias else None)
    return torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap if cfg.final_softcap else logits
