"""Cross-entropy losses with the gradient made in the same visit of the logits (native row kernel, CPU and
CUDA: cpp/ops/cross_entropy.cpp, cuda/cross_entropy.cu), and the LM-head form that never holds the
[tokens, vocab] logits at all.

For a row z of V logits, target t, label smoothing s (torch.nn.functional.cross_entropy's definition):
    loss   = logsumexp(z) - (1 - s) z_t - (s / V) sum_j z_j
    d loss / d z_j = softmax(z)_j - s / V - (1 - s) [j == t]
Rows whose target is ignore_index add nothing (reduction="mean" divides by the rows that are not ignored).

linear_cross_entropy(x, weight, target) is cross_entropy(x @ weight.T + bias, target) computed a chunk of
rows at a time: each chunk's logits are made by one GEMM into a reused float32 buffer, the kernel turns them
into their gradient in place, and two more GEMMs fold that into dx and dweight at once (as Liger-Kernel's
fused linear cross-entropy). Peak memory is one chunk of logits (a few MB) instead of the [tokens, vocab]
logits, their float32 copy for the loss, and their gradient (for GPT-2's vocabulary, 0.6 MB a token each).
The gradients are made during the forward (reductions "mean" / "sum": backward only scales them by the
incoming gradient); with reduction="none" the forward computes losses only and the backward redoes the
chunks with each row's incoming gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ._library import _is_compiling, native_op, placeholder
from ._tensor import stream_of

_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ELEMS = 6 << 20  # logits per chunk: 24 MB of float32 (under glibc's 32 MB fresh-pages threshold)


def _ce_fake(logits, target, ignore_index, label_smoothing, row_scale, scale, want_grad):
    n = logits.size(0)
    return (logits.new_empty(n), logits.new_empty(n),
            torch.empty_like(logits) if want_grad else placeholder(logits))


@native_op("cross_entropy", _ce_fake)
def _ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
        row_scale: Optional[torch.Tensor], scale: float,
        want_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], lse [N], grad [N, V] or empty) of float32 / float64 logits [N, V], int64 target [N]."""
    loss, lse, grad = _ce_fake(logits, target, ignore_index, label_smoothing, row_scale, scale, want_grad)
    _C.cross_entropy(logits, target, ignore_index, label_smoothing, loss, lse, grad if want_grad else None,
                     row_scale, scale, stream_of(logits))
    return loss, lse, grad


def _rows(z, t, ignore_index, s, loss, want_grad, row_scale=None, scale=1.0):
    """loss[:] = the rows' losses; with want_grad, z becomes its own gradient (times scale * row_scale)."""
    if _is_compiling is not None and _is_compiling():
        lo, _, g = _ce(z, t, ignore_index, s, row_scale, scale, want_grad)
        loss.copy_(lo)
        if want_grad:
            z.copy_(g)
        return
    _C.cross_entropy(z, t, ignore_index, s, loss, None, z if want_grad else None, row_scale, scale, stream_of(z))


# ---------------------------------------------------------------------------------------- arguments
def _check_options(ignore_index, reduction, label_smoothing):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ArgumentError(f"ignore_index: expected an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ArgumentError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def _check_target(target, lead_shape, device, V, ignore_index, name="target"):
    if not isinstance(target, torch.Tensor):
        raise DTypeError(f"{name}: expected an integer torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise DTypeError(f"{name}: expected an integer tensor of class indices, got {target.dtype}")
    if target.device != device:
        raise DeviceError(f"{name} is on {target.device}, the logits on {device}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ShapeError(f"{name}: expected shape {tuple(lead_shape)} (the logits' leading dims), "
                         f"got {tuple(target.shape)}")
    t = target.reshape(-1).to(torch.int64).contiguous()
    if t.is_cuda:  # (the CPU kernel checks as it goes; the CUDA one cannot raise)
        bad = ((t < 0) | (t >= V)) & (t != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ArgumentError(f"{name}[{i}] = {int(t[i])}: outside [0, {V}) and not ignore_index ({ignore_index})")
    return t


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(loss_rows, n_valid, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / n_valid if reduction == "mean" else total


# ---------------------------------------------------------------------------------------- cross_entropy
class CrossEntropyFunction(torch.autograd.Function):
    """Loss of logits [N, V]; the gradient is made in the forward's visit of the logits (one float32
    [N, V] buffer, the only copy kept for backward: torch keeps its log-softmax output instead)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing):
        acc = _acc(logits.dtype)
        want = logits.requires_grad
        z = logits.to(acc)
        # the gradient overwrites z: never the caller's logits
        z = z.clone(memory_format=torch.contiguous_format) if want and z is logits else z.contiguous()
        loss = torch.empty(z.size(0), dtype=acc, device=z.device)
        _rows(z, target, ignore_index, label_smoothing, loss, want)
        n_valid = (target != ignore_index).sum().to(acc)
        ctx.reduction, ctx.dtype = reduction, logits.dtype
        ctx.save_for_backward(z if want else None, n_valid)
        return _reduce(loss, n_valid, reduction).to(logits.dtype)

    @staticmethod
    def backward(ctx, go):
        g, n_valid = ctx.saved_tensors
        if ctx.reduction == "none":
            g = g * go.to(g.dtype)[:, None]
        elif ctx.reduction == "mean":
            g = g * (go.to(g.dtype) / n_valid)
        else:
            g = g * go.to(g.dtype)
        return g.to(ctx.dtype), None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy for class-index targets: logits [..., V] (float32 / bfloat16 /
    float16 / float64; 16-bit logits are read as float32), target [...] of class indices (int).
    Differentiable in the logits."""
    s = _check_options(ignore_index, reduction, label_smoothing)
    if not isinstance(logits, torch.Tensor):
        raise DTypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise DTypeError(f"logits: expected a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1 or logits.size(-1) < 1:
        raise ShapeError(f"logits: expected [..., vocab] with vocab >= 1, got {tuple(logits.shape)}")
    V = logits.size(-1)
    t = _check_target(target, logits.shape[:-1], logits.device, V, ignore_index)
    out = CrossEntropyFunction.apply(logits.reshape(-1, V), t, ignore_index, reduction, s)
    return out.reshape(logits.shape[:-1]) if reduction == "none" else out


# ---------------------------------------------------------------------------------------- linear_cross_entropy
def _chunks(x, W, b, t, ignore_index, s, chunk, loss, grads, scale=1.0, row_scale=None):
    """loss[r] for every row; with grads = (dx or None, dW or None, db or None), the gradients (times scale,
    and row_scale[r] per row) accumulated into them, a chunk of rows at a time."""
    N, acc = x.size(0), loss.dtype
    dx, dW, db = grads
    want = dx is not None or dW is not None or db is not None
    buf = torch.empty(min(chunk, N), W.size(0), dtype=acc, device=x.device)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        xc, z = x[c0:c1], buf[: c1 - c0]
        if x.dtype == acc:
            torch.matmul(xc, W.t(), out=z)
        else:
            z.copy_(xc @ W.t())
        if b is not None:
            z += b
        _rows(z, t[c0:c1], ignore_index, s, loss[c0:c1], want, None if row_scale is None else row_scale[c0:c1],
              scale)
        if not want:
            continue
        g = z if W.dtype == acc else z.to(W.dtype)
        if dx is not None:
            torch.matmul(g, W, out=dx[c0:c1])
        if dW is not None:
            dW.addmm_(g.t(), xc)
        if db is not None:
            db += z.sum(0)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """x [N, H], W [V, H], bias [V] or None, t [N] int64: the loss of x W^T + bias, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, W, bias, t, ignore_index, reduction, s, chunk):
        acc = _acc(x.dtype)
        b = None if bias is None else bias.to(acc)
        n_valid = (t != ignore_index).sum().to(acc)
        loss = torch.empty(x.size(0), dtype=acc, device=x.device)
        need = ctx.needs_input_grad[:3]
        ctx.reduction, ctx.opts = reduction, (ignore_index, s, chunk)
        ctx.bias_dtype = None if bias is None else bias.dtype
        if reduction == "none" or not any(need):  # losses only; a "none" backward redoes the chunks
            _chunks(x, W, b, t, ignore_index, s, chunk, loss, (None, None, None))
            ctx.save_for_backward(x, W, b, t)
            return _reduce(loss, n_valid, reduction).to(x.dtype)
        # the loss's own scale folded into the gradients now: backward multiplies by the incoming one only
        scale = 1.0 if reduction == "sum" else 1.0 / max(float(n_valid), 1.0)
        grads = _grad_buffers(x, W, need, acc)
        _chunks(x, W, b, t, ignore_index, s, chunk, loss, grads, scale)
        ctx.save_for_backward(*grads)
        return _reduce(loss, n_valid, reduction).to(x.dtype)

    @staticmethod
    def backward(ctx, go):
        if ctx.reduction == "none":
            x, W, b, t = ctx.saved_tensors
            ignore_index, s, chunk = ctx.opts
            acc = _acc(x.dtype)
            grads = _grad_buffers(x, W, ctx.needs_input_grad[:3], acc)
            loss = torch.empty(x.size(0), dtype=acc, device=x.device)
            _chunks(x, W, b, t, ignore_index, s, chunk, loss, grads, 1.0, go.to(acc).contiguous())
            dx, dW, db = grads
        else:
            # scaled copies, never the saved tensors themselves: autograd may take a returned tensor as .grad and
            # add later gradients into it, which a retained graph's next backward would then read
            dx, dW, db = (None if g is None else g * go.to(g.dtype) for g in ctx.saved_tensors)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dW, db, None, None, None, None, None


def _grad_buffers(x, W, need, acc):
    """(dx, dW, db) to accumulate into, None where no gradient is wanted: dW in W's dtype (as Liger-Kernel),
    db in the logits' dtype."""
    return (torch.empty_like(x) if need[0] else None, torch.zeros_like(W) if need[1] else None,
            torch.zeros(W.size(0), dtype=acc, device=x.device) if need[2] else None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
                         *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(x @ weight.T + bias, target) without materializing the logits: x [..., H], weight [V, H]
    (an LM head), bias [V] or None, target [...] class indices. x and weight share a dtype (float32,
    bfloat16, float16 or float64); logits and their gradient are float32 (float64 for float64 x), in chunks
    of chunk_size rows (default: about 24 MB of logits). Differentiable in x, weight and bias."""
    s = _check_options(ignore_index, reduction, label_smoothing)
    for name, v in (("x", x), ("weight", weight)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise DTypeError(f"{name}: expected a floating-point torch.Tensor, got "
                             f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}")
    if weight.dim() != 2:
        raise ShapeError(f"weight: expected [vocab, hidden], got {tuple(weight.shape)}")
    V, H = weight.shape
    if x.dim() < 1 or x.size(-1) != H:
        raise ShapeError(f"x: expected [..., {H}] (weight is [{V}, {H}]), got {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise DTypeError(f"weight: expected x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise DeviceError(f"weight is on {weight.device}, x on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise DTypeError("bias: expected a floating-point torch.Tensor or None")
        if tuple(bias.shape) != (V,):
            raise ShapeError(f"bias: expected [{V}], got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise DeviceError(f"bias is on {bias.device}, x on {x.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ArgumentError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if V < 1:
        raise ShapeError("weight: the vocabulary dimension is empty")
    t = _check_target(target, x.shape[:-1], x.device, V, ignore_index)
    chunk = chunk_size or max(1, _CHUNK_ELEMS // V)
    out = LinearCrossEntropyFunction.apply(x.reshape(-1, H), weight, bias, t, ignore_index, reduction, s, chunk)
    return out.reshape(x.shape[:-1]) if reduction == "none" else out
