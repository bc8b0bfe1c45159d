"""norm_linear: y = norm(x) W^T + b, the normalization applied inside the GEMM (its per-row
statistics scale the GEMM's output in the epilogue), so norm(x) is never written to memory.

The norm has no gain or bias of its own here: fold them into W and b first (normengine.convert
folds a whole model; normengine.nn.fold_norms a module). Forward runs natively; backward recomputes
norm(x) from x and the saved statistics:
    dW = dy^T norm(x),  db = sum dy,  d norm(x) = dy W,  dx = norm_backward(d norm(x))."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C
from ..errors import ArgumentError, DTypeError
from ._tensor import bf16_products, check_eps, check_input, check_no_overlap, empty, stream_of, torch_empty
from ._library import native_op, placeholder
from .linear import WEIGHT_DTYPES, _check_bias, _check_weight
from .norm import CRMS, LAYER, RMS, _native_backward

_KINDS = {"layer": LAYER, "layernorm": LAYER, "rms": RMS, "rmsnorm": RMS, "crms": CRMS, "crmsnorm": CRMS}


def _kind(norm) -> int:
    try:
        return _KINDS[norm]
    except KeyError:
        raise ArgumentError(f"norm: expected 'layer', 'rms' or 'crms', got {norm!r}") from None


def _normalized(kind, x, mean, rstd):
    """norm(x) from the saved statistics (for backward), in x's dtype."""
    shape = x.shape[:-1] + (1,)
    if kind == LAYER:
        # x - mean is exact for rows whose mean is large next to their spread (Sterbenz); the rounded
        # mean's leftover (up to ulp(mean) / 2, as large as the spread can be) is taken off as well
        xc = x - mean.view(shape).to(x.dtype)
        return (xc - xc.mean(-1, keepdim=True)) * rstd.view(shape).to(x.dtype)
    return x * rstd.view(shape).to(x.dtype)


def _stats_fake(kind, x, eps):
    n_rows = x.numel() // x.size(-1)
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(n_rows, dtype=acc_t) if kind == LAYER else placeholder(x), x.new_empty(n_rows, dtype=acc_t))


@native_op("norm_stats", _stats_fake)
def _native_stats(kind: int, x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean (LayerNorm; else empty), rstd) of every row of x."""
    mean, rstd = _stats_fake(kind, x, eps)
    _C.norm_stats(kind, x, eps, mean if kind == LAYER else None, rstd, stream_of(x))
    return mean, rstd


def _nl_fake(kind, x, w, b, eps, col_sum, medium, new=torch_empty):
    mean, rstd = _stats_fake(kind, x, eps)
    return new(x.shape[:-1] + (w.shape[0],), torch.float32, x.device), mean, rstd


@native_op("norm_linear", _nl_fake)
def _native_norm_linear(kind: int, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], eps: float,
                        col_sum: Optional[torch.Tensor], medium: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """(y = norm(x) w^T + b, mean (LayerNorm; else empty), rstd): float32, the statistics applied in the
    GEMM's epilogue (CPU: cpp/ops/norm_linear.cpp; CUDA: cuda/gemm.cu's norm epilogue)."""
    y, mean, rstd = _nl_fake(kind, x, w, b, eps, col_sum, medium, new=empty)
    _C.norm_linear(kind, x, w, b, eps, col_sum, y, mean if kind == LAYER else None, rstd, stream_of(x), medium)
    return y, mean, rstd


def _composed(kind, x, w, b, eps, col_sum):
    """norm_linear composed (float64, for gradcheck): native statistics, the GEMM through torch, then the
    per-row epilogue. Returns (y, mean or None, rstd)."""
    mean, rstd = _native_stats(kind, x, eps)
    mean = mean if kind == LAYER else None
    shape = x.shape[:-1] + (1,)
    if kind == LAYER:
        # (x - mean) W^T, not x W^T - mean colsum(W): the latter cancels digits for rows whose mean
        # is large next to their spread. x - mean is exact for such rows (Sterbenz); what the
        # rounded mean leaves, delta = mean(x - mean), is small and taken off as delta colsum(W).
        xc = x - mean.view(shape).to(x.dtype)
        delta = xc.mean(-1, keepdim=True)
        c = col_sum.to(x.dtype) if col_sum is not None else w.to(x.dtype).sum(1)
        acc = xc @ w.t().to(x.dtype) - delta * c
    else:
        acc = x @ w.t().to(x.dtype)
    y = acc * rstd.view(shape)
    if b is not None:
        y = y + b.to(y.dtype)
    return y, mean, rstd


def _forward_native(kind, x, w, b, eps, col_sum, medium=False):
    if x.dtype != torch.float32:
        return _composed(kind, x, w, b, eps, col_sum)
    y, mean, rstd = _native_norm_linear(kind, x, w, b, eps, col_sum, medium)
    return y, (mean if kind == LAYER else None), rstd


class NormLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind, x, weight, bias, eps, col_sum, medium):
        w = weight.detach()
        y, mean, rstd = _forward_native(kind, x, w, None if bias is None else bias.detach(), eps, col_sum, medium)
        ctx.kind = kind
        ctx.save_for_backward(x, weight, mean if mean is not None else rstd, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        kind = ctx.kind
        dy = dy.contiguous()
        dx = dw = db = None
        n = _normalized(kind, x, mean, rstd)
        if ctx.needs_input_grad[2]:
            dw = (dy.reshape(-1, dy.size(-1)).t() @ n.reshape(-1, n.size(-1))).to(w.dtype)
        if ctx.needs_input_grad[3]:
            db = dy.reshape(-1, dy.size(-1)).sum(0)
        if ctx.needs_input_grad[1]:
            dn = (dy @ w.to(dy.dtype)).contiguous()
            dx = _native_backward(kind, dn, x, None, rstd, None, False, False)[0]
        return None, dx, dw, db, None, None, None


def norm_linear(x, weight, bias=None, norm: str = "rms", eps: float | None = None, *, col_sum=None, out=None,
                matmul_precision: str = "highest"):
    """y = norm(x) @ weight.T + bias, norm in {'rms', 'crms', 'layer'} over the last dimension of x,
    without writing norm(x). x: float32 [..., K] (bfloat16 / float16, e.g. under torch.autocast, are
    widened to float32 for the kernel and y comes back in x's dtype, gradients included); weight: [N, K]
    float32 / bfloat16 / float16;
    bias: [N] float32. col_sum (LayerNorm only): weight.sum(1) precomputed, else computed per call.
    eps defaults to 1e-5 for 'layer', 1e-6 otherwise. out: a float32 [..., N] tensor to write into
    (reused memory; only when no gradient is needed). matmul_precision="medium": on a CPU with
    AMX-BF16 or AVX512-BF16 and 16+ rows, norm(x) and a float32 weight are rounded to bfloat16 for the products
    (fp32 sums), as normengine.ops.linear; the backward stays exact (straight through). CUDA tensors:
    the statistics (cuda/norm.cu), then the GEMM with the norm epilogue (cuda/gemm.cu: LayerNorm's
    mean subtracted as x is read, in two parts so rows with a large mean stay exact, rstd on the sums),
    fp32 products; matmul_precision has no effect there."""
    medium = bf16_products(matmul_precision)
    kind = _kind(norm)
    eps = check_eps((1e-5 if kind == LAYER else 1e-6) if eps is None else eps)
    x = check_input(x)
    if x.dtype in (torch.bfloat16, torch.float16):  # widened (differentiably) and narrowed back
        y = norm_linear(x.float(), weight, bias, norm, eps, col_sum=col_sum, out=out, matmul_precision=matmul_precision)
        return y if out is not None else y.to(x.dtype)
    if x.dtype not in (torch.float32, torch.float64):
        raise DTypeError(f"x: norm_linear takes float32 (or float64) activations, or bfloat16 / float16, got {x.dtype}")
    # float64 x (the composed path, for gradcheck) takes float64 weights too
    w = _check_weight(weight, x, WEIGHT_DTYPES + ((torch.float64,) if x.dtype == torch.float64 else ()))
    if bias is not None:
        _check_bias(bias, x, w.size(0))
        bias = bias.resolve_neg().to(x.dtype)
    if out is not None:
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
            raise ArgumentError("out: norm_linear cannot write into out= when gradients are required")
        from .linear import _check_out

        out = _check_out(out, x, w.size(0))
        check_no_overlap(out, "out", {"x": x, "weight": w, "bias": bias, "col_sum": col_sum})
        if x.dtype != torch.float32:
            out.copy_(_forward_native(kind, x, w.detach(), bias, eps, col_sum, medium)[0])
            return out
        n_rows = x.numel() // x.size(-1)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device) if kind == LAYER else None
        _C.norm_linear(kind, x, w.detach(), bias, eps, col_sum, out, mean, rstd, stream_of(x), medium)
        return out
    return NormLinearFunction.apply(kind, x, w, bias, eps, col_sum, medium)
