"""Pure-torch references of the L-Mul ops (normengine.ops.lmul), written as the bit-level definition
(cpp/ops/lmul.h) on int64 copies of the fp32 bit patterns; the sums in float64."""

from __future__ import annotations

import math

import torch

_ABS, _SIGN, _INF, _QNAN, _MIN = 0x7FFFFFFF, 0x80000000, 0x7F800000, 0x7FC00000, 0x00800000


def _l(m: int) -> int:
    return m if m <= 3 else (3 if m == 4 else 4)


def lmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 4) -> torch.Tensor:
    """L-Mul product of the float32 values of a and b (broadcast), as float32:
    t(x) = (NaN ? 0x7fc00000 : bits(x)) & trunc;  A, B = |t|;  u = A + B;  r = u - C,
    C = (127 << 23) - 2^(23 - l(m)); underflow (u < C + 2^23) -> 0, r >= 0x7f800000 -> Inf;
    zero/subnormal operand -> 0, Inf operand -> Inf (with zero: NaN), NaN -> NaN; sign = XOR."""
    m = mantissa_bits
    trunc = (0xFFFFFFFF << (23 - m)) & 0xFFFFFFFF
    C = (127 << 23) - (1 << (23 - _l(m)))
    a, b = torch.broadcast_tensors(a.to(torch.float32), b.to(torch.float32))

    def prep(x):
        u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        u = torch.where((u & _ABS) > _INF, torch.full_like(u, _QNAN), u)
        return u & trunc

    ta, tb = prep(a), prep(b)
    A, B = ta & _ABS, tb & _ABS
    s = (ta ^ tb) & _SIGN
    u = A + B
    r = u - C
    res = torch.where(r >= _INF, torch.full_like(r, _INF), r)
    res = torch.where(u < C + _MIN, torch.zeros_like(r), res)
    zop = (A < _MIN) | (B < _MIN)
    iop = (A == _INF) | (B == _INF)
    res = torch.where(zop, torch.zeros_like(res), res)
    res = torch.where(iop, torch.full_like(res, _INF), res)
    res = res | s
    nan = (A > _INF) | (B > _INF) | (iop & zop)
    res = torch.where(nan, torch.full_like(res, _QNAN), res)
    res = torch.where(res >= 2**31, res - 2**32, res)  # back to int32 range
    return res.to(torch.int32).view(torch.float32)


def lmul_matmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 4) -> torch.Tensor:
    """a [..., M, K] @ b [K, N] with every product the L-Mul product, summed in float64."""
    p = lmul(a.unsqueeze(-1), b, mantissa_bits).to(torch.float64)  # [..., M, K, N]
    return p.sum(-2)


def lmul_attention(q, k, v, causal: bool = True, mantissa_bits: int = 4, scale: float | None = None):
    """[B, T, H, D] softmax attention with L-Mul q.k and p.v products, float64 sums and softmax."""
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qk = lmul(q.permute(0, 2, 1, 3).unsqueeze(-2), k.permute(0, 2, 1, 3).unsqueeze(-3), mantissa_bits)
    s = qk.to(torch.float64).sum(-1) * scale                           # [B, H, T, S]
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).to(torch.float32)
    pv = lmul(p.unsqueeze(-1), v.permute(0, 2, 1, 3).unsqueeze(-3), mantissa_bits)  # [B, H, T, S, Dv]
    return pv.to(torch.float64).sum(-2).permute(0, 2, 1, 3)
