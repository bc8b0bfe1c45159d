"""Reference normalizations: the formulas, in plain torch, in the input's dtype."""

import torch


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, statistics over the last dim."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x, weight=None, eps=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * weight."""
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def crms_norm(x, weight=None, eps=1e-6):
    """CRMSNorm: x holds the first d-1 coordinates of a zero-mean d-vector (the last is -sum(x)):
    y = x / sqrt((sum x^2 + (sum x)^2) / d + eps) * weight."""
    d = x.size(-1) + 1
    s = x.sum(-1, keepdim=True)
    y = x / torch.sqrt(((x * x).sum(-1, keepdim=True) + s * s) / d + eps)
    return y * weight if weight is not None else y


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    h = x + residual
    return layer_norm(h, weight, bias, eps), h


def add_rms_norm(x, residual, weight=None, eps=1e-6):
    h = x + residual
    return rms_norm(h, weight, eps), h


def unified_norm_eval(x, weight, bias, running_var, eps=1e-5):
    """Unified Normalization at inference: a fixed per-channel affine,
    y = weight * x / sqrt(running_var + eps) + bias."""
    y = x / torch.sqrt(running_var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def norm_linear(x, weight, bias=None, norm="rms", eps=None):
    """Unfused: y = norm(x) @ weight.T + bias, norm without gain (folded into weight)."""
    if norm in ("layer", "layernorm"):
        n = layer_norm(x, eps=1e-5 if eps is None else eps)
    elif norm in ("crms", "crmsnorm"):
        n = crms_norm(x, eps=1e-6 if eps is None else eps)
    else:
        n = rms_norm(x, eps=1e-6 if eps is None else eps)
    y = n @ weight.t().to(n.dtype)
    return y + bias if bias is not None else y
