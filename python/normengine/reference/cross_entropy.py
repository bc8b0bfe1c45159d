"""Cross-entropy as its formula (float64-safe): the references of normengine.ops.cross_entropy and
linear_cross_entropy. Class-index targets; rows whose target is ignore_index add nothing."""

import torch


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """loss = logsumexp(z) - (1 - s) z_t - (s / V) sum_j z_j per row; "mean" divides by the kept rows."""
    V = logits.size(-1)
    z = logits.reshape(-1, V)
    t = target.reshape(-1)
    keep = t != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, torch.where(keep, t, torch.zeros_like(t))[:, None])[:, 0]
    s = label_smoothing
    loss = torch.where(keep, lse - (1 - s) * zt - (s / V) * z.sum(-1), torch.zeros_like(lse))
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss.sum() / keep.sum() if reduction == "mean" else loss.sum()


def linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """cross_entropy(x @ weight^T + bias, target)."""
    z = x @ weight.t()
    if bias is not None:
        z = z + bias
    return cross_entropy(z, target, ignore_index, reduction, label_smoothing)
