"""normengine: normalization fused into linear layers, L-Mul, quantized GEMMs and linear attention as
native CPU/CUDA kernels, with PyTorch autograd ops and a native transformer runner."""

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


from . import ops  # noqa: E402
from . import nn  # noqa: E402
from . import reference  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .model import Model, load  # noqa: E402

__all__ = [
    "load",
    "Model",
    "ModelConfig",
    "ops",
    "nn",
    "reference",
    "errors",
    "set_num_threads",
    "num_threads",
    "cpu_isa",
    "int8_kernel",
    "cuda_available",
    "NormEngineError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "UnsupportedError",
    "ArgumentError",
    "CheckpointError",
    "NumericalError",
]
