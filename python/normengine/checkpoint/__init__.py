"""Checkpoints in, canonical state dict + ModelConfig out (and our own format back to disk).

    cfg, tensors = load_checkpoint("path/to/hf_model_dir", dtype=None)
    save_checkpoint("out_dir", cfg, tensors)

Reading is safe: safetensors through our own validating, memory-mapping reader (safetensors_io);
pickles (.bin/.pt) only with torch.load(weights_only=True). Supported source architectures:
SUPPORTED_ARCHITECTURES. Never imports transformers. Importing this package imports no torch (the
submodules that need it, api and hf, load on first use of their names): normengine.load of a
checkpoint Model.save wrote reads it through readers and safetensors_io alone."""

import importlib

_LAZY = {
    "load_checkpoint": "api",
    "save_checkpoint": "api",
    "check_tensors": "api",
    "NORMENGINE_ARCHITECTURE": "api",
    "SUPPORTED_ARCHITECTURES": "hf",
    "read_header": "safetensors_io",
    "read_safetensors": "safetensors_io",
    "write_safetensors": "safetensors_io",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "load_checkpoint",
    "save_checkpoint",
    "check_tensors",
    "SUPPORTED_ARCHITECTURES",
    "NORMENGINE_ARCHITECTURE",
    "read_header",
    "read_safetensors",
    "write_safetensors",
]
