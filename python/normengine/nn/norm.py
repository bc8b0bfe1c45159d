"""Normalization modules: drop-in replacements for torch.nn.LayerNorm / RMSNorm backed by the
native kernels, and CRMSNorm."""

from __future__ import annotations

import torch

from .. import ops
from ..errors import ArgumentError, ShapeError


def _check_shape(shape) -> tuple:
    """normalized_shape as torch.nn.LayerNorm takes it: an int or a sequence of positive ints."""
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ArgumentError(f"normalized_shape: expected a positive int or a sequence of them, got {shape!r}")
    return dims


def _flat(t, shape: tuple, name: str):
    """t [..., *shape] as [..., prod(shape)] (the statistics of a norm over several trailing dims are
    those over their flattened elements), or t itself when one dim is normalized."""
    if t is None or len(shape) == 1:
        return t
    if not isinstance(t, torch.Tensor) or tuple(t.shape[t.dim() - len(shape):]) != shape:
        raise ShapeError(f"{name}: expected trailing dimensions {shape}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t.reshape(*t.shape[:t.dim() - len(shape)], -1)


def _unflat(t, like):
    return t if t.shape == like.shape else t.reshape(like.shape)


def _check_dim(d) -> int:
    """A single normalized width (CRMSNorm's stored features)."""
    dims = _check_shape(d)
    if len(dims) != 1:
        raise ArgumentError(f"normalized_shape: only the last dimension is normalized, got {dims}")
    return dims[0]


class LayerNorm(torch.nn.Module):
    """LayerNorm over the trailing `normalized_shape` dimensions (same arguments, parameters and
    state_dict keys as torch.nn.LayerNorm; several trailing dims are normalized as one flattened row)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.normalized_shape = _check_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        shape = self.normalized_shape
        self.weight = torch.nn.Parameter(torch.ones(shape, **kw)) if elementwise_affine else None
        self.bias = torch.nn.Parameter(torch.zeros(shape, **kw)) if elementwise_affine and bias else None

    def forward(self, x, residual=None):
        """norm(x), or with `residual` the pair (norm(x + residual), x + residual)."""
        shp = self.normalized_shape
        w, b = _flat(self.weight, shp, "weight"), _flat(self.bias, shp, "bias")
        if residual is not None:
            y, h = ops.add_layer_norm(_flat(x, shp, "x"), _flat(residual, shp, "residual"), w, b, self.eps)
            return _unflat(y, x), _unflat(h, x)
        return _unflat(ops.layer_norm(_flat(x, shp, "x"), w, b, self.eps), x)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(torch.nn.Module):
    """RMSNorm over the trailing `normalized_shape` dimensions (parameter `weight`, as torch.nn.RMSNorm).
    eps=None, as in torch.nn.RMSNorm, means torch.finfo(x.dtype).eps; the default is 1e-6."""

    def __init__(self, normalized_shape, eps: float | None = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.normalized_shape = _check_shape(normalized_shape)
        self.eps = eps
        self.weight = (torch.nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
                       if elementwise_affine else None)

    def forward(self, x, residual=None):
        shp = self.normalized_shape
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        w = _flat(self.weight, shp, "weight")
        if residual is not None:
            y, h = ops.add_rms_norm(_flat(x, shp, "x"), _flat(residual, shp, "residual"), w, eps)
            return _unflat(y, x), _unflat(h, x)
        return _unflat(ops.rms_norm(_flat(x, shp, "x"), w, eps), x)

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
