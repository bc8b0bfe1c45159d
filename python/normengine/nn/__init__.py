"""normengine.nn: torch.nn modules over normengine.ops."""

from .fold import fold_norms
from .hf_patch import patch_hf
from .norm import CRMSNorm, LayerNorm, RMSNorm
from .linear_attention import LinearAttention, MALAAttention, NormAttention
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .quant import QuantLinear
from .unified_norm import UnifiedNorm

__all__ = ["LayerNorm", "RMSNorm", "CRMSNorm", "UnifiedNorm", "fold_norms", "QuantLinear", "LinearAttention",
           "MALAAttention", "NormAttention", "patch_hf", "CrossEntropyLoss", "LinearCrossEntropyLoss"]
