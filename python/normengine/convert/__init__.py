"""Pure conversions of a loaded model: (config, canonical state dict) -> (config, state dict),
each recorded in config.conversions (and so in a saved checkpoint's metadata)."""

from .norms import convert_norm, fold_norm_affine, layernorm_to_rmsnorm, rmsnorm_to_crmsnorm
from .quant import pack_quantized, quantize_model, smooth_model, swap_attention, unpack_quantized

__all__ = ["convert_norm", "fold_norm_affine", "layernorm_to_rmsnorm", "rmsnorm_to_crmsnorm", "quantize_model",
           "smooth_model", "pack_quantized", "unpack_quantized", "swap_attention"]
