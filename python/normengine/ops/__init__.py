"""normengine.ops: functional ops over the native kernels, differentiable where noted, on CPU and
CUDA tensors alike (the input's device picks the kernel)."""

from .activation import GatedActivationFunction, gated_activation, geglu, swiglu
from .rotary import RotaryFunction, apply_rotary_pos_emb, rotary_embedding
from .channel import channel_affine, channel_dot, channel_lincomb, channel_sumsq
from .cross_entropy import CrossEntropyFunction, LinearCrossEntropyFunction, cross_entropy, linear_cross_entropy
from .linear import linear
from .lmul import lmul, lmul_attention, lmul_matmul, multiply_energy
from .norm_linear import NormLinearFunction, norm_linear
from .quant import QuantizedWeight, quantize_weight, quantized_linear
from .linear_attention import linear_attention, mala_attention, norm_attention
from .norm import (
    AddNormFunction,
    NormFunction,
    add_layer_norm,
    add_rms_norm,
    crms_norm,
    layer_norm,
    rms_norm,
)

__all__ = [
    "layer_norm",
    "rms_norm",
    "crms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "NormFunction",
    "AddNormFunction",
    "channel_sumsq",
    "channel_dot",
    "channel_affine",
    "channel_lincomb",
    "linear",
    "swiglu",
    "rotary_embedding",
    "apply_rotary_pos_emb",
    "RotaryFunction",
    "geglu",
    "gated_activation",
    "GatedActivationFunction",
    "cross_entropy",
    "linear_cross_entropy",
    "CrossEntropyFunction",
    "LinearCrossEntropyFunction",
    "norm_linear",
    "NormLinearFunction",
    "linear_attention",
    "mala_attention",
    "norm_attention",
    "QuantizedWeight",
    "quantize_weight",
    "quantized_linear",
    "lmul",
    "lmul_matmul",
    "lmul_attention",
    "multiply_energy",
]
