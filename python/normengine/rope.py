"""RoPE frequencies: plain, and the context-extension variants checkpoints declare (`rope_scaling`).

Rotary embeddings rotate each pair (x_i, x_{i + D/2}) of a query / key head by the angle
pos * inv_freq_i, i < D/2. The plain frequencies are inv_freq_i = theta^(-2i / D). The variants only
change those D/2 numbers (and, for YaRN, scale cos and sin), so the runners take them as a table
(ModelSpec.rope_inv_freq, rope_attn_factor) and never need to know the variant:

- "linear" (position interpolation, Chen et al. 2023): inv_freq_i / factor, i.e. positions divided by
  `factor`.
- "llama3" (Llama 3.1+): with wavelength w_i = 2 pi / inv_freq_i and the pretraining context L
  (`original_max_position_embeddings`), frequencies with w_i < L / high_freq_factor are kept, those with
  w_i > L / low_freq_factor are divided by `factor`, and the ones between are blended:
  s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor),
  inv'_i = (1 - s) inv_freq_i / factor + s inv_freq_i.
- "yarn" (Peng et al. 2023, "YaRN"): a ramp over the pair index between the dimensions that turn
  beta_fast and beta_slow times over L, d(r) = D ln(L / (2 pi r)) / (2 ln theta) (floored / ceiled unless
  truncate is false, clipped to [0, D - 1]); gamma_i = clamp((i - lo) / (hi - lo), 0, 1);
  inv'_i = inv_freq_i / factor * gamma_i + inv_freq_i * (1 - gamma_i). cos and sin are multiplied by the
  attention factor: `attention_factor`, or mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
  both are given, else mscale(factor) with mscale(s, m) = 0.1 m ln(s) + 1 (1 for s <= 1).
- "factors" (llama.cpp's `rope_freqs` tensor, how GGUF files store Llama 3.1's scaling): one divisor per
  frequency, inv'_i = inv_freq_i / factors[i].

All of it in float32 as Hugging Face transformers computes it (modeling_rope_utils), so logits agree
with its models to float32 rounding. NumPy only: the torch-free load path uses it too. "dynamic"
(NTK scaling that changes with the sequence length, so cached keys would be rotated by other
frequencies than new ones) and "longrope" (two tables switched by length) are not implemented.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ArgumentError

ROPE_TYPES = ("linear", "llama3", "yarn", "factors")
# each type's fields: required, optional
_FIELDS = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "factors": ({"factors"}, set()),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_scaling(rs, where: str = "config.rope_scaling") -> None:
    """ArgumentError naming the field unless `rs` is None or a valid normalized scaling record:
    {"rope_type": one of ROPE_TYPES, <its fields>} with positive finite numbers (truncate a bool)."""
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ArgumentError(f"{where}: expected null or an object, got {rs!r}")
    kind = rs.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ArgumentError(f"{where}.rope_type: expected one of {ROPE_TYPES}, got {kind!r}")
    need, opt = _FIELDS[kind]
    missing = need - set(rs)
    if missing:
        raise ArgumentError(f"{where}: rope_type {kind!r} needs {sorted(missing)}")
    extra = set(rs) - need - opt - {"rope_type"}
    if extra:
        raise ArgumentError(f"{where}: unknown fields for rope_type {kind!r}: {sorted(extra)}")
    for k, v in rs.items():
        if k == "rope_type" or v is None:
            if k in need and v is None:
                raise ArgumentError(f"{where}.{k}: expected a positive number, got None")
            continue
        if k == "factors":
            if not (isinstance(v, (list, tuple)) and v and all(_number(x) and x > 0 for x in v)):
                raise ArgumentError(f"{where}.factors: expected a list of positive finite numbers")
        elif k == "truncate":
            if not isinstance(v, bool):
                raise ArgumentError(f"{where}.truncate: expected true or false, got {v!r}")
        elif not (_number(v) and v > 0):
            raise ArgumentError(f"{where}.{k}: expected a positive finite number, got {v!r}")
    if kind == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise ArgumentError(f"{where}: high_freq_factor ({rs['high_freq_factor']}) must exceed low_freq_factor "
                            f"({rs['low_freq_factor']})")


def _plain(theta: float, head_dim: int) -> np.ndarray:
    """theta^(-2i / D) in float32, as transformers: 1 / theta ** (arange(0, D, 2).float() / D)."""
    e = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), e)).astype(np.float32)


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def inv_freq(theta: float, head_dim: int, scaling: dict | None = None) -> np.ndarray:
    """float32 [head_dim // 2]: the frequencies of RoPE with base `theta` under `scaling` (None: plain)."""
    inv = _plain(theta, head_dim)
    if scaling is None:
        return inv
    kind = scaling["rope_type"]
    if kind == "factors":
        fs = np.asarray(scaling["factors"], dtype=np.float32)
        if fs.shape != inv.shape:
            raise ArgumentError(f"rope_scaling.factors: {fs.shape[0]} factors for {inv.shape[0]} frequencies "
                                f"(head_dim {head_dim})")
        return (inv / fs).astype(np.float32)
    f = np.float32(scaling["factor"])
    if kind == "linear":
        return (inv / f).astype(np.float32)
    if kind == "llama3":
        L = float(scaling["original_max_position_embeddings"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
        scaled = np.where(wavelen > np.float32(L / lo), inv / f, inv).astype(np.float32)
        s = ((np.float32(L) / wavelen - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
        smooth = ((np.float32(1) - s) * scaled / f + s * scaled).astype(np.float32)
        medium = ~(wavelen < np.float32(L / hi)) & ~(wavelen > np.float32(L / lo))
        return np.where(medium, smooth, scaled).astype(np.float32)
    # yarn
    L = float(scaling["original_max_position_embeddings"])
    fast = scaling.get("beta_fast") or 32
    slow = scaling.get("beta_slow") or 1

    def dim_of(rotations):  # the (fractional) pair-dimension turning `rotations` times over L
        return head_dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    keep = (np.float32(1) - ramp).astype(np.float32)  # weight of the unscaled (extrapolated) frequency
    pos_freqs = np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    interp = (np.float32(1) / (f * pos_freqs)).astype(np.float32)
    extrap = (np.float32(1) / pos_freqs).astype(np.float32)
    return (interp * (np.float32(1) - keep) + extrap * keep).astype(np.float32)


def attention_factor(scaling: dict | None) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor, 1 for every other type."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    f, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(_yarn_mscale(f, m) / _yarn_mscale(f, m_all))
    return float(_yarn_mscale(f))


def describe(theta: float, scaling: dict | None, rotary_dim: int = 0, head_dim: int = 0,
             local_theta: float | None = None) -> str:
    """One line for Model.info: 'rope (theta=500000)', 'rope (theta=500000, llama3 x8)', with '16 of 64
    dims' for partial rotary and 'local theta=10000' for Gemma 3's sliding-window layers."""
    parts = [f"theta={theta:g}"]
    if scaling is not None and scaling["rope_type"] == "factors":
        parts.append(f"per-frequency factors {min(scaling['factors']):g}-{max(scaling['factors']):g}")
    elif scaling is not None:
        parts.append(f"{scaling['rope_type']} x{scaling['factor']:g}")
    if rotary_dim:
        parts.append(f"{rotary_dim} of {head_dim} dims")
    if local_theta is not None:
        parts.append(f"local theta={local_theta:g}")
    return f"rope ({', '.join(parts)})"


__all__ = ["ROPE_TYPES", "attention_factor", "check_scaling", "describe", "inv_freq"]
