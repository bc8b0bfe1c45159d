"""GGUF files (llama.cpp's single-file format) read with our own validating parser: no llama.cpp, no
`gguf` package, no torch. The layout (little-endian, versions 2 and 3):

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv x      { string key, u32 value_type, value }
    n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
    padding to `general.alignment` (default 32), then the data section; each tensor's bytes start at
    data + offset (a multiple of the alignment).

    string = u64 length + UTF-8 bytes; value types 0-12: u8 i8 u16 i16 u32 i32 f32 bool string array u64
    i64 f64, an array being u32 item_type, u64 count, items.

ne[] lists a tensor's dimensions fastest-varying first (ggml order): a linear weight of out_features x
in_features has ne = [in, out], i.e. numpy shape (out, in), the reversed list. Quantized types pack each
run of `block` consecutive elements along ne[0] into `type_size` bytes.

Safety: a GGUF file is untrusted input. Every length and count is checked against the bytes that
remain before it is used to allocate or slice, arrays nest at most _MAX_DEPTH deep, keys and tensor names
must be unique, dimensions positive with at most 4 of them, quantized rows whole blocks, and every
tensor must lie inside the data section at an aligned offset. A violation raises CheckpointError naming
the file and what is wrong; nothing is executed. The file is mapped copy-on-write (as our safetensors
reader does); tensors of unquantized types are zero-copy views of it.

Dequantization follows ggml's definitions (ggml-quants.c, dequantize_row_*), each written below as the
formula of its block. Blocks of 32 (d, m: float16 scales; q: the stored integers):
    Q4_0  x = (q - 8) d            q 4 bits: byte j holds elements j (low nibble) and j + 16 (high)
    Q4_1  x = q d + m
    Q5_0  x = (q - 16) d           q 5 bits: the 4 low as Q4_0, bit j of the u32 qh the fifth of element j
    Q5_1  x = q d + m
    Q8_0  x = q d                  q int8
Super-blocks of 256 (the "K-quants"; d, dmin float16; sub-block scales and mins are small integers):
    Q2_K  16 sub-blocks of 16: x = d sc_j q - dmin m_j, q 2 bits, (sc_j, m_j) the low / high nibble of a byte
    Q3_K  16 sub-blocks of 16: x = d (sc_j - 32) (q - 4 [high bit clear]), q 2 bits + a high bit in hmask,
          sc_j 6 bits packed in 12 bytes
    Q4_K  8 sub-blocks of 32:  x = d sc_j q - dmin m_j, q 4 bits, (sc_j, m_j) 6 bits each packed in 12 bytes
    Q5_K  as Q4_K with a fifth bit of q in qh
    Q6_K  16 sub-blocks of 16: x = d sc_j (q - 32), q 6 bits (4 in ql, 2 in qh), sc_j int8
All in float32 as ggml computes them (a float16 scale widened, then products in float32), so each value
equals llama.cpp's dequantized weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import CheckpointError
from .safetensors_io import BF16, _register_map, bf16_to_f32, is_bf16

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_DEPTH = 2      # an array of arrays at most (GGUF files hold flat arrays; nesting is legal but unused)
_MAX_DIMS = 4       # GGML_MAX_DIMS

# value type -> numpy dtype of its scalars (8 string and 9 array are parsed apart)
_SCALAR = {0: np.dtype("u1"), 1: np.dtype("i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
           5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("u1"), 10: np.dtype("<u8"), 11: np.dtype("<i8"),
           12: np.dtype("<f8")}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int        # elements per block
    size: int         # bytes per block
    dtype: Optional[np.dtype] = None  # the element dtype of an unquantized type

    @property
    def quantized(self) -> bool:
        return self.dtype is None


GGML_TYPES: Dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4, np.dtype("<f4")),
    1: GGMLType("F16", 1, 2, np.dtype("<f2")),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    24: GGMLType("I8", 1, 1, np.dtype("i1")),
    25: GGMLType("I16", 1, 2, np.dtype("<i2")),
    26: GGMLType("I32", 1, 4, np.dtype("<i4")),
    27: GGMLType("I64", 1, 8, np.dtype("<i8")),
    28: GGMLType("F64", 1, 8, np.dtype("<f8")),
    30: GGMLType("BF16", 1, 2, BF16),
}
# ggml types that exist but that this reader does not decode (named in the error)
_UNSUPPORTED_TYPES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
                      21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]   # numpy order (ne reversed)
    type: GGMLType
    offset: int              # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: Dict[str, object]   # scalars as Python numbers / bools / str; arrays as lists or numpy arrays
    tensors: Dict[str, TensorInfo]
    alignment: int
    _map: Optional[np.ndarray] = None

    def raw(self, name: str) -> np.ndarray:
        """A tensor's stored bytes as a zero-copy view of the file: its elements (numpy dtype, shape)
        for an unquantized type, else uint8 blocks [n_blocks, type_size]."""
        info = self.tensors[name]
        b = self._map[info.offset: info.offset + info.nbytes]
        if not info.type.quantized:
            if info.offset % info.type.dtype.itemsize:  # legal only with an odd alignment; copy to align
                b = np.array(b, copy=True)
            return b.view(info.type.dtype).reshape(info.shape)
        return b.reshape(-1, info.type.size)

    def array(self, name: str, dtype=None) -> np.ndarray:
        """A tensor as numpy: unquantized types as stored (zero-copy; bfloat16 as BF16-tagged uint16,
        see safetensors_io.is_bf16) unless `dtype` asks for another; quantized ones dequantized to
        float32 (or `dtype`), shaped as the tensor."""
        info = self.tensors[name]
        a = self.raw(name)
        if info.type.quantized:
            with np.errstate(invalid="ignore", over="ignore"):  # (an Inf / NaN scale gives NaN, as in ggml)
                a = DEQUANTIZE[info.type.name](a).reshape(info.shape)
        if dtype is not None and a.dtype != np.dtype(dtype):
            a = (bf16_to_f32(a) if is_bf16(a) else a).astype(dtype)
        return a


class _Reader:
    """Bounds-checked little-endian reads from the file's header bytes."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.end = buf, 0, path, len(buf)

    def fail(self, what: str):
        raise CheckpointError(f"{self.path}: corrupt GGUF file: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, {self.end - self.pos} remain (truncated?)")
        v = self.buf[self.pos: self.pos + n]
        self.pos += n
        return v

    def scalar(self, dt: np.dtype, what: str):
        return np.frombuffer(self.take(dt.itemsize, what), dtype=dt)[0].item()

    def u32(self, what: str) -> int:
        return self.scalar(_SCALAR[4], what)

    def u64(self, what: str) -> int:
        return self.scalar(_SCALAR[10], what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} (length)")
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.pos - n} is not UTF-8")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR:
            v = self.scalar(_SCALAR[vtype], what)
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                self.fail(f"{what}: arrays nested deeper than {_MAX_DEPTH}")
            itype = self.u32(f"{what} (array item type)")
            n = self.u64(f"{what} (array length)")
            if itype in _SCALAR:  # one slice of the bytes, read as numpy
                dt = _SCALAR[itype]
                if n > (self.end - self.pos) // dt.itemsize:
                    self.fail(f"{what}: an array of {n} items of {dt.itemsize} bytes runs past the end of the file")
                a = np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt).copy()
                return a.astype(bool) if itype == _BOOL else a
            if itype not in (_STRING, _ARRAY):
                self.fail(f"{what}: unknown array item type {itype}")
            if n > (self.end - self.pos) // 8:  # every string / array item takes at least 8 bytes
                self.fail(f"{what}: an array of {n} items runs past the end of the file")
            return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(n)]
        self.fail(f"{what}: unknown value type {vtype}")


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor table), validating it. The file is mapped once
    (copy-on-write); tensors are views of that mapping."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read GGUF file: {e}") from e
    size = st.st_size
    if size < 24:
        raise CheckpointError(f"{path}: not a GGUF file ({size} bytes, shorter than the 24-byte header)")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map GGUF file: {e}") from e
    _register_map(mm)
    key = (os.path.abspath(path), size, st.st_mtime_ns, st.st_ino)
    if _LAST[0] != key:  # the tokenizer, chat template and weights of one load read one header
        _LAST[:] = [key, _parse(memoryview(mm), path, size)]
    h = _LAST[1]
    return GGUFFile(path, h.version, h.metadata, h.tensors, h.alignment, mm)


_LAST: list = [None, None]  # (file key, parsed header) of the last file read


def _parse(buf: memoryview, path: str, size: int) -> GGUFFile:
    r = _Reader(buf, path)
    magic = bytes(r.take(4, "magic"))
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version = r.u32("version")
    if version not in VERSIONS:
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (versions {VERSIONS})")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    if n_kv > (size - r.pos) // 12:  # a key-value pair takes at least 12 bytes
        r.fail(f"metadata count {n_kv} cannot fit in a file of {size} bytes")
    if n_tensors > (size - r.pos) // 28:  # a tensor entry at least 28
        r.fail(f"tensor count {n_tensors} cannot fit in a file of {size} bytes")
    meta: Dict[str, object] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        if key in meta:
            r.fail(f"metadata key {key!r} appears twice")
        meta[key] = r.value(r.u32(f"metadata {key!r} type"), f"metadata {key!r}")
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        r.fail(f"general.alignment must be a positive power of two, got {alignment!r}")

    entries = []
    for i in range(n_tensors):
        name = r.string(f"tensor {i} name")
        n_dims = r.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            r.fail(f"tensor {name!r}: {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        ne = [r.u64(f"tensor {name!r} dimension {j}") for j in range(n_dims)]
        code = r.u32(f"tensor {name!r} type")
        offset = r.u64(f"tensor {name!r} offset")
        entries.append((name, ne, code, offset))
    data_start = -(-r.pos // alignment) * alignment
    data_size = size - data_start
    if data_size < 0:
        r.fail("the data section starts past the end of the file (truncated?)")

    tensors: Dict[str, TensorInfo] = {}
    for name, ne, code, offset in entries:
        if name in tensors:
            r.fail(f"tensor {name!r} appears twice")
        if code not in GGML_TYPES:
            if code in _UNSUPPORTED_TYPES:
                raise CheckpointError(f"{path}: tensor {name!r} is stored as {_UNSUPPORTED_TYPES[code]}, which "
                                      f"normengine does not decode (supported: "
                                      f"{', '.join(t.name for t in GGML_TYPES.values())})")
            r.fail(f"tensor {name!r}: unknown ggml type {code}")
        t = GGML_TYPES[code]
        if any(n <= 0 or n > size * 64 for n in ne):  # 64: no block packs more than 64 elements a byte
            r.fail(f"tensor {name!r}: dimensions {ne} (each must be positive and fit the file)")
        if ne[0] % t.block:
            r.fail(f"tensor {name!r}: a row of {ne[0]} elements is not whole {t.name} blocks of {t.block}")
        count = 1
        for n in ne:
            count *= n
        nbytes = count // t.block * t.size
        if offset % alignment:
            r.fail(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        if offset > data_size or nbytes > data_size - offset:
            r.fail(f"tensor {name!r} ({t.name}, ne {ne}: {nbytes} bytes at data offset {offset}) runs past the end "
                   f"of the file ({data_size} bytes of data; truncated?)")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), t, data_start + offset, nbytes)
    return GGUFFile(path, version, meta, tensors, alignment)


# ------------------------------------------------------------------------------------ dequantization
# Each takes the blocks [n, type_size] (uint8) and returns float32 [n, block].

def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [n, 1]."""
    return b[:, at:at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes a block -> 32 values: the low nibbles (elements 0-15), then the high (16-31)."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _qh_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian u32) a block -> its 32 bits, bit j at column j, as 0 / 16."""
    return (np.unpackbits(qh, axis=1, bitorder="little") << 4).astype(np.uint8)


def dequantize_q4_0(b):
    return (_nibbles(b[:, 2:18]).astype(np.float32) - 8.0) * _f16(b, 0)


def dequantize_q4_1(b):
    return _nibbles(b[:, 4:20]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def dequantize_q5_0(b):
    q = _nibbles(b[:, 6:22]) | _qh_bits(b[:, 2:6])
    return (q.astype(np.float32) - 16.0) * _f16(b, 0)


def dequantize_q5_1(b):
    q = _nibbles(b[:, 8:24]) | _qh_bits(b[:, 4:8])
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def dequantize_q8_0(b):
    return b[:, 2:34].view(np.int8).astype(np.float32) * _f16(b, 0)


def _scale_min_k4(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 (scale, min) pairs of 6 bits (ggml's get_scale_min_k4): for j < 4 the low
    6 bits of bytes j and j + 4; for j >= 4 the nibbles of byte j + 4 with the top 2 bits of bytes j - 4
    (scale) and j (min) above them."""
    lo, hi, tail = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (tail & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k4_values(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 4-bit values in element order: each 32-byte run gives 64 elements, its low
    nibbles first, then its high."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 32)
    return np.stack([q & 15, q >> 4], axis=2).reshape(n, 256)


def _affine(q, s, offset, sub):
    """Values s_j q - offset_j of sub-blocks of `sub` elements (q uint8 [n, 256], s / offset [n, 256 / sub])."""
    n = q.shape[0]
    return (s[:, :, None] * q.reshape(n, -1, sub).astype(np.float32) - offset[:, :, None]).reshape(n, 256)


def q4_k_parts(b):
    """Q4_K blocks as (codes uint8 [n, 256] in 0..15, s float32 [n, 8] = d sc_j, offset [n, 8] = dmin m_j): the
    values of sub-block j (32 elements) are s_j q - offset_j."""
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    return _k4_values(b[:, 16:144]), d * sc, dmin * mn


def dequantize_q4_k(b):
    return _affine(*q4_k_parts(b), 32)


def q5_k_parts(b):
    """Q5_K blocks as (codes uint8 [n, 256] in 0..31, s [n, 8] = d sc_j, offset [n, 8] = dmin m_j), as Q4_K."""
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    # the fifth bit of element 32 j + l (sub-block j) is bit j of qh[l]
    high = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(-1, 32, 8).transpose(0, 2, 1)
    q = _k4_values(b[:, 48:176]).reshape(-1, 8, 32) | (high << 4)
    return q.reshape(-1, 256), d * sc, dmin * mn


def dequantize_q5_k(b):
    return _affine(*q5_k_parts(b), 32)


def q6_k_parts(b):
    """Q6_K blocks as (codes int8 [n, 256] in -32..31, scales float32 [n, 16] = d sc_j, one per 16 elements):
    the values are codes times their sub-block's scale."""
    ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b, 208)
    n = b.shape[0]
    out = np.empty((n, 2, 4, 32), dtype=np.int8)
    for half in range(2):  # 128 elements each: ql[64 half : +64], qh[32 half : +32]
        l = ql[:, 64 * half: 64 * half + 64]
        h = qh[:, 32 * half: 32 * half + 32]
        lo = [l[:, :32] & 15, l[:, 32:] & 15, l[:, :32] >> 4, l[:, 32:] >> 4]  # element groups 0..3 of 32
        for g in range(4):
            out[:, half, g] = (lo[g] | (((h >> (2 * g)) & 3) << 4)).astype(np.int8) - 32
    # scale j covers elements 16 j .. 16 j + 15 of the 256
    return out.reshape(n, 256), d * sc


def dequantize_q6_k(b):
    q, s = q6_k_parts(b)
    return (q.reshape(-1, 16, 16).astype(np.float32) * s[:, :, None]).reshape(-1, 256)


def q2_k_parts(b):
    """Q2_K blocks as (codes uint8 [n, 256] in 0..3, s [n, 16] = d (sc_j & 15), offset [n, 16] = dmin (sc_j >> 4)):
    the values of sub-block j (16 elements) are s_j q - offset_j."""
    sc, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    n = b.shape[0]
    # half h (128 elements) reads qs[32 h : 32 h + 32]; its 2-bit field s (shift 2 s) gives elements
    # 128 h + 32 s + l; the 16 scales run in element order, one per 16
    q = np.stack([(qs.reshape(n, 2, 32) >> (2 * s)) & 3 for s in range(4)], axis=2)  # [n, 2, 4, 32]
    return q.reshape(n, 256), d * (sc & 15), dmin * (sc >> 4)


def dequantize_q2_k(b):
    return _affine(*q2_k_parts(b), 16)


def q3_k_parts(b):
    """Q3_K blocks as (codes int8 [n, 256] in -4..3, scales float32 [n, 16] = d (s_j - 32), one per 16
    elements): the values are codes times their sub-block's scale."""
    hmask, qs, s = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    n = b.shape[0]
    # 16 scales of 6 bits: the low 4 bits are the nibbles of bytes 0-7 (low nibbles for scales 0-7, high
    # for 8-15), the top 2 the 2-bit fields of bytes 8-11 (field k of byte 8 + j gives scale j + 4 k)
    low = np.concatenate([s[:, 0:8] & 15, s[:, 0:8] >> 4], axis=1)
    top = np.concatenate([(s[:, 8:12] >> (2 * k)) & 3 for k in range(4)], axis=1)
    scales = (low | (top << 4)).astype(np.float32) - 32.0
    q = np.stack([(qs.reshape(n, 2, 32) >> (2 * f) & 3) for f in range(4)], axis=2)  # [n, 2, 4, 32]
    # element 128 h + 32 f + l subtracts 4 unless bit (4 h + f) of hmask[l] is set
    hbits = np.unpackbits(hmask, axis=1, bitorder="little").reshape(n, 32, 2, 4).transpose(0, 2, 3, 1)
    v = q.astype(np.int8) - 4 * (1 - hbits).astype(np.int8)
    return v.reshape(n, 256), d * scales


def dequantize_q3_k(b):
    q, s = q3_k_parts(b)
    return (q.reshape(-1, 16, 16).astype(np.float32) * s[:, :, None]).reshape(-1, 256)


DEQUANTIZE = {
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
    "Q5_0": dequantize_q5_0,
    "Q5_1": dequantize_q5_1,
    "Q8_0": dequantize_q8_0,
    "Q2_K": dequantize_q2_k,
    "Q3_K": dequantize_q3_k,
    "Q4_K": dequantize_q4_k,
    "Q5_K": dequantize_q5_k,
    "Q6_K": dequantize_q6_k,
}


def dequantize(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """Raw blocks of a ggml type (uint8, [n_blocks, type_size], or flat bytes) -> float32 values."""
    t = next((t for t in GGML_TYPES.values() if t.name == type_name and t.quantized), None)
    if t is None:
        raise CheckpointError(f"dequantize: {type_name!r} is not a quantized ggml type this reader decodes "
                              f"({', '.join(DEQUANTIZE)})")
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, t.size)
    with np.errstate(invalid="ignore", over="ignore"):  # (an Inf / NaN scale gives NaN, as in ggml)
        return DEQUANTIZE[type_name](b).reshape(-1)


__all__ = ["GGUFFile", "TensorInfo", "GGMLType", "GGML_TYPES", "read_gguf", "dequantize", "DEQUANTIZE"]
