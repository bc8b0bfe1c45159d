"""The packed weight object of the quantized formats (normengine.ops.quant), kept free of torch so
that normengine.load can hold a quantized checkpoint's packed parts as numpy arrays (normengine._lite).
Its methods that compute (to, dequantize) take torch tensors and import torch."""

from __future__ import annotations

from .config import QUANT_FORMATS as FORMATS
from .config import ModelConfig, _dense_shapes, is_quantized_name, takes_zero_points
from .errors import ArgumentError, ShapeError


class QuantizedWeight:
    """A packed [N, K] weight. data: int8 [N, K] (int8 formats), uint8 [N, K/2] (int4: byte j of a
    row holds k = 2j in its low nibble, k = 2j + 1 in its high one) or uint8 [N, K] (fp8: E4M3 bit
    patterns); scale: float32 [N] (int8), [N, K/group] (int4, and int8-weight with group_size 16 / 32 /
    64 / 128), [1] or [ceil(N/128), ceil(K/128)] (fp8);
    zero: float32 [N, K/group] for asymmetric int4 (and grouped int8-weight with zero points, w = (q - z) s:
    how GGUF blocks with an offset, Q4_1 / Q5_1, load), else None.
    Two-level scales (int4 and grouped int8-weight; how GGUF's K-quants load, their scales kept as they are):
    sub int8 [N, K/group] set, scale float32 [N, K/(group S)] holds one scale per super-block of S groups
    (super_groups), each group's s = scale * sub (a float32 product, as ggml forms d sc); with sub_zero
    (int8 [N, K/group]) zero [N, K/(group S)] holds the super-blocks' offsets, o = zero * sub_zero, and
    w = q s - o (int4 without: (q - 7.5) s; int8-weight: q s)."""

    def __init__(self, format: str, shape, data, scale, zero=None, group_size: int = 0, sub=None, sub_zero=None):
        if format not in FORMATS:
            raise ArgumentError(f"format: expected one of {FORMATS}, got {format!r}")
        self.format = format
        self.shape = (int(shape[0]), int(shape[1]))
        self.data, self.scale, self.zero = data, scale, zero
        self.group_size = int(group_size or 0)
        self.sub, self.sub_zero = sub, sub_zero
        self.super_groups = 0
        if sub is not None or sub_zero is not None:
            g = self.group_size
            if sub is None or not takes_zero_points(format, g):
                raise ArgumentError("sub: two-level scales need sub, and int4 or grouped int8-weight")
            n_super = int(scale.shape[-1]) if len(scale.shape) == 2 else 0
            G = self.shape[1] // g
            if not n_super or G % n_super or self.shape[1] % g:
                raise ShapeError(f"scale: expected [N, K/(group S)] super-block scales of {G} groups, got shape "
                                 f"{tuple(scale.shape)}")
            self.super_groups = G // n_super
            if (sub_zero is None) != (zero is None):
                raise ArgumentError("sub_zero: two-level offsets need both sub_zero and zero (super-block offsets)")
        elif format == "int4" and self.group_size == 16:
            raise ArgumentError("group_size: int4 takes 16 only with two-level scales (sub)")

    # ---------------------------------------------------------------- description
    @property
    def device(self):
        return self.data.device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def __repr__(self):
        g = f", group_size={self.group_size}" if self.format in ("int4", "fp8") or self.group_size else ""
        return f"QuantizedWeight({self.format}, shape={self.shape}{g}, {self.nbytes() / 2**20:.2f} MiB)"

    def tensors(self) -> dict:
        """The packed tensors under the suffixes a checkpoint stores them with."""
        out = {"qdata": self.data, "qscale": self.scale}
        if self.zero is not None:
            out["qzero"] = self.zero
        if self.sub is not None:
            out["qsub"] = self.sub
        if self.sub_zero is not None:
            out["qsubzero"] = self.sub_zero
        return out

    def write_into(self, parts: dict) -> None:
        """Copy the packed tensors into `parts` (same suffixes, shapes; torch tensors or numpy arrays): how
        normengine.load places a packed weight in its weight arena (GGUFPacked unpacks its blocks there)."""
        for key, p in self.tensors().items():
            parts[key][...] = p

    @classmethod
    def from_tensors(cls, tensors: dict, format: str, group_size: int, shape) -> "QuantizedWeight":
        for k in ("qdata", "qscale"):
            if k not in tensors:
                raise ShapeError(f"packed weight: missing '{k}'")
        return cls(format, shape, tensors["qdata"], tensors["qscale"], tensors.get("qzero"), group_size,
                   tensors.get("qsub"), tensors.get("qsubzero"))

    def to(self, device) -> "QuantizedWeight":
        """The packed torch tensors on `device` (two-level scales: on a GPU as one scale per group, single_level;
        the CUDA kernels read no others)."""
        import torch

        if self.sub is not None and torch.device(device).type != "cpu":
            return self.single_level().to(device)
        parts = [None if t is None else t.to(device) for t in (self.zero, self.sub, self.sub_zero)]
        return QuantizedWeight(self.format, self.shape, self.data.to(device), self.scale.to(device), parts[0],
                               self.group_size, *parts[1:])

    def _group_values(self, top, sub):
        """float32 [N, K/group]: each group's top[n, g // S] * sub[n, g] (a two-level scale or offset)."""
        import torch

        N, K = self.shape
        G = K // self.group_size
        return (top.to(torch.float32).view(N, -1, 1) * sub.to(torch.float32).view(N, -1, self.super_groups)).view(N, G)

    def single_level(self) -> "QuantizedWeight":
        """This weight with one float32 scale (and zero point) per group, as torch tensors: two-level scales
        expanded, s = scale * sub, and offsets as zero points z = o / s (values s q - o to float32 rounding;
        a group of s = 0 and o != 0, all its values -o, as codes 0, s = o, z = 1: exactly -o). Itself when
        it has one level."""
        import torch

        if self.sub is None:
            return self
        N, K = self.shape
        g = self.group_size
        fmt, data = self.format, self.data
        s = self._group_values(self.scale, self.sub)
        if fmt == "int4" and g == 16:  # (int4 takes groups of 32 and more: int8 codes, the same values)
            fmt, data = "int8-weight", torch.stack([data & 15, data >> 4], -1).reshape(N, K).to(torch.int8)
            if self.sub_zero is None:  # (q - 7.5) s
                return QuantizedWeight(fmt, self.shape, data, s, torch.full_like(s, 7.5), g)
        if self.sub_zero is None:
            return QuantizedWeight(fmt, self.shape, data, s, None, g)
        o = self._group_values(self.zero, self.sub_zero)
        flat = (s == 0) & (o != 0)
        if bool(flat.any()):
            data = data.clone()
            data.view(N, K // g, -1)[flat] = 0
            s = torch.where(flat, o, s)
        z = torch.where(s != 0, o / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))
        return QuantizedWeight(fmt, self.shape, data, s, z, g)

    # ---------------------------------------------------------------- values
    def dequantize(self, dtype=None):
        """The [N, K] weight the GEMMs multiply by, in `dtype` (default float32; exact in float32 and
        float64), as a torch tensor."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        N, K = self.shape
        if self.sub is not None:  # two-level: q s - o with s, o the float32 products the kernels form
            g = self.group_size
            if self.format == "int4":
                q = torch.stack([self.data & 15, self.data >> 4], -1).reshape(N, K).to(torch.float64)
            else:
                q = self.data.to(torch.float64)
            if self.sub_zero is None and self.format == "int4":
                q = q - 7.5
            w = q.view(N, K // g, g) * self._group_values(self.scale, self.sub).to(torch.float64)[..., None]
            if self.sub_zero is not None:
                w = w - self._group_values(self.zero, self.sub_zero).to(torch.float64)[..., None]
            return w.reshape(N, K).to(dtype)
        if self.format in ("int8", "int8-weight"):
            if self.group_size:  # a scale per group of columns (and a zero point: (q - z) s)
                g = self.group_size
                q = self.data.to(torch.float64).view(N, K // g, g)
                if self.zero is not None:
                    q = q - self.zero.to(torch.float64)[..., None]
                return (q * self.scale.to(torch.float64)[..., None]).reshape(N, K).to(dtype)
            return (self.data.to(torch.float64) * self.scale.to(torch.float64)[:, None]).to(dtype)
        if self.format == "int4":
            g = self.group_size
            q = torch.stack([self.data & 15, self.data >> 4], -1).reshape(N, K).to(torch.float64)
            z = self.zero.to(torch.float64) if self.zero is not None else torch.full((N, K // g), 7.5,
                                                                                    dtype=torch.float64,
                                                                                    device=q.device)
            w = (q.view(N, K // g, g) - z[..., None]) * self.scale.to(torch.float64)[..., None]
            return w.reshape(N, K).to(dtype)
        v = self.data.view(torch.float8_e4m3fn).to(torch.float64)
        if self.group_size == 0:
            return (v * self.scale.to(torch.float64)[0]).to(dtype)
        s = self.scale.to(torch.float64).repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
        return (v * s).to(dtype)


def is_quantized(t) -> bool:
    """A packed weight object (normengine.ops.QuantizedWeight, or anything with its tensors() and dequantize())
    rather than a tensor or array."""
    return hasattr(t, "tensors") and hasattr(t, "dequantize")


# ------------------------------------------------------------------------ recording a model's packing (no torch)
def record_packing(cfg: ModelConfig, out: dict, conversion: str, main=None) -> ModelConfig:
    """cfg with the packing of the weights in `out` recorded: quantization (format, group size, symmetry)
    `main`, by default the packing that holds the most weights; each quantizable weight packed otherwise,
    or left dense, and a packed untied token embedding in quant_overrides; `conversion` appended to
    cfg.conversions."""
    if main is None:
        count: dict = {}
        for t in out.values():
            if is_quantized(t):
                count[_spec(t)] = count.get(_spec(t), 0) + t.numel()
        main = max(count, key=count.get)
    new = ModelConfig.from_dict(cfg.to_dict())
    new.quantization, new.quant_group_size, new.quant_symmetric, new.quant_super_groups = main
    new.quant_overrides = _overrides(new, out, [n for n in _dense_shapes(new) if is_quantized_name(new, n)])
    new.conversions = list(cfg.conversions) + [conversion]
    return ModelConfig.from_dict(new.to_dict())  # (the overrides checked)


def _spec(t):
    """A packed weight's (format, group_size, symmetric), None for a dense tensor."""
    if not is_quantized(t):
        return None
    return (t.format, t.group_size, t.zero is None or not takes_zero_points(t.format, t.group_size),
            getattr(t, "super_groups", 0))


def _overrides(cfg: ModelConfig, out: dict, names) -> dict:
    """quant_overrides of cfg (whose quantization is set) for the weights `out` holds: each of `names`
    (those the model's format packs) not packed so, and a packed untied embedding."""
    main = (cfg.quantization, cfg.quant_group_size, cfg.quant_symmetric, cfg.quant_super_groups)
    names = list(names)
    packed_by_main = set(names)
    got = {}
    for n in names + (["tok_emb.weight"] if not cfg.tied_head else []):
        if n not in out:
            continue
        spec = _spec(out[n])
        if spec == (main if n in packed_by_main else None):  # (an untied embedding is dense unless listed)
            continue
        got[n] = ({"format": "none", "group_size": 0, "symmetric": True} if spec is None else
                  {"format": spec[0], "group_size": spec[1], "symmetric": spec[2]})
        if spec is not None and spec[3]:
            got[n]["super_groups"] = spec[3]
    return got
