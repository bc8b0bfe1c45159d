"""Normalization ops: LayerNorm, RMSNorm, CRMSNorm and their fused residual-add forms, as autograd
Functions over the native kernels (CPU and CUDA, chosen by the input's device).

Every function accepts float32, float16, bfloat16 and float64 tensors of shape [..., n] (statistics
over the last dimension, accumulated in float32, float64 for float64 input); forward ops also take
numpy arrays and return numpy arrays. ``out=`` writes the result into a caller's buffer (only when
no gradient is needed)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C
from ._library import native_op, placeholder
from ..errors import ArgumentError
from ._tensor import (
    _is_compiling,
    acc_dtype,
    channel_vector,
    check_eps,
    check_input,
    check_like,
    check_no_overlap,
    check_out,
    empty_like,
    from_numpy,
    rows,
    stream_of,
    torch_empty_like,
)

LAYER, RMS, CRMS = 0, 1, 2
_NAMES = {LAYER: "layer_norm", RMS: "rms_norm", CRMS: "crms_norm"}


def _fwd_fake(kind, x, residual, w, b, eps, stats):
    rows_ = x.numel() // x.size(-1)
    acc = acc_dtype(x.dtype)
    return (torch_empty_like(x),
            torch_empty_like(x) if residual is not None else placeholder(x),
            x.new_empty(rows_, dtype=acc) if stats and kind == LAYER else placeholder(x),
            x.new_empty(rows_, dtype=acc) if stats else placeholder(x))


def _run_forward(kind, x, residual, w, b, eps, stats, out=None, residual_out=None):
    """The kernel into new outputs (or the caller's out / residual_out): (y, h = x + residual, mean, rstd),
    None for the absent ones (no residual, no stats, mean of an RMS norm)."""
    y = out if out is not None else empty_like(x)
    h = None
    if residual is not None:
        h = residual_out if residual_out is not None else empty_like(x)
    rows_ = x.numel() // x.size(-1)
    mean = rstd = None
    if stats:
        acc = acc_dtype(x.dtype)
        rstd = torch.empty(rows_, dtype=acc, device=x.device)
        if kind == LAYER:
            mean = torch.empty(rows_, dtype=acc, device=x.device)
    _C.norm_forward(kind, x, residual, w, b, eps, y, h, mean, rstd, stream_of(x))
    return y, h, mean, rstd


@native_op("norm_forward", _fwd_fake)
def _native_forward(kind: int, x: torch.Tensor, residual: Optional[torch.Tensor], w: Optional[torch.Tensor],
                    b: Optional[torch.Tensor], eps: float, stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(y, h = x + residual, mean, rstd); absent ones (no residual, no stats, mean of an RMS norm) empty."""
    return tuple(placeholder(x) if t is None else t for t in _run_forward(kind, x, residual, w, b, eps, stats))


def _forward(kind, x, residual, w, b, eps, out=None, residual_out=None, stats=True):
    """Run the native forward; returns (y, h, mean, rstd) with h = x + residual (or x)."""
    if out is None and residual_out is None and _is_compiling():  # traced: the custom operator
        y, h, mean, rstd = _native_forward(kind, x, residual, w, b, eps, stats)
        return (y, h if residual is not None else x, mean if stats and kind == LAYER else None,
                rstd if stats else None)
    # eager: the kernel called directly, without the operator's placeholder outputs (out= is refused
    # when gradients are needed)
    y, h, mean, rstd = _run_forward(kind, x, residual, w, b, eps, stats, out, residual_out)
    return y, (h if h is not None else x), mean, rstd


def _bwd_fake(kind, dy, h, w, rstd, dres, need_w, need_b, like=torch_empty_like):
    acc = acc_dtype(h.dtype)
    n = h.size(-1)
    return (like(h),
            h.new_empty(n, dtype=acc) if need_w else placeholder(h),
            h.new_empty(n, dtype=acc) if need_b else placeholder(h))


@native_op("norm_backward", _bwd_fake)
def _native_backward(kind: int, dy: torch.Tensor, h: torch.Tensor, w: Optional[torch.Tensor], rstd: torch.Tensor,
                     dres: Optional[torch.Tensor], need_w: bool, need_b: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """(dx, dweight, dbias) of y = norm(h) (+ dres, the gradient reaching h itself); absent ones empty."""
    dx, dw, db = _bwd_fake(kind, dy, h, w, rstd, dres, need_w, need_b, like=empty_like)
    _C.norm_backward(kind, rows(dy), h, w, rstd, None if dres is None else rows(dres), dx, dw if need_w else None,
                     db if need_b else None, stream_of(h))
    return dx, dw, db


def _backward(kind, dy, h, w, rstd, dres, need_w, need_b):
    dx, dw, db = _native_backward(kind, dy, h, w, rstd, dres, need_w, need_b)
    return dx, (dw if need_w else None), (db if need_b else None)


class NormFunction(torch.autograd.Function):
    """y = norm(x) * weight (+ bias) for kind in {LAYER, RMS, CRMS}. Saves x and the per-row rstd;
    backward recomputes the row mean (LayerNorm) from x."""

    @staticmethod
    def forward(ctx, kind, x, weight, bias, eps, w32, b32):
        y, _, _, rstd = _forward(kind, x, None, w32, b32, eps)
        ctx.kind = kind
        ctx.save_for_backward(x, w32, rstd)
        ctx.wdtype = None if weight is None else weight.dtype
        ctx.bdtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w32, rstd = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dx, dw, db = _backward(ctx.kind, dy, x, w32, rstd, None, need_w, need_b)
        dw = dw.to(ctx.wdtype) if dw is not None else None
        db = db.to(ctx.bdtype) if db is not None else None
        return None, dx, dw, db, None, None, None


class AddNormFunction(torch.autograd.Function):
    """(norm(x + residual) * weight (+ bias), x + residual) in one pass over memory. Saves the sum h;
    the gradient reaching h through the second output is added into dx by the kernel."""

    @staticmethod
    def forward(ctx, kind, x, residual, weight, bias, eps, w32, b32):
        y, h, _, rstd = _forward(kind, x, residual, w32, b32, eps)
        ctx.kind = kind
        ctx.save_for_backward(h, w32, rstd)
        ctx.wdtype = None if weight is None else weight.dtype
        ctx.bdtype = None if bias is None else bias.dtype
        # An unused output (often h = x + residual) gets a None gradient instead of a materialized
        # zero tensor, so the kernel skips adding it (one full read less).
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, w32, rstd = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if dy is None:  # only h = x + residual was used: its gradient passes straight through
            return None, dh, dh, None, None, None, None, None
        dx, dw, db = _backward(ctx.kind, dy, h, w32, rstd, dh, need_w, need_b)
        dw = dw.to(ctx.wdtype) if dw is not None else None
        db = db.to(ctx.bdtype) if db is not None else None
        # d(x + residual)/dx = d(x + residual)/dresidual = 1: one gradient serves both.
        return None, dx, dx, dw, db, None, None, None


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _norm(kind, x, weight, bias, eps, out):
    x, was_np = from_numpy(x, "x")
    x = check_input(x)
    eps = check_eps(eps)
    w32 = channel_vector(weight, x, "weight")
    b32 = channel_vector(bias, x, "bias")
    if _needs_grad(x, weight, bias):
        if out is not None:
            raise ArgumentError(f"out: {_NAMES[kind]} cannot write into out= when gradients are required")
        return NormFunction.apply(kind, x, weight, bias, eps, w32, b32)
    if out is not None:
        out = check_out(out, x)
        check_no_overlap(out, "out", {"x": x, "weight": w32, "bias": b32}, same_ok=("x",))
    y = _forward(kind, x, None, w32, b32, eps, out=out, stats=False)[0]
    return y.numpy() if was_np else y


def _add_norm(kind, x, residual, weight, bias, eps, out, residual_out):
    x, was_np = from_numpy(x, "x")
    residual, _ = from_numpy(residual, "residual")
    x = check_input(x)
    residual = check_like(residual, x, "residual")
    eps = check_eps(eps)
    w32 = channel_vector(weight, x, "weight")
    b32 = channel_vector(bias, x, "bias")
    if _needs_grad(x, residual, weight, bias):
        if out is not None or residual_out is not None:
            raise ArgumentError(f"out: add_{_NAMES[kind]} cannot write into out= when gradients are required")
        return AddNormFunction.apply(kind, x, residual, weight, bias, eps, w32, b32)
    reads = {"x": x, "residual": residual, "weight": w32, "bias": b32}
    if out is not None:
        out = check_out(out, x)
        check_no_overlap(out, "out", reads, same_ok=("x", "residual"))
    if residual_out is not None:
        residual_out = check_out(residual_out, x, "residual_out")
        check_no_overlap(residual_out, "residual_out", dict(reads, out=out), same_ok=("x", "residual"))
    y, h, _, _ = _forward(kind, x, residual, w32, b32, eps, out=out, residual_out=residual_out, stats=False)
    return (y.numpy(), h.numpy()) if was_np else (y, h)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, *, out=None):
    """LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias.

    Statistics are computed shifted by the row's first element and in two passes, so rows with a
    large mean (1e4 + N(0, 1)) normalize to float32 precision."""
    return _norm(LAYER, x, weight, bias, eps, out)


def rms_norm(x, weight=None, eps: float = 1e-6, *, out=None):
    """RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * weight."""
    return _norm(RMS, x, weight, None, eps, out)


def crms_norm(x, weight=None, eps: float = 1e-6, *, out=None):
    """Compressed RMSNorm (Jiang et al. 2023). x holds the first d-1 coordinates of a zero-mean
    d-vector whose last coordinate, -sum(x), is not stored:

        y = x / sqrt((sum x_i^2 + (sum x_i)^2) / d + eps) * weight

    equal to RMSNorm of the full d-vector, restricted to its first d-1 coordinates. The output has
    the d-1 features of x."""
    return _norm(CRMS, x, weight, None, eps, out)


def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5, *, out=None, residual_out=None):
    """(layer_norm(x + residual), x + residual), reading x and residual once and writing both
    outputs once. The sum is rounded to x's dtype before it is normalized, as an unfused add would."""
    return _add_norm(LAYER, x, residual, weight, bias, eps, out, residual_out)


def add_rms_norm(x, residual, weight=None, eps: float = 1e-6, *, out=None, residual_out=None):
    """(rms_norm(x + residual), x + residual) in one pass over memory."""
    return _add_norm(RMS, x, residual, weight, None, eps, out, residual_out)
