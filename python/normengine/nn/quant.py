"""QuantLinear: a linear layer that computes with a quantized copy of a full-precision master weight.

Forward: the master weight is quantized (normengine.ops.quantize_weight; cached until the weight
changes) and the layer runs normengine.ops.quantized_linear, so training sees exactly the inference
numerics. Backward (straight-through estimator): quantization is treated as the identity, so
  dW = dy^T x,  db = sum dy,  dx = dy dequant(W)
and the gradients flow to the full-precision master weight (quantization-aware fine-tuning)."""

from __future__ import annotations

import torch

from ..ops.quant import FORMATS, quantize_weight, quantized_linear


class _QuantLinearSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, qw):
        ctx.save_for_backward(x, weight)
        ctx.qw = qw
        ctx.has_bias = bias is not None
        y = quantized_linear(x, qw, bias)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        d2 = dy.reshape(-1, dy.size(-1))
        if ctx.needs_input_grad[0]:
            dx = (dy.to(torch.float32) @ ctx.qw.dequantize(torch.float32)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (d2.t().to(torch.float32) @ x.reshape(-1, x.size(-1)).to(torch.float32)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = d2.sum(0)
        return dx, dw, db, None


class QuantLinear(torch.nn.Module):
    """torch.nn.Linear's parameters (weight [out, in], bias [out]) run through a quantized GEMM.
    format: "int8" | "int8-weight" | "int4" | "fp8"; group_size / symmetric as quantize_weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str = "int8",
                 group_size: int | None = None, symmetric: bool = True, device=None, dtype=None):
        super().__init__()
        if format not in FORMATS:
            from ..errors import ArgumentError

            raise ArgumentError(f"format: expected one of {FORMATS}, got {format!r}")
        lin = torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight, self.bias = lin.weight, lin.bias
        self.in_features, self.out_features = in_features, out_features
        self.format, self.group_size, self.symmetric = format, group_size, symmetric
        self._cache = None  # (weight version, data_ptr, QuantizedWeight)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, format: str = "int8", group_size: int | None = None,
                    symmetric: bool = True) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, format, group_size, symmetric,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def quantized(self):
        """The packed weight of the current master weight (re-quantized only after it changed)."""
        key = (self.weight._version, self.weight.data_ptr())
        if self._cache is None or self._cache[0] != key:
            kw = {"group_size": self.group_size}
            if self.format == "int4":
                kw["symmetric"] = self.symmetric
            self._cache = (key, quantize_weight(self.weight.detach(), self.format, **kw))
        return self._cache[1]

    def forward(self, x):
        return _QuantLinearSTE.apply(x, self.weight, self.bias, self.quantized())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"
