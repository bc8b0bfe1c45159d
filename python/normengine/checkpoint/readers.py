"""Finding and reading checkpoint files, format by format, into a flat {name: tensor} dict with the
checkpoint's own names. Nothing here knows about architectures (see hf.py) or canonical names.

Safety: safetensors files go through our own validating reader (safetensors_io.py); pickle-based
files (.bin, .pt, .pth) only through ``torch.load(weights_only=True)``, which builds tensors and plain
containers and refuses every other global, so a malicious pickle raises CheckpointError and runs
nothing.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..config import ModelConfig, iter_expected_shapes
from ..errors import ArgumentError, CheckpointError
from .safetensors_io import map_safetensors, read_safetensors

# torch is imported only to read pickles (and to wrap safetensors as tensors): locating a checkpoint
# and mapping its safetensors as numpy arrays (read_located(arrays=True)) run without it.

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
# looked for in this order in a directory (the order transformers uses)
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, PT_WEIGHTS, PT_INDEX)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# safetensors metadata of a checkpoint Model.save wrote (checkpoint/api.save_checkpoint)
META_CONFIG = "normengine_config"
META_ALIASES = "normengine_aliases"


@dataclass
class RawCheckpoint:
    """A checkpoint's tensors under their stored names, plus where each came from."""

    root: str                                   # the path the caller gave
    tensors: Dict[str, torch.Tensor]
    origin: Dict[str, str]                      # tensor name -> file it was read from
    metadata: List[Tuple[str, Dict[str, str]]]  # (file, safetensors __metadata__) per safetensors file
    config: Optional[dict] = None               # parsed config.json, None when there is none
    config_path: Optional[str] = None
    generation_config: Optional[dict] = None
    files: List[str] = field(default_factory=list)


def read_json(path, what="JSON file") -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt {what}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: corrupt {what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_pickle(path) -> Dict[str, torch.Tensor]:
    """A pickled state dict (torch.save), loaded with weights_only=True and memory-mapped when the
    file is in torch's zip format (mmap=False for legacy files)."""
    import torch

    path = os.fspath(path)

    def load(mmap):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)
        except pickle.UnpicklingError:
            raise
        except Exception:  # legacy (non-zip) file: mmap unsupported; try again without
            obj = load(False)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only" in msg.lower() or "weights_only" in msg.lower():
            detail = next((ln.strip() for ln in msg.splitlines() if "WeightsUnpickler error" in ln), "")
            detail = detail.split(". Please use")[0]  # drop torch's advice to allowlist the global
            raise CheckpointError(
                f"{path}: refused to load: the pickle references code or objects other than tensors and plain "
                f"containers, which weights_only=True forbids (nothing was run); prefer safetensors"
                + (f" ({detail})" if detail else "")
            ) from None
        raise CheckpointError(f"{path}: corrupt pickled checkpoint: {msg}") from None
    except Exception as e:  # zip, pickle and storage errors of every kind: the file is bad
        raise CheckpointError(f"{path}: cannot load pickled checkpoint (truncated or corrupt?): {e}") from e

    return _state_dict_of(obj, path)


def _state_dict_of(obj, path) -> Dict[str, torch.Tensor]:
    import torch

    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors found (expected a state dict: tensor names -> tensors)")
    return sd


def _safe_join(directory, name, index_path):
    if (
        not isinstance(name, str)
        or not name
        or os.path.isabs(name)
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name in (".", "..")
    ):
        raise CheckpointError(f"{index_path}: invalid shard file name {name!r} (must be a plain file name)")
    return os.path.join(directory, name)


def _read_file(path, arrays: bool = False) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]:
    if path.endswith(".safetensors"):
        return map_safetensors(path) if arrays else read_safetensors(path)
    if arrays:
        raise CheckpointError(f"{path}: not a safetensors file (numpy arrays are read from safetensors only)")
    if path.endswith(PICKLE_SUFFIXES):
        return read_pickle(path), None
    raise CheckpointError(
        f"{path}: unknown checkpoint file type (expected .safetensors, or a torch.save pickle: "
        f"{', '.join(PICKLE_SUFFIXES)})"
    )


def _files_of_index(index_path) -> Tuple[List[str], Dict[str, str]]:
    idx = read_json(index_path, "checkpoint index")
    wm = idx.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: corrupt checkpoint index: 'weight_map' must be a non-empty object")
    directory = os.path.dirname(os.path.abspath(index_path))
    files, expected = [], {}
    for name, shard in wm.items():
        p = _safe_join(directory, shard, index_path)
        if p not in files:
            files.append(p)
        expected[name] = p
    for p in files:
        if not os.path.isfile(p):
            raise CheckpointError(f"{index_path}: shard file {os.path.basename(p)!r} is missing")
    return files, expected


def read_weights(files, root, expected=None, index_path=None, arrays: bool = False) -> RawCheckpoint:
    raw = RawCheckpoint(root=root, tensors={}, origin={}, metadata=[], files=list(files))
    for p in files:
        tensors, meta = _read_file(p, arrays)
        if meta is not None:
            raw.metadata.append((p, meta))
        for k, t in tensors.items():
            if k in raw.tensors:
                raise CheckpointError(f"{root}: tensor '{k}' is stored twice: in {raw.origin[k]} and in {p}")
            raw.tensors[k] = t
            raw.origin[k] = p
    for k, p in (expected or {}).items():
        if raw.origin.get(k) != p:
            found = f"found in {raw.origin[k]}" if k in raw.origin else "not found in any shard"
            raise CheckpointError(f"{index_path}: tensor '{k}' is listed in shard {os.path.basename(p)!r} but {found}")
    return raw


@dataclass
class Located:
    """Where a checkpoint's files are; configs read, weights not yet."""

    root: str                         # the path the caller gave
    directory: str
    weights: Optional[str]            # weight file or *.index.json; None when none was found
    looked_for: Tuple[str, ...]       # file names tried in a directory
    config: Optional[dict] = None
    config_path: Optional[str] = None
    generation_config: Optional[dict] = None
    index: Optional[Tuple[List[str], Dict[str, str]]] = None  # an index's (shard files, tensor -> file), once read


def locate(path) -> Located:
    """Find config.json (in the directory, or beside the file) and the weight file for `path` (a
    directory, a weight file, or an *.index.json), reading only the JSON configs."""
    root = os.fspath(path)
    if not os.path.exists(root):
        raise CheckpointError(f"{root}: no such checkpoint file or directory")
    if os.path.isdir(root):
        directory = root
        config_path = os.path.join(root, CONFIG_NAME)
        config = read_json(config_path, "model config") if os.path.isfile(config_path) else None
        order = WEIGHT_FILES
        if config is not None and "normengine" in config:
            order = (SAFE_WEIGHTS, SAFE_INDEX)  # ours: ignore stale files of another format
        weights = next((os.path.join(root, n) for n in order if os.path.isfile(os.path.join(root, n))), None)
        if config is None:
            config_path = None
    else:
        directory = os.path.dirname(os.path.abspath(root))
        weights, order = root, ()
        config_path = os.path.join(directory, CONFIG_NAME)
        config = None
        if os.path.isfile(config_path) and os.path.abspath(config_path) != os.path.abspath(root):
            config = read_json(config_path, "model config")
        else:
            config_path = None
    loc = Located(root, directory, weights, tuple(order), config, config_path)
    gen_path = os.path.join(directory, GENERATION_CONFIG_NAME)
    if config is not None and os.path.isfile(gen_path):
        try:
            loc.generation_config = read_json(gen_path, "generation config")
        except CheckpointError:
            loc.generation_config = None  # optional; a broken one only loses the token ids it holds
    return loc


def _shards(loc: Located) -> Tuple[List[str], Dict[str, str]]:
    """The shard files and tensor -> shard map of the index `locate` found, read once per Located
    (weight_files, then read_located, ask for it)."""
    if loc.index is None:
        loc.index = _files_of_index(loc.weights)
    return loc.index


def weight_files(loc: Located) -> List[str]:
    """The weight files `locate` found (the shards of an index), without reading them."""
    if loc.weights is None:
        return []
    return list(_shards(loc)[0]) if loc.weights.endswith(".index.json") else [loc.weights]


def read_located(loc: Located, arrays: bool = False) -> RawCheckpoint:
    """Read (map) the weights `locate` found: torch tensors, or with arrays=True numpy arrays
    (safetensors files only; see safetensors_io.map_safetensors)."""
    weights, root = loc.weights, loc.root
    if weights is None:
        raise CheckpointError(f"{root}: no weights found (looked for {', '.join(loc.looked_for)})")
    if weights.endswith(".index.json"):
        files, expected = _shards(loc)
        raw = read_weights(files, root, expected, weights, arrays)
    elif weights.endswith(".json"):
        raise CheckpointError(f"{weights}: a JSON file is not a checkpoint (give its directory, or an *.index.json)")
    else:
        raw = read_weights([weights], root, arrays=arrays)
    raw.config, raw.config_path, raw.generation_config = loc.config, loc.config_path, loc.generation_config
    return raw


def normengine_config(raw):
    """The ModelConfig of a normengine-saved checkpoint (config.json, else the safetensors
    metadata), or None for any other checkpoint."""
    if raw.config is not None and "normengine" in raw.config:
        d, where = raw.config["normengine"], raw.config_path
    else:
        found = next(((f, m[META_CONFIG]) for f, m in raw.metadata if META_CONFIG in m), None)
        if found is None:
            return None
        where = f"{found[0]} (metadata '{META_CONFIG}')"
        try:
            d = json.loads(found[1])
        except ValueError as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: the normengine config must be an object, got {type(d).__name__}")
    try:
        return ModelConfig.from_dict(d)
    except (ArgumentError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid normengine config: {e}") from e


def restore_aliases(raw, tensors):
    for f, meta in raw.metadata:
        if META_ALIASES not in meta:
            continue
        try:
            aliases = json.loads(meta[META_ALIASES])
            ok = isinstance(aliases, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
            )
        except ValueError:
            ok = False
        if not ok:
            raise CheckpointError(f"{f}: corrupt metadata '{META_ALIASES}': expected a JSON object of names")
        for alias, target in aliases.items():
            if alias in tensors:
                raise CheckpointError(f"{f}: tensor '{alias}' is stored and also recorded as an alias of '{target}'")
            if target not in tensors:
                raise CheckpointError(f"{f}: tensor '{alias}' is an alias of '{target}', which is missing")
            tensors[alias] = tensors[target]


def read_checkpoint(path) -> RawCheckpoint:
    """locate + read_located: configs (when present) and every tensor under its stored name."""
    return read_located(locate(path))



def _is_tensor(t) -> bool:
    """A torch tensor (without importing torch: a process that has not imported it holds none) or a numpy array."""
    import sys

    torch = sys.modules.get("torch")
    return isinstance(t, np.ndarray) or (torch is not None and isinstance(t, torch.Tensor))


def check_tensors(cfg: ModelConfig, tensors, where: str, provenance=None, source=None, error=CheckpointError) -> None:
    """Every tensor expected_shapes(cfg) names is present with its shape (a torch tensor, or a numpy array on the
    torch-free path); raises `error` naming the tensor, its expected and found shape (and where it came from)."""
    provenance = provenance or {}
    for name, shape in iter_expected_shapes(cfg):
        t = tensors.get(name)
        if t is None:
            src = source(name) if source else None
            frm = f" (stored as '{src}')" if src else ""
            raise error(f"{where}: missing tensor '{name}'{frm}: expected shape {tuple(shape)}, found none")
        if not _is_tensor(t):
            raise error(f"{where}: tensor '{name}': expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            frm = f" (from {provenance[name]})" if name in provenance else ""
            raise error(
                f"{where}: tensor '{name}'{frm} has the wrong shape for the config: expected {tuple(shape)}, "
                f"found {tuple(t.shape)}"
            )


__all__ = [
    "RawCheckpoint",
    "check_tensors",
    "Located",
    "locate",
    "read_located",
    "read_checkpoint",
    "read_pickle",
    "read_json",
    "read_weights",
    "WEIGHT_FILES",
]
