"""normengine: normalization fused into linear layers, L-Mul, quantized GEMMs and linear attention as
native CPU/CUDA kernels, with PyTorch autograd ops and a native transformer runner."""

import sys

from . import _C
from . import errors
from .errors import (
    ArgumentError,
    CheckpointError,
    DeviceError,
    DTypeError,
    NormEngineError,
    NumericalError,
    ShapeError,
    UnsupportedError,
)

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (n <= 0: one per available core). The default honours
    the NORMENGINE_NUM_THREADS environment variable, else the process's CPU affinity."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise ArgumentError(f"n: expected an int, got {type(n).__name__}")
    _C.set_num_threads(n)


def num_threads() -> int:
    """Threads the CPU kernels use."""
    return _C.num_threads()


def cpu_isa() -> str:
    """The CPU kernels chosen for this machine: 'avx512bf16', 'avx512', 'avx2' or 'generic'."""
    return _C.cpu_isa()


def int8_kernel() -> str:
    """The W8A8 int8 GEMM kernel in use: 'amx' (Sapphire Rapids tile multiply), 'avx512vnni',
    'avxvnni' or 'isa' (the AVX2 vpmaddubsw / scalar kernel of cpu_isa()), picked at run time."""
    return _C.int8_kernel()


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a GPU is visible."""
    return _C.cuda_available()


def empty_cache() -> int:
    """Hand the host cache's free blocks back to the system; returns the bytes released.

    The CPU outputs of 8 MiB or more that the ops allocate come from a cache of faulted-in blocks
    (as torch's CUDA caching allocator; see normengine.ops._tensor.empty): a freed output's block is
    kept for the next one of about its size, up to a limit (default min(1 GiB, RAM / 8); the
    NORMENGINE_CPU_CACHE_MB environment variable or set_cache_limit sets it)."""
    return _C.host_cache_empty()


def cache_info() -> dict:
    """The host cache: cached_bytes (free blocks kept), in_use_bytes (blocks held by live tensors),
    limit_bytes, hits and misses (requests served from the cache / that mapped a new block)."""
    return _C.host_cache_stats()


def set_cache_limit(nbytes: int) -> None:
    """Keep at most nbytes of free blocks in the host cache (0: no cache; the ops' outputs are then
    torch.empty's, as torch allocates its own)."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise ArgumentError(f"nbytes: expected an int, got {type(nbytes).__name__}")
    if not 0 <= nbytes < 2**63:
        raise ArgumentError(f"nbytes: expected 0 <= nbytes < 2**63, got {nbytes}")
    _C.host_cache_set_limit(nbytes)


from .config import ModelConfig  # noqa: E402
from .model import Generation, Model, load  # noqa: E402

# ops, nn and reference are torch code: they are imported on first use (normengine.ops, or
# `from normengine import ops`), so that a process that only loads and generates never imports torch
# (normengine.load of a checkpoint Model.save wrote needs none). Where torch is already imported they
# load at once, which also registers the torch.ops.normengine custom ops as before.
_TORCH_SUBMODULES = ("ops", "nn", "reference", "evaluate")


def __getattr__(name):
    if name in _TORCH_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "torch" in sys.modules:
    from . import nn, ops, reference  # noqa: E402,F401

__all__ = [
    "load",
    "Model",
    "Generation",
    "ModelConfig",
    "ops",
    "nn",
    "reference",
    "evaluate",
    "errors",
    "set_num_threads",
    "num_threads",
    "cpu_isa",
    "int8_kernel",
    "cuda_available",
    "empty_cache",
    "cache_info",
    "set_cache_limit",
    "NormEngineError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "UnsupportedError",
    "ArgumentError",
    "CheckpointError",
    "NumericalError",
]
