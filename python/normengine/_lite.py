"""normengine.load without torch, for a checkpoint Model.save wrote.

Such a checkpoint holds canonical tensors with the norms' gains already folded into the linear layers
(config.conversions has "fold_norm_affine"), so loading it is only: map the safetensors files (numpy
arrays, no torch), copy every weight into its slot of the huge-page arena (norm gains and biases
widened to float32, everything else in its stored dtype), and hand the slots to the runner. That is
what llama.cpp does with a GGUF file, and like it the process then holds little beside the weights:
`import torch` alone is ~200 MB of memory, 40% of a 124M-parameter fp32 model.

A quantized checkpoint's packed parts (`<name>.qdata`, `.qscale`, `.qzero`) are copied as they are and
handed to the runner as packed weights (normengine._packed.QuantizedWeight over numpy arrays).

A GGUF file with quantized weights loads here too (load_gguf): each quantized weight (and an untied token
embedding) unpacked from the file's blocks straight into its slot of the arena in the format that holds them
(normengine.checkpoint.gguf.repack_exact), the norms' gains kept in the norms, as normengine.load's torch path
does with it; the float tensors (norms, a float head) copied from the mapped file.

load() returns None whenever anything needs the torch path: a Hugging Face checkpoint (its names,
layouts and norms are converted with torch), a pickle, a norm conversion, a GGUF file of float weights (its
gains are folded), an unexpected tensor, name, shape or dtype (the torch path then raises its error naming it).
"""

from __future__ import annotations

import numpy as np

from ._arena import Arena
from ._packed import QuantizedWeight, is_quantized
from .checkpoint.readers import locate, normengine_config, read_located, restore_aliases, weight_files
from .checkpoint.safetensors_io import array_dtype_name as _dtype_name
from .checkpoint.safetensors_io import copy_releasing
from .config import _dense_shapes, iter_expected_shapes, quant_of
from .model import Model, _adjacent_order, _is_vector, _parts, _slots

_FLOATS = ("float32", "float16", "bfloat16")
# the dtype of each packed part, by format (normengine._packed.QuantizedWeight's layouts)
_PACKED = {"int8": {"qdata": "int8", "qscale": "float32"},
           "int8-weight": {"qdata": "int8", "qscale": "float32", "qzero": "float32", "qsub": "int8",
                           "qsubzero": "int8"},
           "int4": {"qdata": "uint8", "qscale": "float32", "qzero": "float32", "qsub": "int8", "qsubzero": "int8"},
           "fp8": {"qdata": "uint8", "qscale": "float32"}}


def load(path: str, *, norm=None, arithmetic=None, lmul_bits: int = 4, lmul_scope: str = "attention",
         matmul_precision: str = "highest"):
    """The Model of a checkpoint Model.save wrote, read and placed without torch; None when this
    checkpoint (or the options) need normengine.load's torch path. Errors in what both paths read
    (a missing path, a corrupt header or index, a bad normengine config) raise here as they would there."""
    from .checkpoint.gguf import gguf_path

    gpath = gguf_path(path)
    if gpath is not None:
        return load_gguf(gpath, norm=norm, arithmetic=arithmetic, lmul_bits=lmul_bits, lmul_scope=lmul_scope,
                         matmul_precision=matmul_precision)
    loc = locate(path)
    if loc.config is not None and "normengine" not in loc.config:
        return None  # a Hugging Face checkpoint: mapped to canonical names and folded with torch
    files = weight_files(loc)
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None
    raw = read_located(loc, arrays=True)
    cfg = normengine_config(raw)
    if cfg is None or (norm is not None and norm != cfg.norm):
        return None
    if cfg.norm != "none" and "fold_norm_affine" not in cfg.conversions:
        return None  # the gains are still to fold
    arrays = dict(raw.tensors)
    raw.tensors.clear()  # (the file stays mapped until the last array is copied; its pages leave as copied)
    restore_aliases(raw, arrays)
    if "lm_head.weight" not in arrays and cfg.tied_head and "tok_emb.weight" in arrays:
        arrays["lm_head.weight"] = arrays["tok_emb.weight"]
    count = 0
    for name, shape in iter_expected_shapes(cfg):  # lazily: stops at the first tensor not stored
        a = arrays.get(name)
        base, suffix = name.rsplit(".", 1)
        spec = quant_of(cfg, base) if suffix.startswith("q") else None
        part = _PACKED[spec[0]].get(suffix) if spec else None
        if a is None or tuple(a.shape) != tuple(shape) or not a.flags.c_contiguous or (
                _dtype_name(a) != part if part else _dtype_name(a) not in _FLOATS):
            return None
        count += 1
    if count != len(arrays):
        return None  # tensors the config does not name
    if arithmetic == "lmul" and lmul_scope == "all" and any(
            _dtype_name(a) != "float32" for name, a in arrays.items() if not _is_vector(name)):
        return None  # L-Mul reads float32 weights: converted on the torch path
    dtype = next((_dtype_name(a) for n, a in arrays.items() if n.endswith("attn.q.weight")), "float32")

    weights = _place(cfg, arrays)
    if cfg.quantization is not None:  # each quantized weight's parts as one packed weight (shared ones once)
        memo: dict = {}
        for name, shape in _dense_shapes(cfg).items():
            spec = quant_of(cfg, name)
            if spec is not None:
                got = {k: weights.pop(f"{name}.{k}") for k in _PACKED[spec[0]] if f"{name}.{k}" in weights}
                key = tuple(id(v) for v in got.values())
                if key not in memo:
                    memo[key] = QuantizedWeight.from_tensors(got, spec[0], spec[1], tuple(shape))
                weights[name] = memo[key]
    return Model._from_arrays(cfg, weights, dtype, path=path, arithmetic=arithmetic, lmul_bits=lmul_bits,
                              lmul_scope=lmul_scope, matmul_precision=matmul_precision)


def load_gguf(path: str, *, norm=None, arithmetic=None, lmul_bits: int = 4, lmul_scope: str = "attention",
              matmul_precision: str = "highest"):
    """The Model of a quantized GGUF file, without torch (see the module's docstring); None where the file or the
    options need the torch path."""
    from .checkpoint.gguf import load_arrays

    if norm is not None or (arithmetic == "lmul" and lmul_scope == "all"):
        return None  # a norm conversion, or L-Mul over float32 weights: torch's path (it raises if it cannot)
    got = load_arrays(path)
    if got is None:
        return None
    cfg, arrays = got
    if any(not is_quantized(a) and _dtype_name(a) not in _FLOATS for a in arrays.values()):
        return None  # (torch's path names the tensor of an unexpected dtype)
    dtype = next((_dtype_name(a) for n, a in arrays.items() if n.endswith("attn.q.weight") and not is_quantized(a)),
                 "float32")
    weights = _place(cfg, arrays)
    return Model._from_arrays(cfg, weights, dtype, path=path, arithmetic=arithmetic, lmul_bits=lmul_bits,
                              lmul_scope=lmul_scope, matmul_precision=matmul_precision)


def _place(cfg, arrays: dict) -> dict:
    """The runner's weights from `arrays` (emptied: each source is dropped once copied): one slot per stored
    tensor (a tied head is the embedding's) of one huge-page arena, in the runner's dtype: float32 for the norms'
    gains and biases, the stored dtype for the rest; [q; k; v] and [gate; up] adjacent. A packed weight (a GGUF
    file's GGUFPacked) writes its parts into slots of their own."""
    plans = [(names, a, None if is_quantized(a) else np.dtype(np.float32) if vec else a.dtype)
             for names, a, vec in _slots(arrays)]
    arrays.clear()
    plans = _adjacent_order(plans, cfg.n_layers)
    arena = Arena(sum(Arena.room(p.shape, p.dtype if want is None else want) for _, a, want, _ in plans
                      for p in _parts(a)))
    weights = {}
    for k in range(len(plans)):
        (names, a, want, follow), plans[k] = plans[k], None
        if want is None:
            parts = {key: arena.take(p.shape, p.dtype) for key, p in a.tensors().items()}
            a.write_into(parts)
            slot = QuantizedWeight.from_tensors(parts, a.format, a.group_size, a.shape)
        else:
            slot = arena.take(a.shape, want, follow)
            copy_releasing(a, out=slot)  # (a view of a mapped file: each block's pages handed back once copied)
        for n in names:
            weights[n] = slot
        del a
    return weights
