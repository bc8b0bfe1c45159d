"""Checkpoints in, canonical state dict + ModelConfig out (and our own format back to disk).

    cfg, tensors = load_checkpoint("path/to/hf_model_dir", dtype=None)
    save_checkpoint("out_dir", cfg, tensors)

Reading is safe: safetensors through our own validating, memory-mapping reader (safetensors_io);
pickles (.bin/.pt) only with torch.load(weights_only=True). Supported source architectures:
SUPPORTED_ARCHITECTURES. Never imports transformers."""

from .api import NORMENGINE_ARCHITECTURE, check_tensors, load_checkpoint, save_checkpoint
from .hf import SUPPORTED_ARCHITECTURES
from .safetensors_io import read_header, read_safetensors, write_safetensors

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
