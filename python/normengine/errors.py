"""Exceptions raised by normengine. Each message names the argument, tensor or file at fault and
what was expected. They subclass the builtin exception a caller would catch anyway (ValueError,
TypeError), so ``except ValueError`` keeps working."""


class NormEngineError(Exception):
    """Base class of every normengine error."""


class ShapeError(NormEngineError, ValueError):
    """A tensor's shape or layout does not fit the operation."""


class DTypeError(NormEngineError, TypeError):
    """A tensor has an unsupported or mismatched dtype, or is not a tensor at all."""


class DeviceError(NormEngineError, ValueError):
    """Tensors on different devices, or on a device this build cannot run on."""


class UnsupportedError(NormEngineError, ValueError):
    """A valid request that normengine does not implement (architecture, conversion, format)."""


class ArgumentError(NormEngineError, ValueError):
    """A bad scalar argument (negative eps, unknown option, ...)."""


class CheckpointError(NormEngineError, ValueError):
    """A checkpoint file that is missing, truncated, corrupt, unsafe or inconsistent with its config."""


class NumericalError(NormEngineError, ArithmeticError):
    """A computation produced NaN / Inf where a result must be finite (e.g. the logits a token is
    sampled from)."""


__all__ = [
    "NormEngineError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "UnsupportedError",
    "ArgumentError",
    "CheckpointError",
    "NumericalError",
]
