"""Fold normalizations into adjacent linear layers (Jiang et al. 2023; Yang et al. 2022).

A norm whose output is a fixed per-channel affine of its input, y = x * s + t (UnifiedNorm in eval
mode), disappears entirely into the linear layer it feeds, or the one feeding it:

    next:      W (x * s + t) + b      = (W diag(s)) x + (W t + b)
    previous:  (W x + b) * s + t      = (diag(s) W) x + (b * s + t)

LayerNorm and RMSNorm keep their per-token statistics; only their gain (and bias) fold, into the
next linear layer, leaving a norm with unit gain and zero bias."""

from __future__ import annotations

import torch

from .norm import LayerNorm, RMSNorm
from .unified_norm import UnifiedNorm

_STAT_NORMS = (LayerNorm, RMSNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)


@torch.no_grad()
def _fold_into_next(linear: torch.nn.Linear, scale: torch.Tensor, shift: torch.Tensor | None):
    w = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                          device=w.device)
    if shift is not None:
        b = b + w @ shift.double()
        if linear.bias is None:
            linear.bias = torch.nn.Parameter(torch.empty(w.shape[0], dtype=linear.weight.dtype, device=w.device))
        linear.bias.copy_(b)
    linear.weight.copy_(w * scale.double())


@torch.no_grad()
def _fold_into_previous(linear: torch.nn.Linear, scale: torch.Tensor, shift: torch.Tensor):
    w = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                          device=w.device)
    linear.weight.copy_(w * scale.double()[:, None])
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(torch.empty(w.shape[0], dtype=linear.weight.dtype, device=w.device))
    linear.bias.copy_(b * scale.double() + shift.double())


def fold_norms(module: torch.nn.Module) -> int:
    """Fold, in place, every norm of `module` that sits next to a Linear in an nn.Sequential:
    a UnifiedNorm (its eval-mode affine; the module must be in eval mode, as folding freezes the
    running statistic) is replaced by nn.Identity, folded into the next Linear or else the previous
    one; a LayerNorm / RMSNorm followed by a Linear has its gain and bias folded into that Linear.
    Returns the number of norms folded. Outputs in eval mode are unchanged."""
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, torch.nn.Sequential)]:
        mods = list(seq)
        for i, m in enumerate(mods):
            nxt = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], torch.nn.Linear) else None
            prv = mods[i - 1] if i > 0 and isinstance(mods[i - 1], torch.nn.Linear) else None
            if isinstance(m, UnifiedNorm):
                if m.training:
                    raise RuntimeError("fold_norms: put the model in eval mode first (UnifiedNorm folds its "
                                       "running statistic)")
                scale, shift = m.affine()
                if nxt is not None:
                    _fold_into_next(nxt, scale, shift)
                elif prv is not None:
                    _fold_into_previous(prv, scale, shift)
                else:
                    continue
                seq[i] = torch.nn.Identity()
                folded += 1
            elif isinstance(m, _STAT_NORMS) and nxt is not None and m.weight is not None and m.weight.dim() == 1:
                # (a norm over several trailing dims has a gain per position of all of them: it does
                # not fold into a linear layer over the last one, so it is left as it is)
                bias = getattr(m, "bias", None)
                _fold_into_next(nxt, m.weight.detach(), None if bias is None else bias.detach())
                with torch.no_grad():
                    m.weight.fill_(1.0)
                    if bias is not None:
                        bias.zero_()
                folded += 1
    return folded
