"""normengine.nn: torch.nn modules over normengine.ops."""

from .norm import CRMSNorm, LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "CRMSNorm"]
