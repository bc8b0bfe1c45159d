"""Unified Normalization (Yang et al., "Unified Normalization for Accelerating and Stabilizing
Transformers", ACM MM 2022): a LayerNorm replacement whose statistic is fixed at inference, so that
the whole norm is one per-channel affine that folds into the adjacent linear layer.

Notation: x is [..., d]; "tokens" are all the rows of x (every leading index), N of them; all
statistics are per channel c (shape [d]).

Training (step t = number of training forwards done before this one, 0-based):

    var_b   = mean over tokens of x^2                       (second moment, no mean subtraction)
    buffer  = the last `window` batch statistics, var_b included (a ring buffer, slot t % window;
              only the min(t + 1, window) slots written so far count)
    geo     = exp(mean(log(buffer)))                        (geometric mean over the window axis)
    var     = var_b  if t < warmup_iters  else  geo
    y       = weight * x / sqrt(var + eps) + bias
    running_var <- momentum * running_var + (1 - momentum) * var

  Outlier filtration (outlier_filtration=True, t >= warmup_iters): with s = sqrt(statistics),
    the batch is an outlier when, in any channel,
        AM(buffer) - GM(buffer) > window * Var_w(s of the recorded window)
    where the recorded window is the buffer *before* var_b is written (the last `window` batches up
    to the previous one) and Var_w is the unbiased variance over the window axis. An outlier batch
    is normalized with its own var_b, its buffer slot gets the running statistic instead of var_b,
    and its backward is the exact one (r = 1, its own mean(g*z); ema_gz untouched).
    (The recorded window must exclude var_b: for any n values, AM - GM <= n * Var_pop(sqrt), so a
    variance that includes var_b could never be exceeded.) Caveat: with a per-channel variance from
    only `window` samples and "any channel", i.i.d. batches are flagged often (about 9% per channel
    per step before feedback; an outlier's slot then holds running_var, shrinking the next
    variance), so for d >= 8 nearly every step past warm-up is filtered.

  Backward (gradient compensation), with z = x / sqrt(var + eps):
    r  = clamp(sqrt(var + eps) / sqrt(running_var + eps), 1/5, 5)   (running_var before this
         step's update), and r = 1 while t < max(1000, warmup_iters)
    g  = r * weight * dy
    gz = mean over tokens of g * z                                   (per channel)
    ema_gz <- momentum * ema_gz + (1 - momentum) * gz                (every non-outlier step,
                                                                      warm-up included)
    c  = gz       while t < warmup_iters (or for an outlier batch): the exact gradient
       = ema_gz   (the value just updated) afterwards
    dx = (g - c * z) / sqrt(var + eps)
    dweight = sum(dy * z),  dbias = sum(dy)

  During warm-up r = 1 and c = gz, which is exactly d(y)/d(x) of the forward with var = var_b.

Evaluation: y = weight * x / sqrt(running_var + eps) + bias = x * scale + shift, see affine().

Everything over the tokens runs in the native per-channel kernels of normengine.ops (channel_sumsq,
channel_dot, channel_affine, channel_lincomb); the [d]-sized bookkeeping is plain torch, written
without host synchronisation (flags are 0-d tensors combined with torch.where), so a CUDA step never
waits for the GPU. Statistics buffers are float32, float64 when x is float64.
"""

from __future__ import annotations

import torch

from .. import ops
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ..ops._tensor import acc_dtype, check_eps, check_input

_R_MIN, _R_MAX = 1.0 / 5.0, 5.0
_R_FREE_STEPS = 1000  # r = 1 for the first max(_R_FREE_STEPS, warmup_iters) steps


def _int_arg(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ArgumentError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


class _UnifiedNormTrainFunction(torch.autograd.Function):
    """y = weight * x * inv_std + bias with UN's compensated backward (module docstring).

    inv_std = 1 / sqrt(var + eps), r, use_batch_gz and update_ema are computed by the module at
    forward time; ema_gz is the module's buffer, updated in place by backward (kept on ctx, not
    saved, because it is mutated)."""

    @staticmethod
    def forward(ctx, x, weight, bias, inv_std, r, use_batch_gz, update_ema, ema_gz, momentum):
        w = weight.detach().to(inv_std.dtype)
        y = ops.channel_affine(x, w * inv_std, bias.detach())
        ctx.save_for_backward(x, w, inv_std, r, use_batch_gz, update_ema)
        ctx.ema_gz = ema_gz
        ctx.momentum = momentum
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, inv_std, r, use_batch_gz, update_ema = ctx.saved_tensors
        m = ctx.momentum
        n_tokens = x.numel() // x.size(-1)
        sum_xdy, sum_dy = ops.channel_dot(x, dy)           # sum x*dy, sum dy (per channel)
        g_scale = r * w                                    # g = g_scale * dy
        gz = g_scale * inv_std * sum_xdy / n_tokens        # mean(g * z), z = x * inv_std
        ema = ctx.ema_gz
        with torch.no_grad():
            ema_new = m * ema + (1.0 - m) * gz
            ema.copy_(torch.where(update_ema, ema_new, ema))
        c = torch.where(use_batch_gz, gz, ema_new)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx = (g - c z) / sqrt(var + eps) = (g_scale * inv_std) dy + (-c * inv_std^2) x
            dx = ops.channel_lincomb(dy, g_scale * inv_std, x, -c * inv_std * inv_std)
        if ctx.needs_input_grad[1]:
            dw = (inv_std * sum_xdy).to(ctx.param_dtypes[0])  # sum(dy * z)
        if ctx.needs_input_grad[2]:
            db = sum_dy.to(ctx.param_dtypes[1])               # sum(dy)
        return dx, dw, db, None, None, None, None, None, None


class _UnifiedNormEvalFunction(torch.autograd.Function):
    """y = weight * x * inv_std + bias with fixed inv_std = 1 / sqrt(running_var + eps): a plain
    per-channel affine, differentiable w.r.t. x, weight and bias (e.g. fine-tuning in eval mode)."""

    @staticmethod
    def forward(ctx, x, weight, bias, inv_std):
        w = weight.detach().to(inv_std.dtype)
        y = ops.channel_affine(x, w * inv_std, bias.detach())
        ctx.save_for_backward(x, w, inv_std)
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, inv_std = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = ops.channel_affine(dy, w * inv_std)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            sum_xdy, sum_dy = ops.channel_dot(x, dy)
            dw = (inv_std * sum_xdy).to(ctx.param_dtypes[0]) if ctx.needs_input_grad[1] else None
            db = sum_dy.to(ctx.param_dtypes[1]) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class UnifiedNorm(torch.nn.Module):
    """Unified Normalization over the last dimension of x [..., d] (see the module docstring for
    the exact formulas).

    Args:
        d: number of channels (x's last dimension).
        window: number of recent batch statistics whose geometric mean normalizes a batch after
            warm-up (>= 1).
        warmup_iters: training steps normalized with the batch's own statistic, with the exact
            gradient (>= 0).
        momentum: EMA factor of running_var and of the gradient-compensation ema_gz, in [0, 1).
        outlier_filtration: skip the window for batches whose statistic is an outlier.
        eps: added to the statistic under the square root (>= 0).

    Parameters: weight (ones, [d]), bias (zeros, [d]). Buffers: running_var (ones, [d]),
    var_window ([window, d], the last `window` batch statistics; slot t % window), step (0-d int64,
    training forwards done), ema_gz (zeros, [d], EMA of mean(g * z)).

    In eval mode the module is the fixed affine y = x * scale + shift of affine()."""

    def __init__(self, d: int, window: int = 4, warmup_iters: int = 4000, momentum: float = 0.9,
                 outlier_filtration: bool = False, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.d = _int_arg("d", d, 1)
        self.window = _int_arg("window", window, 1)
        self.warmup_iters = _int_arg("warmup_iters", warmup_iters, 0)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ArgumentError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        if not isinstance(outlier_filtration, bool):
            raise ArgumentError(f"outlier_filtration: expected a bool, got {outlier_filtration!r}")
        self.outlier_filtration = outlier_filtration
        self.eps = check_eps(eps)
        if dtype is not None and not dtype.is_floating_point:
            raise DTypeError(f"dtype: expected a floating-point dtype, got {dtype}")

        self.weight = torch.nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        stats = acc_dtype(dtype if dtype is not None else torch.float32)
        self.register_buffer("running_var", torch.ones(d, device=device, dtype=stats))
        self.register_buffer("var_window", torch.ones(self.window, d, device=device, dtype=stats))
        self.register_buffer("step", torch.zeros((), device=device, dtype=torch.int64))
        self.register_buffer("ema_gz", torch.zeros(d, device=device, dtype=stats))

    def extra_repr(self):
        return (f"{self.d}, window={self.window}, warmup_iters={self.warmup_iters}, "
                f"momentum={self.momentum}, outlier_filtration={self.outlier_filtration}, eps={self.eps}")

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        """Back to the freshly constructed statistics (weight and bias are kept)."""
        self.running_var.fill_(1.0)
        self.var_window.fill_(1.0)
        self.step.zero_()
        self.ema_gz.zero_()

    @torch.no_grad()
    def affine(self):
        """(scale, shift) with eval output y = x * scale + shift per channel:
        scale = weight / sqrt(running_var + eps), shift = bias. Detached, in the statistics dtype
        (float32, or float64 for a float64 module) -- ready to fold into the next linear layer:
        W' = W * scale (columns), b' = b + W @ shift."""
        dt = torch.float64 if torch.float64 in (self.running_var.dtype, self.weight.dtype) else torch.float32
        scale = self.weight.to(dt) * torch.rsqrt(self.running_var.to(dt) + self.eps)
        shift = self.bias.to(dt).clone()
        return scale, shift

    # ---------------------------------------------------------------------------------------------

    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise DTypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        x = check_input(x)
        if x.size(-1) != self.d:
            raise ShapeError(f"x: expected last dimension {self.d}, got shape {tuple(x.shape)}")
        if x.device != self.running_var.device:
            raise DeviceError(f"x is on {x.device} but the UnifiedNorm module is on "
                              f"{self.running_var.device}; move them to one device")
        if x.device != self.weight.device:
            raise DeviceError(f"x is on {x.device} but UnifiedNorm.weight is on {self.weight.device}")
        return x

    def _stats_dtype(self, dtype: torch.dtype) -> None:
        """Keep the statistics buffers in x's accumulator dtype (float32; float64 for float64 x)."""
        acc = acc_dtype(dtype)
        for name in ("running_var", "var_window", "ema_gz"):
            buf = getattr(self, name)
            if buf.dtype != acc:
                setattr(self, name, buf.to(acc))

    @torch.no_grad()
    def _advance(self, var_b: torch.Tensor):
        """One training step of the statistics bookkeeping for a batch with statistic var_b.

        Returns (var, r, use_batch_gz, update_ema): the statistic that normalizes this batch, the
        backward's scale r, and two 0-d bool flags for the backward. Updates var_window,
        running_var and step in place. No host synchronisation: every decision is a tensor."""
        W, eps, m = self.window, self.eps, self.momentum
        t = self.step
        idx = torch.arange(W, device=var_b.device)
        slot = torch.remainder(t, W).reshape(1)
        recorded = self.var_window                         # the window before this batch
        n_recorded = torch.clamp(t, max=W)                 # slots holding a statistic already
        n_now = torch.clamp(t + 1, max=W)                  # ... once var_b is written
        window_now = recorded.index_copy(0, slot, var_b.unsqueeze(0))
        valid = (idx < n_now).unsqueeze(1)

        # Geometric mean over the filled part of the window: exp(mean(log(buffer))).
        geo = torch.exp(torch.where(valid, window_now.log(), 0.0).sum(0) / n_now)
        past_warmup = t >= self.warmup_iters

        if self.outlier_filtration:
            # AM - GM of the window with var_b vs window * Var(sqrt) of the recorded window.
            am = torch.where(valid, window_now, 0.0).sum(0) / n_now
            rec_valid = (idx < n_recorded).unsqueeze(1)
            s = recorded.sqrt()
            s_mean = torch.where(rec_valid, s, 0.0).sum(0) / n_recorded.clamp(min=1)
            s_var = torch.where(rec_valid, (s - s_mean) ** 2, 0.0).sum(0) / (n_recorded - 1).clamp(min=1)
            outlier = past_warmup & (n_recorded >= 2) & (am - geo > W * s_var).any()
        else:
            outlier = torch.zeros((), dtype=torch.bool, device=var_b.device)

        var = torch.where(past_warmup & ~outlier, geo, var_b)
        running_old = self.running_var.clone()
        self.var_window.index_copy_(0, slot, torch.where(outlier, running_old, var_b).unsqueeze(0))

        r = torch.clamp(torch.sqrt(var + eps) / torch.sqrt(running_old + eps), _R_MIN, _R_MAX)
        r_free = (t < max(_R_FREE_STEPS, self.warmup_iters)) | outlier
        r = torch.where(r_free, torch.ones_like(r), r)

        self.running_var.mul_(m).add_(var, alpha=1.0 - m)
        self.step.add_(1)
        return var, r, ~past_warmup | outlier, ~outlier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or self.bias.requires_grad)
        if not self.training:
            scale, shift = self.affine()
            if needs_grad:
                inv_std = torch.rsqrt(self.running_var.to(acc_dtype(x.dtype)) + self.eps)
                return _UnifiedNormEvalFunction.apply(x, self.weight, self.bias, inv_std)
            return ops.channel_affine(x, scale, shift)

        n_tokens = x.numel() // self.d
        if n_tokens == 0:
            raise ShapeError(f"x: training needs at least one token, got shape {tuple(x.shape)}")
        self._stats_dtype(x.dtype)
        var_b = ops.channel_sumsq(x) / n_tokens            # E[x^2] over the batch's tokens
        var, r, use_batch_gz, update_ema = self._advance(var_b)
        inv_std = torch.rsqrt(var + self.eps)
        if needs_grad:
            return _UnifiedNormTrainFunction.apply(x, self.weight, self.bias, inv_std, r, use_batch_gz,
                                                   update_ema, self.ema_gz, self.momentum)
        w = self.weight.detach().to(inv_std.dtype)
        return ops.channel_affine(x, w * inv_std, self.bias.detach())


__all__ = ["UnifiedNorm"]
