"""Pure-torch references of every normengine op, written as the formula (float64-safe). The native
kernels, CUDA kernels and autograd Functions are all tested against these."""

from . import lmul  # L-Mul references as a submodule: lmul.lmul, lmul.lmul_matmul, lmul.lmul_attention
from .activation import gated_activation
from .cross_entropy import cross_entropy, linear_cross_entropy
from .linear import linear
from .rotary import rotary_embedding
from .norm import (
    add_layer_norm,
    add_rms_norm,
    crms_norm,
    layer_norm,
    norm_linear,
    rms_norm,
    unified_norm_eval,
)

__all__ = [
    "layer_norm",
    "rms_norm",
    "crms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "unified_norm_eval",
    "linear",
    "norm_linear",
    "cross_entropy",
    "linear_cross_entropy",
    "gated_activation",
    "rotary_embedding",
]
