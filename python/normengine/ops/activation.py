"""Gated MLP activations as one native kernel each way (CPU and CUDA: cpp/ops/gated.cpp, cuda/activation.cu):

    swiglu(gate, up)       = silu(gate) * up                  (Llama, Mistral, Qwen)
    geglu(gate, up)        = gelu_tanh(gate) * up             (Gemma; approximate="none": erf gelu)
    gated_activation(gate, up=None, activation=...)           any of silu / gelu_tanh / gelu / relu, gated or not

Backward: d gate = dy * up * act'(gate), d up = dy * act(gate), with act(gate) recomputed from gate: the
autograd graph keeps gate and up (which the projections made anyway) and nothing else, where torch's
F.silu(gate) * up also keeps silu(gate), one more [tokens, d_ff] tensor per layer. Math in float32
(float64 for float64); 16-bit tensors are widened on load and rounded on store.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C
from ..errors import ArgumentError
from ._library import native_op, placeholder
from ._tensor import check_input, check_like, empty_like, stream_of

ACTIVATIONS = {"gelu_tanh": 0, "gelu": 1, "silu": 2, "relu": 3}


def _fwd_fake(kind, gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@native_op("gated_activation", _fwd_fake)
def _forward(kind: int, gate: torch.Tensor, up: Optional[torch.Tensor]) -> torch.Tensor:
    y = empty_like(gate)
    _C.gated_activation(kind, gate, up, y, stream_of(gate))
    return y


def _bwd_fake(kind, dy, gate, up, want_up):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if want_up else placeholder(gate))


@native_op("gated_activation_backward", _bwd_fake)
def _backward(kind: int, dy: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor],
              want_up: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    dg, du = empty_like(gate), empty_like(gate) if want_up else placeholder(gate)
    _C.gated_activation_backward(kind, dy, gate, up, dg, du if want_up else None, stream_of(gate))
    return dg, du


class GatedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind):
        ctx.kind = kind
        ctx.save_for_backward(gate, up)
        return _forward(kind, gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        want_up = up is not None and ctx.needs_input_grad[1]
        dg, du = _backward(ctx.kind, check_like(dy, gate, "grad_output", "gate"), gate, up, want_up)
        return dg, (du if want_up else None), None


def gated_activation(gate: torch.Tensor, up: torch.Tensor | None = None, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up (act(gate) without up), differentiable in both; activation: "silu", "gelu_tanh",
    "gelu" (erf) or "relu". gate and up: one float dtype, shape and device."""
    if activation not in ACTIVATIONS:
        raise ArgumentError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    gate = check_input(gate, "gate")
    if up is not None:
        up = check_like(up, gate, "up", "gate")
    return GatedActivationFunction.apply(gate, up, ACTIVATIONS[activation])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Llama-family MLPs), one kernel each way."""
    return gated_activation(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) * up (Gemma's MLP: approximate="tanh", as F.gelu's; "none": the erf form)."""
    if approximate not in ("tanh", "none"):
        raise ArgumentError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")
    return gated_activation(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
