"""Normalization modules: drop-in replacements for torch.nn.LayerNorm / RMSNorm backed by the
native kernels, and CRMSNorm."""

from __future__ import annotations

import torch

from .. import ops
from ..errors import ArgumentError


def _check_dim(d) -> int:
    if isinstance(d, (tuple, list)):
        if len(d) != 1:
            raise ArgumentError(f"normalized_shape: only the last dimension is normalized, got {tuple(d)}")
        d = d[0]
    if not isinstance(d, int) or d < 1:
        raise ArgumentError(f"normalized_shape: expected a positive int, got {d!r}")
    return d


class LayerNorm(torch.nn.Module):
    """LayerNorm over the last dimension (same parameters and state_dict keys as torch.nn.LayerNorm)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        d = _check_dim(normalized_shape)
        self.normalized_shape = (d,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(d, **kw)) if elementwise_affine else None
        self.bias = torch.nn.Parameter(torch.zeros(d, **kw)) if elementwise_affine and bias else None

    def forward(self, x, residual=None):
        """norm(x), or with `residual` the pair (norm(x + residual), x + residual)."""
        if residual is not None:
            return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension (parameter `weight`, as torch.nn.RMSNorm)."""

    def __init__(self, normalized_shape, eps: float = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None):
        super().__init__()
        d = _check_dim(normalized_shape)
        self.normalized_shape = (d,)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(d, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x, residual=None):
        if residual is not None:
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class CRMSNorm(torch.nn.Module):
    """Compressed RMSNorm over d-1 stored features of a zero-mean d-vector; `d_minus_1` is the
    stored width (the width of x and of the weight)."""

    def __init__(self, d_minus_1: int, eps: float = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None):
        super().__init__()
        d = _check_dim(d_minus_1)
        self.normalized_shape = (d,)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(d, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x):
        return ops.crms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape[0]} (+1 implied), eps={self.eps}"
