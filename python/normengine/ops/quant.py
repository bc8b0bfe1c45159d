"""Quantized linear layers: quantize_weight packs a [N, K] weight (int8, int4, fp8), and
quantized_linear runs y = x @ dequant(W)^T (+ bias) with the native quantized GEMMs
(cpp/ops/quant_gemm.h) on the CPU. Formats (layouts: quant_gemm.h, and `QuantizedWeight`):

    "int8"         W8A8: int8 weights per output channel (symmetric, s = max|w_n| / 127); the
                   activations are quantized per token on the fly (s = max|x_m| / 127, round to
                   nearest even), int32 dot products, both scales and the bias in the epilogue.
    "int8-weight"  int8 weights as above, fp32 activations.
    "int4"         4-bit weights in groups of `group_size` (32, 64, 128) along K, two per byte (low
                   nibble first), symmetric (mid-rise: q in 0..15 stands for (q - 7.5) s, levels +-0.5 s ...
                   +-7.5 s; s = c max|w_g| / 7.5 with the clipping c in {1, 0.975, ..., 0.8} of
                   least squared error: the optimal uniform 16-level quantizer's shape) or
                   asymmetric (s = (max - min) / 15, zero point round(-min / s)); fp32 activations.
    "fp8"          E4M3 weights with one scale per tensor (group_size 0) or per 128 x 128 block (128);
                   activations rounded to E4M3 per token and 128-channel block (s = amax / 448), products
                   in fp32: an exact emulation of an fp8 GEMM.

Quantization itself is plain torch (any device). On CUDA tensors quantized_linear runs
cuda/quant_gemm.cu in CUDA builds (int8 IMMA and e4m3 mma.sync tiles, dp4a GEMV for decode; never
run on a GPU in the sessions so far), otherwise the same numbers composed from torch ops."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from ._library import native_op
from .._packed import FORMATS, QuantizedWeight
from ._tensor import bf16_products, check_no_overlap, empty, torch_empty

_CODE = {"int8": 0, "int8-weight": 1, "int4": 2, "fp8": 3}
_E4M3_MAX = 448.0
_INT4_CLIPS = tuple(1.0 - 0.025 * i for i in range(9))  # 1.0 down to 0.8
_INT4_ASYM_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)
# a later clipping candidate replaces the best only if its error is smaller by more than a relative
# 1e-12: errors that tie exactly pick the first candidate whatever the order of the sums (the native
# quantizer, cpp/ops/quantize_weight.cpp, adds in another order and makes the same choices)
_BETTER = 1.0 - 1e-12


def _check_format(format, group_size):
    if format not in FORMATS:
        raise ArgumentError(f"format: expected one of {FORMATS}, got {format!r}")
    if format == "int8":
        if group_size not in (None, 0):
            raise ArgumentError(f"group_size: int8 (W8A8) quantizes per output channel, got group_size={group_size}")
        return 0
    if format == "int8-weight":
        g = 0 if group_size is None else group_size
        if g not in (0, 16, 32, 64, 128):
            raise ArgumentError(f"group_size: int8-weight needs 0 (a scale per output row), 16, 32, 64 or 128 (a scale "
                                f"per group of columns), got {group_size!r}")
        return g
    if format == "int4":
        g = 128 if group_size is None else group_size
        if g not in (32, 64, 128):
            raise ArgumentError(f"group_size: int4 needs 32, 64 or 128, got {group_size!r}")
        return g
    g = 128 if group_size is None else group_size
    if g not in (0, 128):
        raise ArgumentError(f"group_size: fp8 needs 0 (one scale per tensor) or 128 (128 x 128 blocks), got {group_size!r}")
    return g


def _e4m3_bits(x: torch.Tensor) -> torch.Tensor:
    """E4M3 (fn) bit patterns of x (|x| <= 448), round to nearest even, as uint8."""
    return x.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)


def quantize_weight(w: torch.Tensor, format: str, group_size: int | None = None, symmetric: bool = True):
    """Pack a [N, K] float weight (torch.nn.Linear layout) as `format`; returns a QuantizedWeight.
    group_size: int4 group along K (32, 64, 128; default 128), fp8 scale block (128 default, 0 =
    per tensor). symmetric: int4 without zero points (False: with). The arithmetic is float64, a
    block of rows at a time (temporaries of about 8 MB whatever the weight's size)."""
    return _quantize_weight(w, format, group_size, symmetric)


def _quantize_weight(w, format, group_size=None, symmetric=True, done_with=None, native=None):
    """quantize_weight; done_with(rows) is called with each block of w's rows once it has been read
    for the last time (normengine.load releases a mapped checkpoint's pages block by block, so that a
    large weight is never resident whole). native (default: CPU weights in int8 / int8-weight / int4):
    the same arithmetic in C++ (_C.quantize_weight_rows, threaded); False: the torch code below, the
    reference (and the path for CUDA weights and fp8)."""
    if not isinstance(w, torch.Tensor):
        raise DTypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise DTypeError(f"w: expected a floating-point tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ShapeError(f"w: expected a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    g = _check_format(format, group_size)
    N, K = w.shape
    if g and format != "fp8" and K % g:
        raise ShapeError(f"w: in_features {K} is not a multiple of the {format} group size {g}")
    w = w.detach().resolve_neg()  # a negated view's memory holds -w
    # rows per block: ~1M elements, a multiple of 128 (fp8 blocks never straddle two row blocks)
    step = max(128, (1 << 20) // max(K, 1) // 128 * 128)
    blocks = [(r, min(N, r + step)) for r in range(0, N, step)]
    if native is None:
        native = (w.device.type == "cpu" and format in ("int8", "int8-weight", "int4")
                  and w.dtype in (torch.float32, torch.bfloat16, torch.float16))
    if native:
        from .. import _C

        int4 = format == "int4"
        data = torch.empty(N, K // 2 if int4 else K, dtype=torch.uint8 if int4 else torch.int8)
        s = torch.empty((N, K // g) if g else (N,), dtype=torch.float32)
        z = torch.empty(N, K // g, dtype=torch.float32) if int4 and not symmetric else None
        for r0, r1 in blocks:
            src = w[r0:r1] if w.stride(-1) == 1 else w[r0:r1].contiguous()
            if not _C.quantize_weight_rows(src, _CODE[format], g, bool(symmetric), data[r0:r1],
                                           s[r0:r1], None if z is None else z[r0:r1]):
                raise ArgumentError("w: holds NaN or Inf; a quantized weight needs finite values")
            if done_with is not None:
                done_with(w[r0:r1])
        return QuantizedWeight(format, (N, K), data, s, z, g)

    def rows(r0, r1, last=True):
        b = w[r0:r1].to(torch.float64)
        if not torch.isfinite(b).all():
            raise ArgumentError("w: holds NaN or Inf; a quantized weight needs finite values")
        if last and done_with is not None:
            done_with(w[r0:r1])
        return b

    if format in ("int8", "int8-weight"):
        # s = amax / 127 per row (grouped int8-weight: per group of g columns), q = round(w / s)
        gk = g or K
        q = torch.empty(N, K, dtype=torch.int8, device=w.device)
        s = torch.empty((N, K // g) if g else (N,), dtype=torch.float32, device=w.device)
        for r0, r1 in blocks:
            b = rows(r0, r1).view(r1 - r0, K // gk, gk)
            sb = b.abs().amax(-1) / 127.0
            safe = torch.where(sb > 0, sb, torch.ones_like(sb))
            q[r0:r1] = torch.round(b / safe[..., None]).clamp(-127, 127).to(torch.int8).view(r1 - r0, K)
            s[r0:r1] = sb.to(torch.float32).view(s[r0:r1].shape)
        return QuantizedWeight(format, (N, K), q, s, None, g)
    if format == "int4":
        packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
        s = torch.empty(N, K // g, dtype=torch.float32, device=w.device)
        z = None if symmetric else torch.empty(N, K // g, dtype=torch.float32, device=w.device)
        for r0, r1 in blocks:
            wg = rows(r0, r1).view(r1 - r0, K // g, g)
            if symmetric:
                # the scale that minimizes the group's squared error among amax / 7 times a few
                # clipping factors (clipping the largest weights a little shrinks every step)
                amax = wg.abs().amax(-1)
                best_err = best_s = None
                for clip in _INT4_CLIPS:
                    sc = amax * clip / 7.5
                    safe = torch.where(sc > 0, sc, 1.0)[..., None]
                    err = (((torch.floor(wg / safe).clamp(-8, 7) + 0.5) * safe - wg) ** 2).sum(-1)
                    if best_err is None:
                        best_err, best_s = err, sc
                    else:
                        better = err < best_err * _BETTER
                        best_err = torch.where(better, err, best_err)
                        best_s = torch.where(better, sc, best_s)
                sb = best_s
                # nearest level of (q - 7.5) s: q = floor(w / s) + 8, clamped to 0..15
                qb = torch.floor(wg / torch.where(sb > 0, sb, 1.0)[..., None]).clamp(-8, 7) + 8
            else:
                # w ~= (q - z) s over [lo, hi] = [a min, b max] of the group (min <= 0 <= max, so
                # zero is representable), z an integer zero point; of the clipping pairs (a, b) in
                # _INT4_ASYM_CLIPS^2 keep the one with the least squared error. Gaussian rows, g128:
                # 9.5% rms against 10.1% for the unclipped min / max range.
                lo, hi = wg.amin(-1).clamp(max=0.0), wg.amax(-1).clamp(min=0.0)
                best_err = best_s = best_z = None
                for a in _INT4_ASYM_CLIPS:
                    for b in _INT4_ASYM_CLIPS:
                        sc = (hi * b - lo * a) / 15.0
                        safe = torch.where(sc > 0, sc, 1.0)
                        zc = torch.round(-lo * a / safe).clamp(0, 15)
                        qc = (torch.round(wg / safe[..., None]) + zc[..., None]).clamp(0, 15)
                        err = (((qc - zc[..., None]) * safe[..., None] - wg) ** 2).sum(-1)
                        if best_err is None:
                            best_err, best_s, best_z = err, sc, zc
                        else:
                            better = err < best_err * _BETTER
                            best_err = torch.where(better, err, best_err)
                            best_s = torch.where(better, sc, best_s)
                            best_z = torch.where(better, zc, best_z)
                sb, zb = best_s, best_z
                safe = torch.where(sb > 0, sb, 1.0)
                qb = (torch.round(wg / safe[..., None]) + zb[..., None]).clamp(0, 15)
                z[r0:r1] = zb.to(torch.float32)
            qb = qb.reshape(r1 - r0, K).to(torch.uint8)
            packed[r0:r1] = qb[:, 0::2] | (qb[:, 1::2] << 4)
            s[r0:r1] = sb.to(torch.float32)
        return QuantizedWeight("int4", (N, K), packed, s, z, g)
    # fp8: scale so the (block's) largest magnitude maps to 448
    q = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    if g == 0:
        amax = max(float(rows(r0, r1, last=False).abs().max()) for r0, r1 in blocks)
        s = torch.tensor([amax / _E4M3_MAX if amax > 0 else 1.0], dtype=torch.float64, device=w.device)
        for r0, r1 in blocks:
            q[r0:r1] = _e4m3_bits(rows(r0, r1) / s)
        return QuantizedWeight("fp8", (N, K), q, s.to(torch.float32), None, 0)
    nb, kb = -(-N // 128), -(-K // 128)
    s = torch.empty(nb, kb, dtype=torch.float64, device=w.device)
    for r0, r1 in blocks:
        b = rows(r0, r1)
        n_rb = -(-(r1 - r0) // 128)
        pad = torch.zeros(n_rb * 128, kb * 128, dtype=torch.float64, device=w.device)
        pad[: r1 - r0, :K] = b.abs()
        sb = pad.view(n_rb, 128, kb, 128).amax((1, 3)) / _E4M3_MAX
        sb = torch.where(sb > 0, sb, torch.ones_like(sb))
        s[r0 // 128: r0 // 128 + n_rb] = sb
        full = sb.repeat_interleave(128, 0)[: r1 - r0].repeat_interleave(128, 1)[:, :K]
        q[r0:r1] = _e4m3_bits(b / full)
    return QuantizedWeight("fp8", (N, K), q, s.to(torch.float32), None, g)


def _emulated(x2: torch.Tensor, qw: QuantizedWeight, bias):
    """The native kernels' numbers composed of torch ops (any device): activation quantization as
    the format prescribes, then the product with the dequantized weight."""
    from ..reference.quant import quantized_linear as ref

    return ref(x2, qw, bias, dtype=torch.float32)


def _ql_fake(x2, fmt, data, scale, zero, group, N, bias, medium, sub, sub_zero, super_groups, new=torch_empty):
    return new((x2.shape[0], N), torch.float32, x2.device)


@native_op("quant_linear", _ql_fake)
def _native_quant_linear(x2: torch.Tensor, fmt: int, data: torch.Tensor, scale: torch.Tensor,
                         zero: Optional[torch.Tensor], group: int, N: int, bias: Optional[torch.Tensor],
                         medium: bool, sub: Optional[torch.Tensor], sub_zero: Optional[torch.Tensor],
                         super_groups: int) -> torch.Tensor:
    """y [M, N] float32 = x2 [M, K] (float32, contiguous) times the packed weight's transpose (+ bias), CPU."""
    y = _ql_fake(x2, fmt, data, scale, zero, group, N, bias, medium, sub, sub_zero, super_groups, new=empty)
    if x2.shape[0]:
        _C.quant_linear(x2, fmt, data, scale, zero, group, N, x2.shape[1], bias, y, False, medium,
                        sub=sub, sub_zero=sub_zero, super=super_groups)
    return y


def quantized_linear(x: torch.Tensor, qweight: QuantizedWeight, bias=None, *, out=None,
                     matmul_precision: str = "highest") -> torch.Tensor:
    """y = x @ dequant(qweight)^T (+ bias), x [..., K] float32 / bfloat16 / float16 (computed in
    float32); returns float32 [..., N]. Forward only (normengine.nn.QuantLinear trains through it with
    a straight-through estimator). matmul_precision="medium": on a CPU with AMX-BF16 or AVX512-BF16, the prefill
    (16 rows or more) of int8-weight / int4 / fp8 multiplies bf16-rounded dequantized weights and x
    (relative 2^-9, far below the formats' own error); int4 with fewer rows (on a CPU with AVX-512 VNNI or AVX2)
    and int8-weight with up to 3 (AVX-512 VNNI) multiply x rounded to int8 per 32 columns (normengine.reference.
    quant.linear_int8_activations; normengine._C.int8_decode_rows() says which apply); int8 (W8A8) is unchanged."""
    medium = bf16_products(matmul_precision)
    if not isinstance(qweight, QuantizedWeight):
        raise DTypeError(f"qweight: expected a QuantizedWeight (normengine.ops.quantize_weight), got "
                         f"{type(qweight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DTypeError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    N, K = qweight.shape
    if x.dim() == 0 or x.size(-1) != K:
        raise ShapeError(f"x: last dimension {x.size(-1) if x.dim() else None} does not match the weight's "
                         f"in_features {K} (weight shape {qweight.shape})")
    if x.device != qweight.device:
        raise DeviceError(f"x is on {x.device} but qweight is on {qweight.device}; move them to one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.numel() != N:
            raise ShapeError(f"bias: expected a tensor of shape ({N},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != x.device:
            raise DeviceError(f"bias is on {bias.device} but x is on {x.device}; move them to one device")
        bias = bias.detach().resolve_neg().to(torch.float32).contiguous()
    lead = x.shape[:-1]
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != tuple(lead) + (N,) \
                or not out.is_contiguous() or out.device != x.device:
            raise ShapeError(f"out: expected a contiguous float32 tensor of shape {tuple(lead) + (N,)} on {x.device}")
        check_no_overlap(out, "out", dict(qweight.tensors(), x=x, bias=bias))
    if x.device.type == "cuda" and hasattr(_C, "quant_linear_cuda"):
        # cuda/quant_gemm.cu: IMMA / e4m3 MMA tiles, dp4a GEMV for small M; x in its own dtype (two-level
        # scales expanded: the CUDA kernels read a scale per group)
        qweight = qweight.single_level()
        xc = x.detach().resolve_neg().reshape(-1, K)
        if xc.stride(-1) != 1 or (xc.shape[0] > 1 and xc.stride(0) < K):
            xc = xc.contiguous()
        y = out.view(-1, N) if out is not None else torch.empty(xc.shape[0], N, dtype=torch.float32,
                                                                  device=x.device)
        if xc.shape[0]:
            with torch.cuda.device(x.device):
                _C.quant_linear_cuda(xc, _CODE[qweight.format], qweight.data, qweight.scale, qweight.zero,
                                     qweight.group_size, N, K, bias, y,
                                     False, torch.cuda.current_stream(x.device).cuda_stream)
        return out if out is not None else y.view(*lead, N)
    x2 = x.detach().resolve_neg().reshape(-1, K).to(torch.float32).contiguous()
    if x.device.type != "cpu":
        y = _emulated(x2, qweight, bias)
        if out is not None:
            out.copy_(y.view(out.shape))
            return out
        return y.view(*lead, N)
    group = qweight.group_size
    if out is None:
        return _native_quant_linear(x2, _CODE[qweight.format], qweight.data, qweight.scale, qweight.zero, group, N,
                                    bias, medium, qweight.sub, qweight.sub_zero, qweight.super_groups).view(*lead, N)
    y = out.view(-1, N)
    if x2.shape[0]:
        _C.quant_linear(x2, _CODE[qweight.format], qweight.data, qweight.scale, qweight.zero, group, N, K, bias, y,
                        False, medium, sub=qweight.sub, sub_zero=qweight.sub_zero, super=qweight.super_groups)
    return out


__all__ = ["QuantizedWeight", "quantize_weight", "quantized_linear", "FORMATS"]
