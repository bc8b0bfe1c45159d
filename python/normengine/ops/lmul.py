"""L-Mul, additive multiplication (Luo & Sun 2024, "Addition is All You Need for Energy-efficient
Language Models"): every product of fp32 values done as one integer addition of their bit patterns.

For operands with mantissas truncated (not rounded) to m = mantissa_bits bits:
    L-Mul(x, y) = (1 + x_m + y_m + 2^-l(m)) * 2^(x_e + y_e),  sign = XOR of the signs,
    l(m) = m for m <= 3, 3 for m = 4, 4 for m > 4,
computed as bits(x) + bits(y) - ((127 << 23) - 2^(23 - l)) on the sign-stripped truncated patterns, so a
mantissa carry spills into the exponent (the field sum s = x_m + y_m + 2^-l gives 2^(e + floor(s))
(1 + s - floor(s)), the paper's bit-level behaviour; equal to the formula when s < 1). Special values: a zero or subnormal operand gives a signed zero; a NaN operand gives
NaN; Inf times a normal number gives Inf (XOR sign), Inf times zero gives NaN (IEEE); exponent underflow
flushes to zero, overflow saturates to Inf. Definition and kernels: cpp/ops/lmul.h, lmul.cpp, cuda/lmul.cu.

Ops (CPU and CUDA tensors; float32, bfloat16, float16, also float64 for testing; the values are converted
to float32 before the L-Mul and the result is returned in the input dtype):
    lmul(a, b)                 elementwise, broadcasting
    lmul_matmul(a, b)          a [..., M, K] @ b [K, N], every product an L-Mul, float32 sums in k order
    lmul_attention(q, k, v)    [B, T, H, D] softmax attention, QK^T and PV products L-Mul, softmax exact
All three are differentiable with a straight-through backward: the gradient is that of the exact op
(exact products), not of the piecewise-constant L-Mul forward.
"""

from __future__ import annotations

import math

import torch

from .. import _C
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ._library import native_op
from ._tensor import check_dense, empty, empty_like, stream_of, torch_empty

__all__ = ["lmul", "lmul_matmul", "lmul_attention", "multiply_energy"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise DTypeError(f"{name}: expected float32, bfloat16 or float16 (float64 accepted), got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise DeviceError(f"{name}: unsupported device {t.device}; normengine runs on CPU and CUDA")
    check_dense(t, name)
    return t


def _check_bits(mantissa_bits) -> int:
    if isinstance(mantissa_bits, bool) or not isinstance(mantissa_bits, int) or not 1 <= mantissa_bits <= 23:
        raise ArgumentError(f"mantissa_bits: expected an int in 1..23, got {mantissa_bits!r}")
    return mantissa_bits


def _same_device(a: torch.Tensor, b: torch.Tensor, an: str, bn: str) -> None:
    if a.device != b.device:
        raise DeviceError(f"{bn} is on {b.device} but {an} is on {a.device}; move them to one device")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_neg().to(torch.float32).contiguous()


def _out_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


# ------------------------------------------------------------------------------------------ raw
@native_op("lmul_elementwise", lambda a, b, bits: torch.empty_like(a))
def _lmul_native(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """L-Mul products of two float32 tensors of one shape."""
    out = empty_like(a)
    if out.numel():
        _C.lmul_elementwise(a, b, out, bits, stream_of(out))
    return out


def _lmul_raw(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    a32, b32 = (_f32(t) for t in torch.broadcast_tensors(a, b))
    return _lmul_native(a32, b32, bits)


def _bmm_fake(x, w, bits, w_kn, new=torch_empty):
    return new((x.shape[0], x.shape[1], w.shape[2] if w_kn else w.shape[1]), torch.float32, x.device)


@native_op("lmul_bmm", _bmm_fake)
def _bmm_native(x: torch.Tensor, w: torch.Tensor, bits: int, w_kn: bool) -> torch.Tensor:
    out = _bmm_fake(x, w, bits, w_kn, new=empty)
    if out.numel():
        _C.lmul_bmm(x, w, out, bits, stream_of(out), w_kn)
    return out


def _bmm_raw(x: torch.Tensor, w: torch.Tensor, bits: int, w_kn: bool = False) -> torch.Tensor:
    """x [B, M, K], w [B, N, K] (w_kn, CPU only: [B, K, N]) -> [B, M, N] float32, products L-Mul, sums in
    k order; the two layouts give the same bits."""
    return _bmm_native(_f32(x), _f32(w), bits, w_kn)


# ------------------------------------------------------------------------------------------ lmul
def _lmul_grads(a, b, g):
    """Straight-through gradients of a * b (exact products), reduced to the operands' shapes."""
    def red(t, shape):
        while t.dim() > len(shape):
            t = t.sum(0)
        for i, s in enumerate(shape):
            if s == 1 and t.shape[i] != 1:
                t = t.sum(i, keepdim=True)
        return t
    return red(g * b, a.shape).to(a.dtype), red(g * a, b.shape).to(b.dtype)


class LMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bits):
        ctx.save_for_backward(a, b)
        return _lmul_raw(a, b, bits).to(_out_dtype(a, b))

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga, gb = _lmul_grads(a, b, g)
        return ga, gb, None


def lmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 4) -> torch.Tensor:
    """Elementwise L-Mul product of a and b (broadcasting), in the promoted input dtype.
    Backward: straight-through, the gradient of the exact product a * b."""
    _check_tensor(a, "a"), _check_tensor(b, "b")
    _same_device(a, b, "a", "b")
    bits = _check_bits(mantissa_bits)
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ShapeError(f"b: shape {tuple(b.shape)} does not broadcast with a's {tuple(a.shape)}") from None
    return LMulFunction.apply(a, b, bits)


# ------------------------------------------------------------------------------------------ matmul
def _matmul_grads(a, b, g):
    """Straight-through gradients of a @ b (exact products): g @ b^T, sum over batch of a^T @ g."""
    ga = g @ b.t().to(g.dtype)
    gb = (a.reshape(-1, a.shape[-1]).t().to(g.dtype) @ g.reshape(-1, g.shape[-1]))
    return ga.to(a.dtype), gb.to(b.dtype)


class LMulMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bits):
        ctx.save_for_backward(a, b)
        K = a.shape[-1]
        lead = a.shape[:-1]
        x = a.reshape(1, math.prod(lead), K)
        if b.is_cuda or b.t().is_contiguous():
            y = _bmm_raw(x, b.t().unsqueeze(0), bits)[0]  # [N, K] rows (a copy of b's transpose on a GPU)
        else:
            # b [K, N] read in place (a transposed copy of a 4096 x 4096 b cost 100 ms a call, 60x the GEMV)
            y = _bmm_raw(x, b.unsqueeze(0), bits, w_kn=True)[0]
        return y.reshape(*lead, b.shape[1]).to(_out_dtype(a, b))

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga, gb = _matmul_grads(a, b, g)
        return ga, gb, None


def lmul_matmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 4) -> torch.Tensor:
    """a [..., M, K] @ b [K, N] (like torch.matmul, any leading dims on a) with every product an L-Mul
    and float32 accumulation in k order. Backward: straight-through (gradient of the exact a @ b)."""
    _check_tensor(a, "a"), _check_tensor(b, "b")
    _same_device(a, b, "a", "b")
    bits = _check_bits(mantissa_bits)
    if a.dim() < 1:
        raise ShapeError("a: expected at least 1 dimension [..., K]")
    if b.dim() != 2:
        raise ShapeError(f"b: expected a 2-D tensor [K, N], got shape {tuple(b.shape)}")
    if a.shape[-1] != b.shape[0]:
        raise ShapeError(f"b: expected {a.shape[-1]} rows (a's last dimension), got {b.shape[0]}")
    return LMulMatmulFunction.apply(a, b, bits)


# ------------------------------------------------------------------------------------------ attention
def _attention_exact(q, k, v, causal, scale):
    """The exact op the straight-through backward differentiates ([B, T, H, D] layout)."""
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if causal:
        T, S = q.shape[1], k.shape[1]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v)


class LMulAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, bits, scale):
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.scale = causal, scale
        B, T, H, D = q.shape
        S, Dv = k.shape[1], v.shape[3]
        qh = q.permute(0, 2, 1, 3).reshape(B * H, T, D)
        kh = k.permute(0, 2, 1, 3).reshape(B * H, S, D)
        vt = v.permute(0, 2, 3, 1).reshape(B * H, Dv, S)       # [BH, Dv, S]: rows are v's columns
        s = _bmm_raw(qh, kh, bits) * scale                      # q.k sums of L-Mul products, scale exact
        if causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)                            # exact, float32
        o = _bmm_raw(p, vt, bits)                               # p.v sums of L-Mul products
        return o.reshape(B, H, T, Dv).permute(0, 2, 1, 3).to(q.dtype)

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = _attention_exact(qq, kk, vv, ctx.causal, ctx.scale)
            gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), g.to(o.dtype))
        return gq, gk, gv, None, None, None


def lmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, mantissa_bits: int = 4,
                   scale: float | None = None) -> torch.Tensor:
    """Softmax attention, [B, T, H, D] layout (k, v: [B, S, H, D]), where both the QK^T and the PV
    products are L-Mul (float32 sums), the scale (default D^-1/2) is applied exactly to the sums and the
    softmax is exact. causal: query t sees keys up to t + S - T (bottom-right aligned, as in a KV cache).
    Backward: straight-through, the gradient of the exact attention."""
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, n)
        if t.dim() != 4:
            raise ShapeError(f"{n}: expected 4 dimensions [B, T, H, D], got shape {tuple(t.shape)}")
    _same_device(q, k, "q", "k"), _same_device(q, v, "q", "v")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise DTypeError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ShapeError(f"k: expected [{B}, S, {H}, {D}], got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"v: expected [{B}, {k.shape[1]}, {H}, Dv], got {tuple(v.shape)}")
    if causal and k.shape[1] < T:
        raise ShapeError(f"k: causal attention needs at least T = {T} keys, got {k.shape[1]}")
    bits = _check_bits(mantissa_bits)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ArgumentError(f"scale: expected a finite float or None, got {scale!r}")
    return LMulAttentionFunction.apply(q, k, v, bool(causal), bits, float(scale))


# ------------------------------------------------------------------------------------------ energy
# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm, per operation
# (pJ); the L-Mul paper (Luo & Sun 2024, Table 1) reproduces these figures and costs an L-Mul as one
# integer addition of the operand width.
_HOROWITZ_PJ = {
    "fp32_mult": 3.7, "fp32_add": 0.9, "fp16_mult": 1.1, "fp16_add": 0.4,
    "int32_add": 0.1, "int16_add": 0.05, "int8_add": 0.03, "int8_mult": 0.2,
}
_SOURCE = ("M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014, 45 nm "
           "(fp32 mult 3.7 pJ, fp32 add 0.9, fp16 mult 1.1, fp16 add 0.4, int32 add 0.1, int16 add 0.05, "
           "int8 add 0.03, int8 mult 0.2), as tabulated in Luo & Sun 2024, 'Addition is All You Need for "
           "Energy-efficient Language Models', Table 1, which costs one L-Mul as one integer addition")
_BASELINES = {"fp32": ("fp32_mult", 3.7), "bf16": ("fp16_mult", 1.1), "fp16": ("fp16_mult", 1.1),
              "fp8": ("int8_mult", 0.2)}


def multiply_energy(n_mults: int, mantissa_bits: int, baseline: str = "fp32") -> dict:
    """Estimated energy of n_mults multiplications as `baseline` float multiplies ('fp32', 'bf16', 'fp16'
    or 'fp8') against the same count done as L-Mul integer additions.

    An L-Mul of an operand with `mantissa_bits` mantissa bits adds the exponent and mantissa fields: an
    adder of (exponent bits + mantissa_bits) bits, where the exponent has 8 bits (fp32/bf16), 5 (fp16) or
    4 (fp8 e4m3); its energy is the published integer-add figure of the next width up (8, 16 or 32 bits).
    Figures (pJ, 45 nm): Horowitz, ISSCC 2014, as reproduced in the L-Mul paper's Table 1 (see
    `source` in the result). bf16 uses the fp16 multiply figure, fp8 the int8 multiply figure: there is
    no published 45 nm bf16 / fp8 multiplier figure in that table, so those two baselines are proxies.
    Accumulation (the adds of a dot product) is the same in both and is not counted."""
    if isinstance(n_mults, bool) or not isinstance(n_mults, int) or n_mults < 0:
        raise ArgumentError(f"n_mults: expected a non-negative int, got {n_mults!r}")
    bits = _check_bits(mantissa_bits)
    if baseline not in _BASELINES:
        raise ArgumentError(f"baseline: expected one of {', '.join(_BASELINES)}, got {baseline!r}")
    op, mult_pj = _BASELINES[baseline]
    exp_bits = {"fp32": 8, "bf16": 8, "fp16": 5, "fp8": 4}[baseline]
    width = exp_bits + bits
    add_op = "int8_add" if width <= 8 else "int16_add" if width <= 16 else "int32_add"
    add_pj = _HOROWITZ_PJ[add_op]
    base_j = n_mults * mult_pj * 1e-12
    lmul_j = n_mults * add_pj * 1e-12
    return {
        "n_mults": n_mults,
        "baseline": baseline,
        "baseline_op": op,
        "baseline_pj_per_mult": mult_pj,
        "lmul_adder_bits": width,
        "lmul_op": add_op,
        "lmul_pj_per_mult": add_pj,
        "baseline_joules": base_j,
        "lmul_joules": lmul_j,
        "saving_fraction": 1.0 - add_pj / mult_pj,
        "source": _SOURCE,
    }
