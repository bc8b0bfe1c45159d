"""The packed weight object of the quantized formats (normengine.ops.quant), kept free of torch so
that normengine.load can hold a quantized checkpoint's packed parts as numpy arrays (normengine._lite).
Its methods that compute (to, dequantize) take torch tensors and import torch."""

from __future__ import annotations

from .config import QUANT_FORMATS as FORMATS
from .errors import ArgumentError, ShapeError


class QuantizedWeight:
    """A packed [N, K] weight. data: int8 [N, K] (int8 formats), uint8 [N, K/2] (int4: byte j of a
    row holds k = 2j in its low nibble, k = 2j + 1 in its high one) or uint8 [N, K] (fp8: E4M3 bit
    patterns); scale: float32 [N] (int8), [N, K/group] (int4, and int8-weight with group_size 16 / 32 /
    64 / 128), [1] or [ceil(N/128), ceil(K/128)] (fp8);
    zero: float32 [N, K/group] for asymmetric int4 (and grouped int8-weight with zero points, w = (q - z) s:
    how GGUF blocks with an offset, Q5_1 / Q5_K / Q2_K, load), else None."""

    def __init__(self, format: str, shape, data, scale, zero=None, group_size: int = 0):
        if format not in FORMATS:
            raise ArgumentError(f"format: expected one of {FORMATS}, got {format!r}")
        self.format = format
        self.shape = (int(shape[0]), int(shape[1]))
        self.data, self.scale, self.zero = data, scale, zero
        self.group_size = int(group_size or 0)

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
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, format: str, group_size: int, shape) -> "QuantizedWeight":
        for k in ("qdata", "qscale"):
            if k not in tensors:
                raise ShapeError(f"packed weight: missing '{k}'")
        return cls(format, shape, tensors["qdata"], tensors["qscale"], tensors.get("qzero"), group_size)

    def to(self, device) -> "QuantizedWeight":
        """The packed torch tensors on `device`."""
        z = self.zero.to(device) if self.zero is not None else None
        return QuantizedWeight(self.format, self.shape, self.data.to(device), self.scale.to(device), z,
                               self.group_size)

    # ---------------------------------------------------------------- values
    def dequantize(self, dtype=None):
        """The [N, K] weight the GEMMs multiply by, in `dtype` (default float32; exact in float32 and
        float64), as a torch tensor."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        N, K = self.shape
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
