"""normengine.load without torch, for a checkpoint Model.save wrote.

Such a checkpoint holds canonical tensors with the norms' gains already folded into the linear layers
(config.conversions has "fold_norm_affine"), so loading it is only: map the safetensors files (numpy
arrays, no torch), copy every weight into its slot of the huge-page arena (norm gains and biases
widened to float32, everything else in its stored dtype), and hand the slots to the runner. That is
what llama.cpp does with a GGUF file, and like it the process then holds little beside the weights:
`import torch` alone is ~200 MB of memory, 40% of a 124M-parameter fp32 model.

load() returns None whenever anything needs the torch path: a Hugging Face checkpoint (its names,
layouts and norms are converted with torch), a pickle, a quantized checkpoint, a norm conversion,
an unexpected tensor, name, shape or dtype (the torch path then raises its error naming it).
"""

from __future__ import annotations

import numpy as np

from ._arena import Arena
from .checkpoint.readers import locate, normengine_config, read_located, restore_aliases, weight_files
from .checkpoint.safetensors_io import is_bf16, release_range
from .config import iter_expected_shapes
from .model import Model, _adjacent_order, _is_vector

_FLOATS = ("float32", "float16", "bfloat16")
_CHUNK_BYTES = 8 << 20


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if is_bf16(a) else a.dtype.name


def _convert_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """dst = src in dst's dtype: the same dtype, or float16 / bfloat16 widened to float32 (exact)."""
    if is_bf16(src) and not is_bf16(dst):
        dst[...] = (src.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is float32's upper half
    else:
        np.copyto(dst, src, casting="safe")


def _copy_releasing(src: np.ndarray, dst: np.ndarray) -> None:
    """Copy a mapped, C-contiguous src into dst (same shape) in row blocks of about 8 MB, each block's
    pages of the file handed back once copied: the mapped copy is never resident whole beside the
    arena's (as checkpoint.safetensors_io.copy_releasing does for torch tensors)."""
    rows = src.shape[0] if src.ndim else 1
    s2, d2 = src.reshape(rows, -1), dst.reshape(rows, -1)
    step = max(1, _CHUNK_BYTES // max(1, s2[0].nbytes))
    for r0 in range(0, rows, step):
        block = s2[r0:r0 + step]
        _convert_rows(d2[r0:r0 + step], block)
        release_range(block.ctypes.data, block.ctypes.data + block.nbytes)


def load(path: str, *, norm=None, arithmetic=None, lmul_bits: int = 4, lmul_scope: str = "attention",
         matmul_precision: str = "highest"):
    """The Model of a checkpoint Model.save wrote, read and placed without torch; None when this
    checkpoint (or the options) need normengine.load's torch path. Errors in what both paths read
    (a missing path, a corrupt header or index, a bad normengine config) raise here as they would there."""
    loc = locate(path)
    if loc.config is not None and "normengine" not in loc.config:
        return None  # a Hugging Face checkpoint: mapped to canonical names and folded with torch
    files = weight_files(loc)
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None
    raw = read_located(loc, arrays=True)
    cfg = normengine_config(raw)
    if cfg is None or cfg.quantization is not None or (norm is not None and norm != cfg.norm):
        return None
    if cfg.norm != "none" and "fold_norm_affine" not in cfg.conversions:
        return None  # the gains are still to fold
    arrays = dict(raw.tensors)
    raw.tensors.clear()  # the arrays below are the file's last references: each leaves as it is copied
    restore_aliases(raw, arrays)
    if "lm_head.weight" not in arrays and cfg.tied_head and "tok_emb.weight" in arrays:
        arrays["lm_head.weight"] = arrays["tok_emb.weight"]
    n = 0
    for name, shape in iter_expected_shapes(cfg):  # lazily: stops at the first tensor not stored
        a = arrays.get(name)
        if a is None or tuple(a.shape) != tuple(shape) or _dtype_name(a) not in _FLOATS or not a.flags.c_contiguous:
            return None
        n += 1
    if n != len(arrays):
        return None  # tensors the config does not name
    matrices = [_dtype_name(a) for n, a in arrays.items() if not _is_vector(n)]
    if arithmetic == "lmul" and lmul_scope == "all" and any(d != "float32" for d in matrices):
        return None  # L-Mul reads float32 weights: converted on the torch path
    dtype = next((_dtype_name(a) for n, a in arrays.items() if n.endswith("attn.q.weight")), "float32")

    # One slot per stored tensor (a tied head is the embedding's), in the runner's dtype: float32 for
    # the norms' gains and biases, the stored dtype for the rest; [q; k; v] and [gate; up] adjacent.
    groups: dict = {}
    for name, a in arrays.items():
        groups.setdefault((id(a), _is_vector(name)), []).append(name)
    plans = [(names, arrays[names[0]], np.dtype(np.float32) if vec else arrays[names[0]].dtype)
             for (_, vec), names in groups.items()]
    del arrays, groups
    plans = _adjacent_order(plans, cfg.n_layers)
    arena = Arena(sum(Arena.room(a.shape, want) for _, a, want, _ in plans))
    weights = {}
    for k in range(len(plans)):
        (names, a, want, follow), plans[k] = plans[k], None
        slot = arena.take(a.shape, want, follow)
        _copy_releasing(a, slot)
        for n in names:
            weights[n] = slot
        del a
    return Model._from_arrays(cfg, weights, dtype, path=path, arithmetic=arithmetic, lmul_bits=lmul_bits,
                              lmul_scope=lmul_scope, matmul_precision=matmul_precision)
