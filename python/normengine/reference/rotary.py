"""Rotary position embedding as its formula (transformers' apply_rotary_pos_emb): the reference of
normengine.ops.rotary_embedding."""

import torch


def rotary_embedding(x, cos, sin):
    """x * cos + rotate_half(x) * sin over x's first cos.shape[-1] features, the rest unchanged."""
    R = cos.shape[-1]
    xr, rest = x[..., :R], x[..., R:]
    x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
    return torch.cat([xr * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)
