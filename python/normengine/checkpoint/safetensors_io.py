"""Our own reader and writer of the safetensors format (https://github.com/huggingface/safetensors).

File layout:

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  JSON header: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
               "data_offsets": [begin, end]}, ...}; offsets are relative to the data section
    [rest]     data section: each tensor's bytes, C order, little-endian

Reading maps the file copy-on-write (numpy.memmap mode "c", i.e. MAP_PRIVATE): a tensor is a view of
the mapped pages, so a large checkpoint is never read into memory twice, and writing into a loaded
tensor never touches the file. Everything is validated before any tensor is made: header length sane
and inside the file, JSON an object, dtypes known, shapes non-negative ints, offsets inside the data
section, sized exactly prod(shape) * itemsize and not overlapping. Any failure raises CheckpointError
naming the file.

Writing puts tensors in order of decreasing item size and pads the header to 8 bytes, so every
tensor starts aligned to its item size and the data section has no holes (what the reference
implementation requires).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import weakref
from typing import Dict, Mapping, Tuple

import numpy as np

from ..errors import ArgumentError, CheckpointError

# Reading needs no torch (normengine.load of a checkpoint Model.save wrote runs without it:
# normengine/_lite.py); torch is imported by the functions that make or take torch tensors.

# safetensors dtype -> (torch dtype name, numpy dtype used to view the bytes)
_DTYPES = {
    "F64": ("float64", np.dtype("<f8")),
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype("<u2", metadata={"dtype": "bfloat16"})),  # numpy has no bfloat16
    "I64": ("int64", np.dtype("<i8")),
    "I32": ("int32", np.dtype("<i4")),
    "I16": ("int16", np.dtype("<i2")),
    "I8": ("int8", np.dtype("i1")),
    "U8": ("uint8", np.dtype("u1")),
    "BOOL": ("bool", np.dtype("?")),
}
SUPPORTED_DTYPES = tuple(_DTYPES)
BF16 = _DTYPES["BF16"][1]  # numpy arrays of bfloat16 bits: uint16 tagged in the dtype's metadata


def is_bf16(a: np.ndarray) -> bool:
    """Whether a numpy array holds bfloat16 bit patterns (its dtype is BF16, metadata included)."""
    return a.dtype.metadata is not None and a.dtype.metadata.get("dtype") == "bfloat16"


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """The float32 values of an array of bfloat16 bits (exact: bfloat16 is float32's upper half)."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def _torch_to_st() -> dict:
    import torch

    return {getattr(torch, td): name for name, (td, _) in _DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_header(path) -> Tuple[dict, Dict[str, str], int]:
    """Parse and validate a safetensors file's header without touching its data.

    Returns (entries, metadata, data_start): entries maps each tensor name to a dict with keys
    "dtype" (safetensors name), "shape" (tuple), "begin" and "end" (absolute byte offsets in the
    file); metadata is the "__metadata__" dict (empty when absent)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file: {size} bytes, too short for the 8-byte header length"
                )
            n = int.from_bytes(raw_len, "little")
            if n < 2 or n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: header length {n} is not within [2, {MAX_HEADER_BYTES}]"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file: header length {n} runs past the end of the "
                    f"{size}-byte file"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: expected a JSON object, got {type(header).__name__}"
        )

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")

    data_start = 8 + n
    data_size = size - data_start
    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry must be an object, got {type(info).__name__}")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in _DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dt!r} (supported: {', '.join(SUPPORTED_DTYPES)})")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r}")
        itemsize = _DTYPES[dt][1].itemsize
        nbytes = math.prod(shape) * itemsize
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes, but shape {tuple(shape)} of {dt} "
                f"needs {nbytes}"
            )
        if offs[1] > data_size:
            raise CheckpointError(
                f"{where}: data_offsets {offs} run past the end of the data section ({data_size} bytes): "
                f"the file is truncated or corrupt"
            )
        entries[name] = {"dtype": dt, "shape": tuple(shape), "begin": data_start + offs[0], "end": data_start + offs[1]}

    spans = sorted((e["begin"], e["end"], k) for k, e in entries.items() if e["end"] > e["begin"])
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors '{k0}' and '{k1}' overlap")
    return entries, metadata, data_start


# ------------------------------------------------------------------ releasing mapped pages
# The pages of a mapped checkpoint that a tensor view has read stay resident (and count in the
# process's memory) for as long as the mapping lives, i.e. as long as any tensor of the file does.
# When a loader replaces a mapped tensor by a transformed copy (a transposed GPT-2 Conv1D weight, a
# dtype conversion), release_pages(source) hands those pages back, so peak memory stays near one copy
# of the weights. Only ranges inside a live mapping this module made are touched.
_MAPS: list = []  # (start address, end address, weakref to the np.memmap)
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _register_map(mm) -> None:
    _MAPS[:] = [m for m in _MAPS if m[2]() is not None]
    base = mm.ctypes.data
    _MAPS.append((base, base + mm.nbytes, weakref.ref(mm)))


def release_pages(*ts) -> int:
    """Drop the resident pages that lie entirely inside the bytes of tensors `ts`, if they are views of
    a checkpoint file this module mapped. The caller promises they are not read again, or that their
    pages were never written (clean pages are read back from the file on the next access). Several
    tensors are released together when their elements fill their joint byte range (e.g. a transposed
    weight split into q, k and v views, whose ranges interleave): a strided view whose elements leave
    gaps keeps every page. Returns the number of bytes released (0 when nothing is mapped memory)."""
    from ..ops._tensor import byte_span

    ts = [t for t in ts if hasattr(t, "data_ptr") and t.device.type == "cpu" and t.numel()]
    if not ts:
        return 0
    spans = [byte_span(t) for t in ts]
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    # the elements fill [lo, hi) exactly when their bytes add up to it (views of one file do not overlap)
    if sum(t.numel() * t.element_size() for t in ts) != hi - lo:
        return 0
    return release_range(lo, hi)


def release_range(lo: int, hi: int) -> int:
    """release_pages for the byte addresses [lo, hi): the whole pages inside it, when it lies inside
    a live mapping this module made. Returns the bytes released."""
    for start, end, ref in _MAPS:
        if start <= lo and hi <= end and ref() is not None:
            a = -(-lo // _PAGE) * _PAGE
            b = hi // _PAGE * _PAGE
            if b <= a:
                return 0
            if ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a),
                                                         _MADV_DONTNEED) != 0:
                return 0
            return b - a
    return 0


def array_dtype_name(a: np.ndarray) -> str:
    """The name of a numpy array's element type, "bfloat16" for a BF16-tagged uint16 array (is_bf16)."""
    return "bfloat16" if is_bf16(a) else a.dtype.name


def copy_releasing(t, dtype=None, chunk_bytes: int = 8 << 20, out=None):
    """A contiguous `dtype` copy of `t` (into `out`, contiguous, of t's shape and `dtype`, if given)
    that the caller will not read again: when `t` is mapped checkpoint memory it is copied in row
    blocks of about chunk_bytes, each block's source pages released once copied, so a large source (a
    float32 embedding turned into bfloat16) is never resident whole next to its copy. t may be a torch
    tensor, or a numpy array with `out` a numpy array (of t's dtype, or float32 for float16 / bfloat16
    bits: normengine._lite's torch-free load). A strided or non-CPU t is copied in one go."""
    arrays = isinstance(t, np.ndarray)
    if out is None:
        import torch

        out = torch.empty(t.shape, dtype=dtype, device=t.device)
    rows = t.shape[0] if t.ndim else 1
    row_bytes = max(1, t[0].nbytes) if t.ndim and rows else 1
    step = max(1, chunk_bytes // row_bytes)
    if t.ndim == 0 or not (t.flags.c_contiguous if arrays else t.is_contiguous() and t.device.type == "cpu"):
        _copy_into(out, t)
        return out
    for r0 in range(0, rows, step):
        block = t[r0:r0 + step]
        _copy_into(out[r0:r0 + step], block)
        release_range(*_span(block))
    return out


def _copy_into(dst, src) -> None:
    """dst = src in dst's dtype (torch tensors; or numpy arrays, bfloat16 bits widened exactly)."""
    if not isinstance(src, np.ndarray):
        dst.copy_(src)
    elif is_bf16(src) and not is_bf16(dst):
        dst[...] = bf16_to_f32(src)
    else:
        np.copyto(dst, src, casting="safe")


def live_maps() -> list:
    """(start, end) of every live mapping this module made (to tell a load's own mappings apart)."""
    return [(a, b) for a, b, ref in _MAPS if ref() is not None]


def release_unused(keep, maps=None) -> int:
    """Drop the resident pages of every live mapping except those under the tensors in `keep` (and
    the pages they share with a neighbour). A loader calls it once the model's tensors are final:
    whatever else of the file was touched while converting (the sources of transposed or converted
    weights, and the neighbours that a fault maps along with a small tensor: the kernel maps a whole
    cached folio, up to megabytes, around the faulting page) leaves this process. Pages of a mapping
    are clean or belonged to tensors the caller dropped, so nothing still read loses data. Returns the
    bytes released. maps: only these (start, end) mappings (those one load made: another model's
    mapped, possibly written pages are not this call's to drop); default every live one."""
    libc = ctypes.CDLL(None, use_errno=True)
    spans = [_span(t) for t in keep]
    spans = [sp for sp in spans if sp[1] > sp[0]]
    released = 0
    for start, end, ref in _MAPS:
        if ref() is None or (maps is not None and (start, end) not in maps):
            continue
        kept = sorted((max(lo, start), min(hi, end)) for lo, hi in spans if lo < end and hi > start)
        cursor = start
        tail = -(-end // _PAGE) * _PAGE  # the mapping covers its last page whole
        for lo, hi in kept + [(tail, tail)]:
            a, b = -(-cursor // _PAGE) * _PAGE, lo // _PAGE * _PAGE
            if b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED) == 0:
                released += b - a
            cursor = max(cursor, hi)
    return released


def _span(t) -> Tuple[int, int]:
    """[first, last + 1) byte addresses of a CPU torch tensor or a C-contiguous numpy array ((0, 0) for
    anything else: a CUDA tensor, an empty one)."""
    if isinstance(t, np.ndarray):
        return (t.ctypes.data, t.ctypes.data + t.nbytes) if t.size and t.flags.c_contiguous else (0, 0)
    from ..ops._tensor import byte_span

    return byte_span(t) if t.device.type == "cpu" else (0, 0)


def map_safetensors(path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Map every tensor of a safetensors file as a numpy array (zero-copy, copy-on-write; bfloat16 as
    BF16-tagged uint16, see is_bf16). Returns (arrays, metadata)."""
    path = os.fspath(path)
    entries, metadata, _ = read_header(path)
    mm = None
    if any(e["end"] > e["begin"] for e in entries.values()):
        try:
            mm = np.memmap(path, dtype=np.uint8, mode="c")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map safetensors file: {e}") from e
        _register_map(mm)
    out = {}
    for name, e in entries.items():
        ndtype = _DTYPES[e["dtype"]][1]
        if e["end"] == e["begin"]:
            out[name] = np.empty(e["shape"], dtype=ndtype)
            continue
        arr = mm[e["begin"] : e["end"]]
        if e["begin"] % ndtype.itemsize:  # unaligned tensor (legal, unusual): copy to aligned memory
            arr = np.array(arr, copy=True)
        out[name] = arr.view(ndtype).reshape(e["shape"])
    return out, dict(metadata)


def as_torch(a: np.ndarray):
    """A torch tensor sharing a numpy array's memory (bfloat16 for a BF16 array)."""
    import torch

    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if is_bf16(a) else t


def read_safetensors(path):
    """Map every tensor of a safetensors file as torch tensors (zero-copy, copy-on-write). Returns
    (tensors, metadata)."""
    arrays, metadata = map_safetensors(path)
    return {name: as_torch(a) for name, a in arrays.items()}, metadata


def _tensor_bytes(t) -> memoryview:
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (CPU or not, any strides) to a safetensors file, atomically (temp file + rename).
    Each tensor is written separately: callers dedupe shared tensors before."""
    import torch

    to_st = _torch_to_st()
    path = os.fspath(path)
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ArgumentError(f"metadata: keys and values must be str, got {k!r}: {type(v).__name__}")
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ArgumentError(f"tensors: invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"tensors['{name}']: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in to_st:
            raise ArgumentError(
                f"tensors['{name}']: dtype {t.dtype} cannot be stored (supported: "
                f"{', '.join(str(d) for d in to_st)})"
            )
        items.append((name, t))
    # decreasing item size keeps every tensor aligned to its item size, with no holes
    items.sort(key=lambda it: (-it[1].element_size(), it[0]))
    header = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": to_st[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-(8 + len(hjson)) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(hjson).to_bytes(8, "little"))
            f.write(hjson)
            for _, t in items:
                f.write(_tensor_bytes(t))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


__all__ = ["read_header", "read_safetensors", "write_safetensors", "SUPPORTED_DTYPES", "MAX_HEADER_BYTES"]
