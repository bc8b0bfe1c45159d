"""Reference linear-attention family, token by token, written as the formulas (float64-safe).

Every op keeps, per (batch, head), the augmented state (cpp/ops/linear_attention.h)

    S'_t = lambda S'_{t-1} + [f(k_t); 1] [v_t; 1]^T           [Dk + 1, Dv + 1]

so S'[:Dk, :Dv] = S, S'[:Dk, Dv] = z = sum f(k), S'[Dk, :Dv] = sum v, S'[Dk, Dv] = t. Shapes: q, k
[B, T, H, Dk], v [B, T, H, Dv], state [B, H, Dk + 1, Dv + 1]. Returns (o, final_state)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def feature_map(name: str):
    if name == "elu1":
        return lambda x: F.elu(x) + 1
    if name == "relu":
        return F.relu
    if name == "identity":
        return lambda x: x
    raise ValueError(f"feature_map: expected 'elu1', 'relu' or 'identity', got {name!r}")


def _run(kind, q, k, v, f, causal, initial_state, decay, readout):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = q.dtype
    S = torch.zeros(B, H, Dk + 1, Dv + 1, dtype=dt) if initial_state is None else initial_state.to(dt).clone()
    fq, fk = f(q), f(k)
    one = torch.ones(B, T, H, 1, dtype=dt)
    fk1 = torch.cat([fk, one], -1)
    v1 = torch.cat([v, one], -1)
    lam = None if decay is None else decay.to(dt)[None, :, None, None]
    if not causal:
        S = S + torch.einsum("bthi,bthj->bhij", fk1, v1)
        outs = [readout(fq[:, t], S) for t in range(T)]
        return torch.stack(outs, 1), S
    outs = []
    for t in range(T):
        if lam is not None:
            S = lam * S
        S = S + fk1[:, t, :, :, None] * v1[:, t, :, None, :]
        outs.append(readout(fq[:, t], S))
    return torch.stack(outs, 1), S


def linear_attention(q, k, v, feature_map_name="elu1", normalize=True, eps=1e-6, causal=True, initial_state=None):
    """o_t = S_t^T phi(q_t) / (phi(q_t) . z_t + eps)  (or without the denominator)."""
    Dk, Dv = q.shape[-1], v.shape[-1]

    def readout(fq, S):  # fq [B, H, Dk], S [B, H, Dk+1, Dv+1]
        r = torch.einsum("bhi,bhij->bhj", fq, S[:, :, :Dk])
        return r[..., :Dv] / (r[..., Dv:] + eps) if normalize else r[..., :Dv]

    return _run("linear", q, k, v, feature_map(feature_map_name), causal, initial_state, None, readout)


def mala_attention(q, k, v, eps=1e-6, causal=True, initial_state=None):
    """Magnitude-aware linear attention (phi = elu+1, c = Dk^-1/2), n = tokens in the state:
    zq = c phi(q) . z / n, beta = 1 + 1 / (zq + eps), o = beta (c / n) S^T phi(q) - zq (sum v) / n."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    c = 1.0 / math.sqrt(Dk)

    def readout(fq, S):
        r = torch.einsum("bhi,bhij->bhj", fq, S[:, :, :Dk])
        n = S[:, :, Dk, Dv:]
        zq = c * r[..., Dv:] / n
        beta = 1 + 1 / (zq + eps)
        return beta * (c / n) * r[..., :Dv] - zq * S[:, :, Dk, :Dv] / n

    return _run("mala", q, k, v, feature_map("elu1"), causal, initial_state, None, readout)


def mala_weights(q, k, eps=1e-6):
    """The non-causal MALA attention matrix [B, H, T, T]: w_ij = beta_i s_ij - zq_i / N, with
    s_ij = c phi(q_i) . phi(k_j) / N (each row sums to one)."""
    B, T, H, Dk = q.shape
    c = 1.0 / math.sqrt(Dk)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    s = c * torch.einsum("bihd,bjhd->bhij", fq, fk) / T
    zq = s.sum(-1, keepdim=True)
    beta = 1 + 1 / (zq + eps)
    return beta * s - zq / T


def norm_attention(q, k, v, decay=None, norm="rms", eps=1e-6, causal=True, initial_state=None):
    """o_t = Norm(S_t^T q_t), S_t = lambda S_{t-1} + k_t v_t^T (no feature map, no denominator)."""
    Dk, Dv = q.shape[-1], v.shape[-1]

    def readout(fq, S):
        r = torch.einsum("bhi,bhij->bhj", fq, S[:, :, :Dk, :Dv])
        if norm == "rms":
            return r / torch.sqrt((r * r).mean(-1, keepdim=True) + eps)
        mu = r.mean(-1, keepdim=True)
        return (r - mu) / torch.sqrt(((r - mu) ** 2).mean(-1, keepdim=True) + eps)

    return _run("norm", q, k, v, lambda x: x, causal, initial_state, decay, readout)
