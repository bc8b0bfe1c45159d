"""Per-channel primitives over the rows of x [..., n]: column moments and channel-wise affine
combinations. Unified Normalization (normengine.nn.UnifiedNorm) is built from these; they run as
native kernels on CPU and CUDA. Not differentiable themselves: UN's autograd Function composes them."""

from __future__ import annotations

import torch

from .. import _C
from ._tensor import acc_dtype, channel_vector, check_input, check_like, check_no_overlap, check_out, stream_of


def channel_sumsq(x: torch.Tensor) -> torch.Tensor:
    """s[c] = sum over all rows of x[..., c]^2, in float32 (float64 for float64 x)."""
    x = check_input(x)
    s = torch.empty(x.size(-1), dtype=acc_dtype(x.dtype), device=x.device)
    _C.channel_moments(x, None, s, None, stream_of(x))
    return s


def channel_dot(x: torch.Tensor, dy: torch.Tensor):
    """(sum_r x[r, c] * dy[r, c], sum_r dy[r, c]) over all rows, in the accumulator dtype."""
    x = check_input(x)
    dy = check_like(dy, x, "dy")
    acc = acc_dtype(x.dtype)
    s1 = torch.empty(x.size(-1), dtype=acc, device=x.device)
    s2 = torch.empty(x.size(-1), dtype=acc, device=x.device)
    _C.channel_moments(x, dy, s1, s2, stream_of(x))
    return s1, s2


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None, *, out=None):
    """y[..., c] = scale[c] * x[..., c] + shift[c]."""
    x = check_input(x)
    a = channel_vector(scale, x, "scale")
    b = channel_vector(shift, x, "shift")
    y = check_out(out, x) if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    check_no_overlap(y, "out", {"x": x, "scale": a, "shift": b}, same_ok=("x",))
    _C.channel_affine(x, a, b, y, stream_of(x))
    return y


def channel_lincomb(u: torch.Tensor, a: torch.Tensor, v: torch.Tensor, b: torch.Tensor, *, out=None):
    """out[..., c] = a[c] * u[..., c] + b[c] * v[..., c]."""
    u = check_input(u, "u")
    v = check_like(v, u, "v", "u")
    a = channel_vector(a, u, "a")
    b = channel_vector(b, u, "b")
    o = check_out(out, u) if out is not None else torch.empty(u.shape, dtype=u.dtype, device=u.device)
    check_no_overlap(o, "out", {"u": u, "v": v, "a": a, "b": b}, same_ok=("u", "v"))
    _C.channel_lincomb(u, a, v, b, o, stream_of(u))
    return o
