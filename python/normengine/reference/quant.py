"""Reference quantized linear layer: the formulas of cpp/ops/quant_gemm.h in plain torch.

quantized_linear(x, qw, bias) applies each format's activation handling (int8 W8A8: per-row
symmetric int8 with round-to-nearest-even; fp8: per-row, per-128-channel E4M3 rounding; weight-only
formats: none) and multiplies by the dequantized weight, in `dtype` (float64 by default)."""

from __future__ import annotations

import torch


def quantize_activations_int8(x: torch.Tensor):
    """(q, s): s = max|x_m| / 127 per row, q = round(x / s) in [-127, 127] (0 where s = 0)."""
    x64 = x.to(torch.float64)
    s = x64.abs().amax(-1, keepdim=True).to(torch.float32).to(torch.float64) / 127.0
    s32 = s.to(torch.float32).to(torch.float64)  # the kernel's float32 scale
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32)).to(torch.float32).to(torch.float64)
    q = torch.round((x.to(torch.float32) * inv.to(torch.float32)).to(torch.float64)).clamp(-127, 127)
    return q, s32


def quantize_activations_fp8(x: torch.Tensor, block: int = 128):
    """(xq, s): per row and `block`-channel block, s = amax / 448 (float32), xq = e4m3(x / s)."""
    M, K = x.shape
    x32 = x.to(torch.float32)
    nb = -(-K // block)
    xq = torch.zeros(M, K, dtype=torch.float64, device=x.device)
    s = torch.zeros(M, nb, dtype=torch.float64, device=x.device)
    for b in range(nb):
        xb = x32[:, b * block:(b + 1) * block]
        sb = xb.abs().amax(-1) / 448.0
        safe = torch.where(sb > 0, sb, torch.ones_like(sb))
        v = torch.where(sb[:, None] > 0, (xb / safe[:, None]).to(torch.float8_e4m3fn).to(torch.float64),
                        torch.zeros_like(xb, dtype=torch.float64))
        xq[:, b * block:(b + 1) * block] = v
        s[:, b] = sb.to(torch.float64)
    return xq, s


def linear_int8_activations(x: torch.Tensor, qw, bias=None, dtype=torch.float64) -> torch.Tensor:
    """An int4 or int8-weight weight against x rounded to int8 per 32 columns: matmul_precision
    "medium" at decode on a CPU with AVX-512 VNNI (cpp/ops/quant_int8_x86.cpp, W4A8 / W8A8). Per row and block of
    32 columns s_x = max|x| / 127 (float32), x_q = round(x * float32(1 / s_x)) (half to even); y = sum_k s_g q_k
    s_x x_q,k - sum_g f_g gsum_g, with q the codes (nibbles, or int8), s_g the group's float32 scale (per row
    for int8-weight without groups), f_g the rest of the weight's values per group (w = s_g q - f_g) and gsum the
    exact sums of x over each group."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    M, K = x2.shape
    N = qw.shape[0]
    g = qw.group_size or K
    xb = x2.view(M, K // 32, 32)
    sx = xb.abs().amax(-1, keepdim=True) / 127.0  # float32
    inv = torch.where(sx > 0, 1.0 / sx, torch.zeros_like(sx))
    xq = torch.round(xb * inv).clamp(-127, 127).to(torch.float64) * sx.to(torch.float64)
    if qw.format == "int4":
        q = torch.stack([qw.data & 15, qw.data >> 4], -1).reshape(N, K).to(torch.float64)
    else:
        q = qw.data.to(torch.float64)
    w = qw.dequantize(torch.float64).view(N, K // g, g)
    qg = q.view(N, K // g, g)
    s = _group_scale(qw).to(torch.float64).view(N, K // g)
    f = (s[..., None] * qg - w)[..., 0]  # (per group: w = s q - f)
    gsum = x2.to(torch.float64).view(M, K // g, g).sum(-1)
    y = xq.reshape(M, K) @ (s[..., None] * qg).reshape(N, K).t() - gsum @ f.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(dtype).reshape(*x.shape[:-1], N)


def _group_scale(qw) -> torch.Tensor:
    """float32 [N, K/group] ([N] per row): the scale of each group (two-level: d sc, as the kernels form it)."""
    if qw.sub is not None:
        return qw._group_values(qw.scale, qw.sub)
    return qw.scale.to(torch.float32)


def quantized_linear(x: torch.Tensor, qw, bias=None, dtype=torch.float64) -> torch.Tensor:
    """x [M, K] @ dequant(qw)^T (+ bias) with the format's activation quantization."""
    x2 = x.reshape(-1, x.shape[-1])
    w = qw.dequantize(torch.float64)
    if qw.format == "int8":
        q, s = quantize_activations_int8(x2)
        y = (q @ qw.data.to(torch.float64).t()) * s * qw.scale.to(torch.float64)[None, :]
    elif qw.format == "fp8":
        xq, s = quantize_activations_fp8(x2)
        N, K = qw.shape
        wv = qw.data.view(torch.float8_e4m3fn).to(torch.float64)
        y = torch.zeros(x2.shape[0], N, dtype=torch.float64, device=x.device)
        for b in range(s.shape[1]):
            part = xq[:, b * 128:(b + 1) * 128] @ wv[:, b * 128:(b + 1) * 128].t()
            sw = qw.scale.to(torch.float64)[0] if qw.group_size == 0 else \
                qw.scale.to(torch.float64)[:, b].repeat_interleave(128)[:N]
            y = y + s[:, b:b + 1] * sw * part
    else:
        y = x2.to(torch.float64) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(dtype).reshape(*x.shape[:-1], qw.shape[0])
