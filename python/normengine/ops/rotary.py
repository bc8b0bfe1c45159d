"""Rotary position embedding as a training op ("rotate half" pairing, transformers' apply_rotary_pos_emb), forward
and backward one native kernel each (CPU and CUDA: cpp/ops/rotary.cpp, cuda/rotary.cu):

    y = x * cos + rotate_half(x) * sin        over the first R = cos.shape[-1] features (the rest copied)

where rotate_half(x) = cat(-x2, x1) of the halves. The backward is the transposed rotation. cos / sin are what the
model's rotary module makes (no gradient flows to them); they broadcast against x's leading dimensions, so
transformers' [batch, 1, T, D] against q [batch, heads, T, D] and a plain [T, D] table both work.
"""

from __future__ import annotations

import torch

from .. import _C
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ._library import native_op
from ._tensor import acc_dtype, check_input, empty_like, stream_of


@native_op("rotary_embedding", lambda x, cos, sin, crow, backward: torch.empty(x.shape, dtype=x.dtype,
                                                                                device=x.device))
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, crow: torch.Tensor,
            backward: bool) -> torch.Tensor:
    y = empty_like(x)
    _C.rotary_embedding(x, cos, sin, crow, y, backward, stream_of(x))
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, crow):
        ctx.save_for_backward(cos, sin, crow)
        return _rotary(x, cos, sin, crow, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin, crow = ctx.saved_tensors
        return _rotary(check_input(dy.contiguous(), "grad_output"), cos, sin, crow, True), None, None, None


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over x's first cos.shape[-1] features (the rest copied): x [..., D];
    cos, sin [..., R] (R even, <= D) broadcastable to x's leading dimensions. Differentiable in x."""
    x = check_input(x, "x")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise DTypeError(f"{name}: expected a floating-point torch.Tensor")
        if t.device != x.device:
            raise DeviceError(f"{name} is on {t.device} but x is on {x.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ArgumentError(f"{name}: rotary_embedding gives no gradient for cos / sin; pass them detached")
    if cos.shape != sin.shape:
        raise ShapeError(f"sin: shape {tuple(sin.shape)} does not match cos's {tuple(cos.shape)}")
    R, lead = cos.size(-1) if cos.dim() else 0, x.shape[:-1]
    if cos.dim() == 0 or R % 2 or R > x.size(-1) or R == 0:
        raise ShapeError(f"cos: expected [..., R] with R even and 0 < R <= {x.size(-1)} (x's last dimension), "
                         f"got {tuple(cos.shape)}")
    try:
        if torch.broadcast_shapes(cos.shape[:-1], lead) != lead:
            raise RuntimeError
    except RuntimeError:
        raise ShapeError(f"cos: its leading dimensions {tuple(cos.shape[:-1])} do not broadcast to x's "
                         f"{tuple(lead)}") from None
    acc = acc_dtype(x.dtype)
    table_c = cos.detach().to(acc).reshape(-1, R).contiguous()
    table_s = sin.detach().to(acc).reshape(-1, R).contiguous()
    P = table_c.size(0)
    crow = torch.arange(P, device=x.device).reshape(cos.shape[:-1]).expand(lead).reshape(-1).contiguous()
    return RotaryFunction.apply(x, table_c, table_s, crow)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1): (q, k) rotated, on the native op."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)


__all__ = ["rotary_embedding", "apply_rotary_pos_emb", "RotaryFunction"]
