"""Attention layers of the linear family: q/k/v/o projections around normengine.ops.linear_attention,
mala_attention and norm_attention, with the fixed-size state for step-by-step use. Their weight
names (q, k, v, o) are the runner's canonical ones (blocks.{i}.attn.*), so a model built from them
saves as a normengine checkpoint whose config names the attention type."""

from __future__ import annotations

import torch

from .. import ops


class _LinearFamilyAttention(torch.nn.Module):
    kind = "linear"

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, bias: bool = False, eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim or d_model // n_heads
        inner = self.n_heads * self.head_dim
        kw = dict(device=device, dtype=dtype)
        self.q = torch.nn.Linear(d_model, inner, bias=bias, **kw)
        self.k = torch.nn.Linear(d_model, inner, bias=bias, **kw)
        self.v = torch.nn.Linear(d_model, inner, bias=bias, **kw)
        self.o = torch.nn.Linear(inner, d_model, bias=bias, **kw)
        self.eps = eps

    def _attend(self, q, k, v, state, output_state):
        raise NotImplementedError

    def forward(self, x, state=None, output_state: bool = False):
        """x [B, T, d_model] -> [B, T, d_model] (and the state [B, H, D+1, D+1] with output_state);
        `state` continues a sequence from an earlier call."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.n_heads, self.head_dim)
        v = self.v(x).view(B, T, self.n_heads, self.head_dim)
        a = self._attend(q, k, v, state, output_state)
        a, st = a if output_state else (a, None)
        y = self.o(a.reshape(B, T, -1))
        return (y, st) if output_state else y


class LinearAttention(_LinearFamilyAttention):
    """Causal linear attention (feature map elu+1 / relu / identity, normalized by phi(q) . z)."""

    def __init__(self, d_model, n_heads, head_dim=None, feature_map: str = "elu1", normalize: bool = True, **kw):
        super().__init__(d_model, n_heads, head_dim, **kw)
        self.feature_map, self.normalize = feature_map, normalize

    def _attend(self, q, k, v, state, output_state):
        return ops.linear_attention(q, k, v, feature_map=self.feature_map, normalize=self.normalize, eps=self.eps,
                                    initial_state=state, output_final_state=output_state)


class MALAAttention(_LinearFamilyAttention):
    """Causal magnitude-aware linear attention (the engine's prefix-sum form of MALA)."""

    def _attend(self, q, k, v, state, output_state):
        return ops.mala_attention(q, k, v, eps=self.eps, initial_state=state, output_final_state=output_state)


class NormAttention(_LinearFamilyAttention):
    """TransNormer's NormAttention: Norm(S^T q) with an optional fixed decay per head."""

    def __init__(self, d_model, n_heads, head_dim=None, norm: str = "rms", decay=None, **kw):
        super().__init__(d_model, n_heads, head_dim, **kw)
        self.norm = norm
        self.register_buffer("decay", None if decay is None else torch.as_tensor(decay, dtype=torch.float32))

    def _attend(self, q, k, v, state, output_state):
        return ops.norm_attention(q, k, v, decay=self.decay, norm=self.norm, eps=self.eps, initial_state=state,
                                  output_final_state=output_state)
