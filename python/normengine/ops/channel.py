"""Per-channel primitives over the rows of x [..., n]: column moments and channel-wise affine
combinations. Unified Normalization (normengine.nn.UnifiedNorm) is built from these; they run as
native kernels on CPU and CUDA. Not differentiable themselves: UN's autograd Function composes them."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C
from ._library import native_op, placeholder
from ._tensor import acc_dtype, channel_vector, check_input, check_like, check_no_overlap, check_out, empty_like, stream_of


def _moments_fake(x, dy):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.size(-1), dtype=acc), x.new_empty(x.size(-1), dtype=acc) if dy is not None else placeholder(x)


@native_op("channel_moments", _moments_fake)
def _moments(x: torch.Tensor, dy: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Without dy: (sum_r x^2, empty); with dy: (sum_r x * dy, sum_r dy), per channel."""
    s1, s2 = _moments_fake(x, dy)
    _C.channel_moments(x, dy, s1, s2 if dy is not None else None, stream_of(x))
    return s1, s2


def channel_sumsq(x: torch.Tensor) -> torch.Tensor:
    """s[c] = sum over all rows of x[..., c]^2, in float32 (float64 for float64 x)."""
    return _moments(check_input(x), None)[0]


def channel_dot(x: torch.Tensor, dy: torch.Tensor):
    """(sum_r x[r, c] * dy[r, c], sum_r dy[r, c]) over all rows, in the accumulator dtype."""
    x = check_input(x)
    return _moments(x, check_like(dy, x, "dy"))


@native_op("channel_affine", lambda x, a, b: torch.empty(x.shape, dtype=x.dtype, device=x.device))
def _affine(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    y = empty_like(x)
    _C.channel_affine(x, a, b, y, stream_of(x))
    return y


@native_op("channel_lincomb", lambda u, a, v, b: torch.empty(u.shape, dtype=u.dtype, device=u.device))
def _lincomb(u: torch.Tensor, a: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    o = empty_like(u)
    _C.channel_lincomb(u, a, v, b, o, stream_of(u))
    return o


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None, *, out=None):
    """y[..., c] = scale[c] * x[..., c] + shift[c]."""
    x = check_input(x)
    a = channel_vector(scale, x, "scale")
    b = channel_vector(shift, x, "shift")
    if out is None:
        return _affine(x, a, b)
    y = check_out(out, x)
    check_no_overlap(y, "out", {"x": x, "scale": a, "shift": b}, same_ok=("x",))
    _C.channel_affine(x, a, b, y, stream_of(x))
    return y


def channel_lincomb(u: torch.Tensor, a: torch.Tensor, v: torch.Tensor, b: torch.Tensor, *, out=None):
    """out[..., c] = a[c] * u[..., c] + b[c] * v[..., c]."""
    u = check_input(u, "u")
    v = check_like(v, u, "v", "u")
    a = channel_vector(a, u, "a")
    b = channel_vector(b, u, "b")
    if out is None:
        return _lincomb(u, a, v, b)
    o = check_out(out, u)
    check_no_overlap(o, "out", {"u": u, "v": v, "a": a, "b": b}, same_ok=("u", "v"))
    _C.channel_lincomb(u, a, v, b, o, stream_of(u))
    return o
