"""load_checkpoint / save_checkpoint: checkpoint files <-> (ModelConfig, canonical tensors)."""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Tuple

import torch

from ..config import ModelConfig
from ..errors import ArgumentError, CheckpointError
from . import hf
from . import gguf
from .gguf import gguf_config, gguf_path, gguf_tensors
from .hf import from_hf as _from_hf
from .readers import (CONFIG_NAME, META_ALIASES, META_CONFIG, SAFE_WEIGHTS, check_tensors, locate, normengine_config,
                      read_located, restore_aliases)
from .safetensors_io import write_safetensors

NORMENGINE_ARCHITECTURE = "NormEngineModel"

_DTYPES = {
    torch.float32: torch.float32,
    torch.bfloat16: torch.bfloat16,
    torch.float16: torch.float16,
    torch.float64: torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def _target_dtype(dtype):
    if dtype is None:
        return None
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError):
        raise ArgumentError(
            f"dtype: expected None, torch.float32, torch.bfloat16, torch.float16 or torch.float64, got {dtype!r}"
        ) from None


def _convert(tensors: Dict[str, torch.Tensor], dtype) -> Dict[str, torch.Tensor]:
    """Floating tensors to dtype; tensors shared before stay shared."""
    if dtype is None:
        return tensors
    memo = {}
    out = {}
    for k, t in tensors.items():
        if id(t) not in memo:
            memo[id(t)] = t.to(dtype) if t.is_floating_point() else t
        out[k] = memo[id(t)]
    return out


def load_checkpoint(path, dtype=None, *, transposed_views: bool = False,
                    gguf_repack: str | None = None) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """Load a checkpoint as (ModelConfig, {canonical name: tensor}).

    path: a Hugging Face-style directory (config.json + model.safetensors, sharded safetensors with
    model.safetensors.index.json, pytorch_model.bin or sharded pytorch_model.bin.index.json); a single
    .safetensors / .pt / .pth / .bin state-dict file (or an *.index.json) with config.json beside it;
    or a directory written by save_checkpoint (a lone model.safetensors written by it also loads
    without config.json); or a GGUF file (llama.cpp's format; or a directory holding one and no
    config.json: see checkpoint.gguf). Supported architectures: hf.SUPPORTED_ARCHITECTURES (GGUF:
    gguf.ARCHITECTURES).

    dtype: None keeps the stored dtype (tensors then map the file, copy-on-write); else
    torch.float32 / bfloat16 / float16 / float64 converts the floating tensors (integer ones stay).

    transposed_views: a GPT-2 checkpoint's Conv1D weights come back as transposed (non-contiguous)
    views of the stored ones instead of contiguous copies (see hf.map_tensors): for a caller that
    rewrites them anyway.

    gguf_repack: "int4" / "int8-weight": a GGUF file's linear weights whose blocks that format holds (int4:
    Q4_0 / Q4_1 / Q4_K; int8-weight: every quantized type) come back as their exact packing (QuantizedWeight
    objects: gguf.repack_exact), not as values; "auto": every quantized linear weight (and an untied token
    embedding) packed in the format that holds its blocks exactly (gguf.EXACT), float weights as stored.

    Tensors are CPU tensors. A tied head is returned as one tensor object under both tok_emb.weight
    and lm_head.weight. cfg.source_dtype is the dtype the checkpoint stores (not `dtype`).
    """
    target = _target_dtype(dtype)
    gpath = gguf_path(path)
    if gpath is not None:
        config, g = gguf_config(gpath)
        arch = hf.architecture_of(config, gpath)
        hf_cfg = hf.parse_config(arch, config, gpath)
        packed, whole = gguf.repack_exact(g, hf_cfg, gguf_repack) if gguf_repack else ({}, ())
        raw_tensors, origin = gguf_tensors(g, config, placeholders=whole)
        cfg, tensors = _from_hf(arch, hf_cfg, raw_tensors, config, gpath, origin, transposed_views)
        tensors = _convert(tensors, target)
        tensors.update(packed)
        return cfg, tensors
    loc = locate(path)
    where = loc.root
    arch = hf_cfg = None
    if loc.config is not None and "normengine" not in loc.config:
        # the architecture and its options are checked before any weight is touched
        arch = hf.architecture_of(loc.config, loc.config_path)
        hf_cfg = hf.parse_config(arch, loc.config, loc.config_path, loc.generation_config)
    raw = read_located(loc)
    cfg = normengine_config(raw) if arch is None else None
    if cfg is not None:
        tensors = dict(raw.tensors)
        restore_aliases(raw, tensors)
        if "lm_head.weight" not in tensors and cfg.tied_head and "tok_emb.weight" in tensors:
            tensors["lm_head.weight"] = tensors["tok_emb.weight"]
        prov = {k: f"'{k}' in {raw.origin[k]}" for k in raw.tensors}
        check_tensors(cfg, tensors, where, prov)
    else:
        if arch is None:
            raise CheckpointError(
                f"{where}: no {CONFIG_NAME} beside the weights (needed to know the architecture and sizes)"
            )
        cfg, tensors = _from_hf(arch, hf_cfg, raw.tensors, raw.config, where, raw.origin, transposed_views)
    return cfg, _convert(tensors, target)


def save_checkpoint(path_dir, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write cfg and canonical tensors to directory `path_dir` (created if needed): config.json
    ({"architectures": ["NormEngineModel"], "model_type": "normengine", "normengine": cfg.to_dict()})
    and model.safetensors (metadata: format "pt", normengine_config, normengine_aliases). Tensors
    that are the same memory (same storage, offset, shape, strides and dtype, e.g. a tied head) are
    stored once and loaded back as one shared tensor. Files are replaced atomically."""
    if not isinstance(cfg, ModelConfig):
        raise ArgumentError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(tensors, Mapping):
        raise ArgumentError(f"tensors: expected a dict of name -> tensor, got {type(tensors).__name__}")
    for k, t in tensors.items():
        if not isinstance(k, str):
            raise ArgumentError(f"tensors: names must be str, got {k!r}")
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"tensors['{k}']: expected a torch.Tensor, got {type(t).__name__}")
    check_tensors(cfg, tensors, "tensors", error=ArgumentError)

    stored, aliases, seen = {}, {}, {}
    for k, t in tensors.items():
        if t.numel() > 0 and t.device.type != "meta":
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                aliases[k] = seen[key]
                continue
            seen[key] = k
        stored[k] = t
    meta = {
        "format": "pt",
        META_CONFIG: cfg.to_json(),
        META_ALIASES: json.dumps(aliases, sort_keys=True),
    }
    d = os.fspath(path_dir)
    if os.path.exists(d) and not os.path.isdir(d):
        raise ArgumentError(f"path_dir: {d} exists and is not a directory")
    os.makedirs(d, exist_ok=True)
    write_safetensors(os.path.join(d, SAFE_WEIGHTS), stored, meta)
    config = {"architectures": [NORMENGINE_ARCHITECTURE], "model_type": "normengine", "normengine": cfg.to_dict()}
    cpath = os.path.join(d, CONFIG_NAME)
    tmp = f"{cpath}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, cpath)


__all__ = ["load_checkpoint", "save_checkpoint", "check_tensors", "NORMENGINE_ARCHITECTURE"]
