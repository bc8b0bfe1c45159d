"""Loss modules over normengine.ops: drop-ins for torch.nn.CrossEntropyLoss, and the LM-head form that takes
hidden states and the head's weight instead of logits."""

from __future__ import annotations

import torch

from .. import ops


class CrossEntropyLoss(torch.nn.Module):
    """torch.nn.CrossEntropyLoss for class-index targets (ops.cross_entropy: loss and gradient in one pass)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing

    def forward(self, logits, target):
        return ops.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction,
                                 label_smoothing=self.label_smoothing)

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class LinearCrossEntropyLoss(CrossEntropyLoss):
    """loss(hidden, weight, target[, bias]) = cross_entropy(hidden @ weight.T + bias, target) without the logits
    (ops.linear_cross_entropy): pass the LM head's weight, e.g. loss_fn(h, model.lm_head.weight, labels)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 chunk_size: int | None = None):
        super().__init__(ignore_index, reduction, label_smoothing)
        self.chunk_size = chunk_size

    def forward(self, hidden, weight, target, bias=None):
        return ops.linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing,
                                        chunk_size=self.chunk_size)
