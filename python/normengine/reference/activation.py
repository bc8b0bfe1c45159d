"""The gated MLP activations as their formulas (float64-safe): references of normengine.ops.gated_activation."""

import math

import torch


def act(x, activation="silu"):
    if activation == "silu":
        return x * torch.sigmoid(x)
    if activation == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if activation == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if activation == "relu":
        return torch.relu(x)
    raise ValueError(activation)


def gated_activation(gate, up=None, activation="silu"):
    """act(gate) * up, or act(gate)."""
    y = act(gate, activation)
    return y if up is None else y * up
