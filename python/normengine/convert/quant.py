"""Quantize a loaded model's linear weights (a pure conversion, recorded in config.conversions).

quantize_model(cfg, sd, "int8" | "int8-weight" | "int4" | "fp8") replaces every linear weight of
the blocks and the head (and a tied embedding: the same object) by a packed
normengine.ops.QuantizedWeight; the native runner then runs each projection with that format's GEMM
(cpp/ops/quant_gemm.h). Norm gains should be folded first (normengine.load does: fold, then
quantize), so the quantized matrices are exactly the ones the GEMMs read.

Optional SmoothQuant-style smoothing (Xiao et al. 2023) for W8A8: with per-input-channel activation
maxima a_j of a norm's output (from calibration prompts) and weight maxima w_j over the readers of
that norm, s_j = a_j^alpha / w_j^(1 - alpha) moves quantization difficulty from the activations to
the weights: the norm's gain is divided by s (it becomes a per-channel gain again, so the norm is no
longer a bare normalization) and the readers' columns multiplied by s, which leaves the model's
function unchanged before quantization.
"""

from __future__ import annotations

import sys
import time
import weakref

import torch

from ..config import QUANT_FORMATS, ModelConfig, _dense_shapes, is_quantized_name, quant_of
from .._packed import is_quantized, record_packing
from ..errors import ArgumentError, ShapeError

DEFAULT_GROUP = {"int8": 0, "int8-weight": 0, "int4": 128, "fp8": 128}


class _Progress:
    """A one-line progress bar on stderr (only for models large enough to take a while)."""

    def __init__(self, what: str, total: int, enabled: bool):
        self.what, self.total, self.enabled, self.n, self.t0 = what, total, enabled, 0, time.time()

    def step(self, k: int = 1):
        self.n += k
        now = time.time()
        if self.enabled and (self.n >= self.total or now - getattr(self, "_last", 0.0) >= 0.25):
            self._last = now
            w = 30
            fill = int(w * self.n / max(self.total, 1))
            sys.stderr.write(f"\r{self.what} [{'#' * fill}{'.' * (w - fill)}] {self.n}/{self.total} "
                             f"{time.time() - self.t0:.1f}s")
            if self.n >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def quantize_model(cfg: ModelConfig, sd: dict, fmt: str, group_size: int | None = None, symmetric: bool = True,
                   progress: bool | None = None, consume: bool = False, release_shared: bool = False):
    """(cfg, sd) -> (cfg', sd') with the linear weights quantized as `fmt`.

    group_size: int4 group along in_features (32, 64 or 128; default 128), fp8 scale block (128, the
    default: 128 x 128 blocks; 0: one scale per tensor); int8 formats take none. symmetric: int4
    without zero points (False: asymmetric, with zero points). progress: a progress bar on stderr
    (default: when the model has more than 50M quantized weights). consume: replace each weight in
    `sd` itself as soon as it is packed (normengine.load: the full-precision copy is freed at once,
    and a weight mapped from a checkpoint file leaves memory block by block as it is read).
    release_shared (with consume): a weight other names keep (a tied embedding) also leaves memory
    block by block; the caller promises its mapped pages were never written, so that they are read
    back from the file when the embedding is next used."""
    q = Quantizer(cfg, fmt, group_size, symmetric, progress, consume, release_shared)
    return q.finish(cfg, sd, dict(sd))


class Quantizer:
    """quantize_model in steps, for a caller that quantizes weights as it produces them:
    weights(out, names, sd) packs those of `names` that are quantized linear weights, finish(cfg, sd,
    out) the rest and returns (cfg', out). normengine.load folds the norms one group of readers at a
    time and quantizes each group at once, so a model is never resident whole in full precision."""

    def __init__(self, cfg: ModelConfig, fmt: str, group_size=None, symmetric: bool = True, progress=None,
                 consume: bool = False, release_shared: bool = False):
        if fmt not in QUANT_FORMATS:
            raise ArgumentError(f"quant: expected one of {QUANT_FORMATS}, got {fmt!r}")
        if cfg.quantization is not None:
            raise ArgumentError(f"quant: the model is already quantized ({cfg.quantization}); load the "
                                "full-precision checkpoint to quantize it another way")
        if group_size is None:
            group_size = DEFAULT_GROUP[fmt]
        if fmt == "int8" and group_size not in (0, None):
            raise ArgumentError(f"group_size: int8 (W8A8) quantizes per output channel and takes no group size, "
                                f"got {group_size}")
        if fmt == "int8-weight" and group_size not in (0, 16, 32, 64, 128):
            raise ArgumentError(f"group_size: int8-weight needs 0 (a scale per output row), 16, 32, 64 or 128, "
                                f"got {group_size!r}")
        if fmt == "int4" and group_size not in (32, 64, 128):
            raise ArgumentError(f"group_size: int4 needs 32, 64 or 128, got {group_size!r}")
        if fmt == "fp8" and group_size not in (0, 128):
            raise ArgumentError(f"group_size: fp8 needs 0 (one scale per tensor) or 128 (128 x 128 blocks), got {group_size!r}")
        self.fmt, self.group_size, self.consume, self.release_shared = fmt, group_size, consume, release_shared
        self.symmetric = bool(symmetric) if fmt == "int4" else True
        probe = ModelConfig.from_dict(cfg.to_dict())
        probe.quantization = fmt
        shapes = _dense_shapes(cfg)
        self.names = [n for n in shapes if is_quantized_name(probe, n)]
        if fmt in ("int4", "int8-weight") and group_size:
            for n in self.names:
                k = shapes[n][1]
                if k % group_size:
                    raise ShapeError(f"{n}: in_features {k} is not a multiple of the {fmt} group size {group_size} "
                                     "(pick a group size that divides it, or another format)")
        total = sum(shapes[n][0] * shapes[n][1] for n in self.names)
        self.bar = _Progress(f"quantizing to {fmt}", len(self.names),
                             total > 50_000_000 if progress is None else progress)
        # id(full-precision weight) -> (weakref to it, its packed weight): tied names share one. The
        # weakref tells a live tie from a weight freed after packing whose id a later tensor reuses.
        self.done = {}
        self.packed = set()  # names done

    def weights(self, out: dict, names, sd: dict | None = None):
        """Pack out[n] for each n of `names` that is a quantized linear weight (once); with consume, the
        full-precision weight also leaves `sd` (the caller's dict) unless other names share it."""
        from ..checkpoint.safetensors_io import release_pages
        from ..ops.quant import _quantize_weight

        sd = out if sd is None else sd
        wanted = set(self.names)
        for n in names:
            if n not in wanted or n in self.packed:
                continue
            w = out[n]
            self.packed.add(n)
            seen = self.done.get(id(w))
            if seen is not None and seen[0]() is w:  # a tied embedding / head: one packed weight under both names
                out[n] = sd[n] = seen[1]
                self.bar.step()
                continue
            shared = any(v is w and k != n for k, v in sd.items()) or any(v is w and k != n for k, v in out.items())
            release = release_pages if self.consume and (self.release_shared or not shared) else None
            # (16-bit weights go to float64 block by block: a float32 copy of the whole would be exact
            # too, and a second full-size tensor)
            q = _quantize_weight(w.detach(), self.fmt, self.group_size,
                                 self.symmetric, done_with=release)
            self.done[id(w)] = (weakref.ref(w), q)
            out[n] = q
            if self.consume and not shared:  # the caller's dict gives up the full-precision weight at once
                sd[n] = q
            del w
            self.bar.step()

    def finish(self, cfg: ModelConfig, sd: dict, out: dict):
        """Pack every quantized weight not packed yet; (cfg with the quantization recorded, out). A weight
        that holds another packing (a GGUF file's exact blocks: the caller marked it packed) is recorded in
        cfg.quant_overrides."""
        self.weights(out, self.names, sd)
        conversion = (f"quantize:{self.fmt}" + (f":g{self.group_size}" if self.fmt in ("int4", "fp8") or self.group_size
                                                else "") + ("" if self.symmetric else ":asym"))
        return record_packing(cfg, out, conversion, (self.fmt, int(self.group_size or 0), self.symmetric, 0)), out


def smooth_model(cfg: ModelConfig, sd: dict, alpha: float = 0.5, calibration=None, n_seqs: int = 4,
                 seq_len: int = 64, seed: int = 0):
    """SmoothQuant (Xiao et al., 2023) folded into the norms: per norm, with a_j the largest |output|
    of channel j over calibration tokens and w_j the largest |W[n, j]| over the linear layers reading
    it, s_j = a_j^alpha / w_j^(1 - alpha); the norm's gain (and bias) is divided by s and the
    readers' columns multiplied by s. The model computes the same function (up to rounding) while
    its activations get flatter channels, which per-token int8 quantization of the activations
    (W8A8) then represents with less error.

    calibration: a list of token-id lists (default: `n_seqs` random sequences of `seq_len` ids,
    seeded). Statistics come from normengine.reference.model in float32. The norms are left with
    non-unit gains, so the runner applies them as their own pass (not fused into the GEMMs)."""
    from ..reference.model import forward
    from .norms import _norm_groups

    if not 0.0 <= float(alpha) <= 1.0:
        raise ArgumentError(f"smooth: expected an alpha in [0, 1], got {alpha!r}")
    if cfg.norm == "none":
        raise ArgumentError("smooth: the model has no norms to fold the smoothing factors into")
    if cfg.quantization is not None:
        raise ArgumentError("smooth: the model is already quantized; smoothing needs the full-precision weights")
    if calibration is None:
        g = torch.Generator().manual_seed(seed)
        calibration = [torch.randint(0, cfg.vocab_size, (min(seq_len, cfg.max_seq_len),), generator=g).tolist()
                       for _ in range(n_seqs)]
    stats: dict = {}
    with torch.no_grad():
        for ids in calibration:
            forward(cfg, sd, ids, dtype=torch.float32, stats=stats)
    out = dict(sd)
    for norm, readers in _norm_groups(cfg):
        ws = [f"{r}.weight" for r in readers if f"{r}.weight" in sd]
        a = stats[norm]
        w = torch.stack([sd[n].detach().to(torch.float64).abs().amax(0) for n in ws]).amax(0)
        s = (a.clamp_min(1e-8) ** alpha) / (w.clamp_min(1e-8) ** (1.0 - alpha))
        s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)
        gname, bname = f"{norm}.weight", f"{norm}.bias"
        out[gname] = (sd[gname].to(torch.float64) / s).to(sd[gname].dtype)
        if bname in sd:
            out[bname] = (sd[bname].to(torch.float64) / s).to(sd[bname].dtype)
        for n in ws:
            out[n] = (sd[n].detach().to(torch.float64) * s).to(sd[n].dtype)
    new = ModelConfig.from_dict(cfg.to_dict())
    if "lm_head.weight" in out and out.get("tok_emb.weight") is not out["lm_head.weight"]:
        new.tied_head = False
    new.conversions = list(cfg.conversions) + [f"smooth:{alpha:g}"]
    return new, out


def pack_quantized(cfg: ModelConfig, sd: dict) -> dict:
    """The tensors to save: every packed weight as `<name>.qdata` / `.qscale` (/ `.qzero`)."""
    out = {}
    for n, t in sd.items():
        if is_quantized(t):
            for suffix, v in t.tensors().items():
                out[f"{n}.{suffix}"] = v
        else:
            out[n] = t
    return out


def unpack_quantized(cfg: ModelConfig, sd: dict) -> dict:
    """The inverse of pack_quantized for a checkpoint whose config names its quantization: packed
    tensors become QuantizedWeight objects again (no re-quantization); tensors shared on disk (a
    tied embedding and head) become one object."""
    from ..ops.quant import QuantizedWeight

    if cfg.quantization is None:
        return sd
    shapes = _dense_shapes(cfg)
    out = {}
    memo = {}
    for n, shape in shapes.items():
        spec = quant_of(cfg, n)
        if spec is None:
            if n in sd:
                out[n] = sd[n]
            continue
        parts = {k[len(n) + 1:]: v for k, v in sd.items() if k.startswith(n + ".q")}
        key = tuple(sorted((k, id(v)) for k, v in parts.items()))
        if key not in memo:
            memo[key] = QuantizedWeight.from_tensors(parts, spec[0], spec[1], tuple(shape))
        out[n] = memo[key]
    for n, t in sd.items():  # anything else the checkpoint holds (e.g. attention decays)
        base = n.rsplit(".", 1)[0]
        if n not in out and not (base in shapes and is_quantized_name(cfg, base)):
            out[n] = t
    return out


def swap_attention(cfg: ModelConfig, attention) -> ModelConfig:
    """A config whose layers use `attention` ("softmax" | "linear" | "mala" | "norm", or a list with
    one entry per layer): the same weights, read by another attention type (the starting point of
    linearization by fine-tuning)."""
    from ..config import ATTENTION_TYPES

    types = [attention] * cfg.n_layers if isinstance(attention, str) else list(attention)
    for t in types:
        if t not in ATTENTION_TYPES:
            raise ArgumentError(f"attention: expected one of {ATTENTION_TYPES} (or a list of them), got {t!r}")
    if len(types) != cfg.n_layers:
        raise ArgumentError(f"attention: expected {cfg.n_layers} entries (one per layer), got {len(types)}")
    new = ModelConfig.from_dict(cfg.to_dict())
    old = cfg.attention or ["softmax"] * cfg.n_layers
    if types != old:
        new.attention = types
        new.conversions = list(cfg.conversions) + ["attention:" + (attention if isinstance(attention, str) else ",".join(types))]
    return new


__all__ = ["quantize_model", "smooth_model", "pack_quantized", "unpack_quantized", "swap_attention",
           "is_quantized"]
