"""Dense linear layer over the native kernel: y = x @ weight.T + bias (torch.nn.functional.linear).

Forward only (no autograd). x is float32 [..., in_features]; weight [out_features, in_features] in
float32, bfloat16 or float16 (16-bit weights are widened to float32 inside the kernel, never copied);
bias [out_features] (any float dtype, used as float32). Accumulation is in float32. CPU only for now:
CUDA tensors raise UnsupportedError."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from ..errors import DeviceError, DTypeError, ShapeError
from ._library import native_op
from ._tensor import FLOAT_DTYPES, _rows_ok, bf16_products, check_dense, check_input, check_no_overlap, empty, stream_of, torch_empty

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight(weight, x: torch.Tensor, dtypes=WEIGHT_DTYPES) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise DTypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.device != x.device:
        raise DeviceError(f"weight is on {weight.device} but x is on {x.device}; move them to one device")
    if weight.dtype not in dtypes:
        raise DTypeError(f"weight: expected one of {', '.join(str(d).replace('torch.', '') for d in dtypes)}, "
                         f"got {weight.dtype}")
    check_dense(weight, "weight")
    if weight.dim() != 2:
        raise ShapeError(
            f"weight: expected a 2-D tensor [out_features, in_features], got shape {tuple(weight.shape)}"
        )
    if weight.size(1) != x.size(-1):
        raise ShapeError(
            f"x: last dimension {x.size(-1)} does not match weight's in_features {weight.size(1)} "
            f"(weight shape {tuple(weight.shape)})"
        )
    # the kernel reads rows with unit stride along in_features, any row stride (a negated view resolved)
    weight = weight.resolve_neg()
    return weight if _rows_ok(weight) else weight.contiguous()


def _check_bias(bias, x: torch.Tensor, n: int):
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise DTypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.device != x.device:
        raise DeviceError(f"bias is on {bias.device} but x is on {x.device}; move them to one device")
    if bias.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"bias: expected a floating-point tensor, got {bias.dtype}")
    check_dense(bias, "bias")
    if bias.dim() != 1 or bias.size(0) != n:
        raise ShapeError(f"bias: expected shape ({n},) to match weight's out_features, got {tuple(bias.shape)}")
    return bias.detach().resolve_neg().to(torch.float32).contiguous()


def _check_out(out, x: torch.Tensor, n: int) -> torch.Tensor:
    want = tuple(x.shape[:-1]) + (n,)
    if not isinstance(out, torch.Tensor):
        raise DTypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if out.device != x.device:
        raise DeviceError(f"out is on {out.device} but x is on {x.device}; move them to one device")
    if out.dtype != torch.float32:
        raise DTypeError(f"out: expected dtype torch.float32, got {out.dtype}")
    if tuple(out.shape) != want:
        raise ShapeError(f"out: expected shape {want}, got {tuple(out.shape)}")
    if not _rows_ok(out):
        raise ShapeError("out: must be contiguous in its last dimension with collapsible rows")
    return out


def _linear_fake(x, weight, bias, medium, new=torch_empty):
    return new(tuple(x.shape[:-1]) + (weight.size(0),), torch.float32, x.device)


@native_op("linear", _linear_fake)
def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], medium: bool) -> torch.Tensor:
    y = _linear_fake(x, weight, bias, medium, new=empty)
    _C.linear(x, weight, bias, y, stream_of(x), medium)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, out=None,
           matmul_precision: str = "highest") -> torch.Tensor:
    """y[..., n] = sum_k x[..., k] * weight[n, k] + bias[n], as torch.nn.functional.linear.

    x: float32, or bfloat16 / float16 (e.g. under torch.autocast), widened to float32 for the kernel
    (sums in fp32) with y returned in x's dtype. ``out=`` writes y into a caller's float32 buffer of
    shape x.shape[:-1] + (out_features,). ``matmul_precision="medium"`` (as
    torch.set_float32_matmul_precision) lets a CPU with AMX-BF16 or AVX512-BF16 round x and a float32 weight to
    bfloat16 for the products (sums in fp32) when x has 16 or more rows; elsewhere it computes as
    "highest". CUDA tensors: fp32 FMA GEMMs (cuda/gemm.cu: a GEMV up to 16 rows, tiled kernels above);
    "medium" with a bfloat16 weight and more than 16 rows takes the tensor cores (x rounded to bf16,
    fp32 sums: mma.sync, sm_80+)."""
    medium = bf16_products(matmul_precision)
    x = check_input(x)
    if x.dtype in (torch.bfloat16, torch.float16):
        y = linear(x.float(), weight, bias, out=out, matmul_precision=matmul_precision)
        return y if out is not None else y.to(x.dtype)
    if x.dtype != torch.float32:
        raise DTypeError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    weight = _check_weight(weight, x)
    n = weight.size(0)
    bias = _check_bias(bias, x, n)
    if out is None:
        return _native_linear(x, weight, bias, medium)
    y = _check_out(out, x, n)
    check_no_overlap(y, "out", {"x": x, "weight": weight, "bias": bias})
    _C.linear(x, weight, bias, y, stream_of(x), medium)
    return y
