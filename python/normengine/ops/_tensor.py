"""Argument checks and layout preparation shared by every op wrapper.

The native kernels take views of torch tensors (zero-copy, through DLPack); these helpers make
sure what reaches them is valid, raising normengine errors that name the argument, and make a
tensor contiguous only when its layout cannot be read as rows of its last dimension."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .. import _C
from ..config import bf16_products  # noqa: F401 (the ops take it from here)
from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / statistics dtype for tensors of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_CACHED = 8 << 20  # outputs this large come from the host cache (glibc often maps them afresh otherwise)


def torch_empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty with empty()'s signature: what the ops' fake (tracing) functions allocate with."""
    return torch.empty(shape, dtype=dtype, device=device)


def empty(shape, dtype, device) -> torch.Tensor:
    """A new contiguous output tensor; on the CPU, one of 8 MiB or more comes from normengine's host cache.

    glibc maps every allocation of 32 MiB or more afresh and unmaps it when freed (its largest mmap threshold;
    torch's CPU allocator goes through it), and smaller ones often too (a heap top above its trim threshold goes
    back to the kernel), so an op writing such an output into a torch.empty first takes a page fault per 4 KiB
    page and has the kernel zero each one: on the 2-vCPU Xeon guest (benchmarks/RESULTS.md) a fused add +
    LayerNorm of 8192 x 1024 fp32 ran 2.9-3.3x torch's add-then-norm into reused buffers and 0.9x into fresh
    ones, and 8192 x 1024 bf16 (16 MiB outputs) 5.8 ms allocating against 2.4 ms into reused buffers. The
    host cache (cpp/include/normengine/host_cache.h, as torch's CUDA caching allocator) takes the block back
    when the tensor is freed and hands it to the next output of about its size, already faulted in, on
    2 MiB pages where the kernel gives them. Such a tensor is an ordinary tensor whose storage is not
    resizable (as torch.from_numpy's). normengine.empty_cache() hands the cached blocks back to the system;
    normengine.cache_info() reports them; NORMENGINE_CPU_CACHE_MB or normengine.set_cache_limit caps them
    (default min(1 GiB, RAM / 8); 0 turns the cache off: outputs are torch.empty's, as torch allocates its
    own)."""
    n = math.prod(shape) * dtype.itemsize
    if n < _CACHED or torch.device(device).type != "cpu" or not _C.host_cache_limit():
        return torch.empty(shape, dtype=dtype, device=device)
    return _from_cache(n, shape, dtype)


def _from_cache(nbytes: int, shape, dtype) -> torch.Tensor:
    """A contiguous CPU tensor over a block of the host cache (nbytes = its size), not a view of another."""
    storage = torch.frombuffer(_C.HostBuffer(nbytes), dtype=torch.uint8).untyped_storage()  # holds the block
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def torch_empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of x's shape, dtype and device (the fake functions' empty_like)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """empty(x.shape, x.dtype, x.device), contiguous; below the host cache's size, torch.empty_like (a third
    of torch.empty's call overhead: 0.9 against 2-3 us, which counts in a small op's 15 us)."""
    n = x.numel() * x.element_size()
    if n < _CACHED or not x.is_cpu or not _C.host_cache_limit():
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return _from_cache(n, x.shape, x.dtype)


def stream_of(t: torch.Tensor) -> int:
    """The CUDA stream kernels on `t` run on (torch's current stream); 0 on the CPU."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def from_numpy(x, name: str):
    """Accept a numpy array as a tensor (forward ops only); returns (tensor, was_numpy)."""
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float16, np.float64):
            raise DTypeError(f"{name}: unsupported numpy dtype {x.dtype}; use float32, float16 or float64")
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:  # torch warns about (and cannot protect) read-only memory; inputs are only read
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(x), True
        return torch.from_numpy(x), True
    return x, False


def _rows_ok(x: torch.Tensor) -> bool:
    """Can x be read as rows of its last dim with one row stride (what the kernels accept)?"""
    if x.is_contiguous():  # the common case, without walking the strides
        return True
    if x.dim() == 0:
        return True
    if x.size(-1) > 1 and x.stride(-1) != 1:
        return False
    expect = None
    for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size == 1:
            continue
        if expect is None:
            if stride < x.size(-1):
                return False
            expect = stride * size
        elif stride != expect:
            return False
        else:
            expect *= size
    return True


def rows(x: torch.Tensor) -> torch.Tensor:
    """x itself if the kernels can read it in place (contiguous, or a column slice of rows),
    else an explicit contiguous copy. A lazily negated view (torch._neg_view, x.conj().imag: memory holding
    -x) is resolved first: its memory is not its values."""
    if not _is_compiling() and x.is_neg():  # (torch.compile cannot trace is_neg(); traced, the binding refuses one)
        x = x.resolve_neg()
    return x if _rows_ok(x) else x.contiguous()


def check_dense(t: torch.Tensor, name: str) -> None:
    """Sparse and mkldnn tensors have no strided memory for the kernels to read."""
    if t.layout is not torch.strided:
        raise DTypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}; call .to_dense()")


def check_input(x, name: str = "x") -> torch.Tensor:
    """The main input of a row-wise op: a floating-point tensor with at least one dimension."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{name}: expected float32, float16, bfloat16 or float64, got {x.dtype}"
        )
    if not (x.is_cpu or x.is_cuda):
        raise DeviceError(f"{name}: tensors on {x.device} are not supported (cpu or cuda)")
    check_dense(x, name)
    if x.dim() == 0 or x.size(-1) == 0:
        raise ShapeError(f"{name}: expected at least one feature in the last dimension, got shape {tuple(x.shape)}")
    return rows(x)


def check_like(t, x: torch.Tensor, name: str, xname: str = "x") -> torch.Tensor:
    """A second tensor of x's shape, dtype and device (residual, grad_output)."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise DeviceError(f"{name} is on {t.device} but {xname} is on {x.device}; move them to one device")
    if t.shape != x.shape:
        raise ShapeError(f"{name}: shape {tuple(t.shape)} does not match {xname}'s {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise DTypeError(f"{name}: dtype {t.dtype} does not match {xname}'s {x.dtype}")
    check_dense(t, name)
    return rows(t)


def channel_vector(v, x: torch.Tensor, name: str, n: int | None = None):
    """A per-channel vector (weight, bias) for x: shape (n,), on x's device, any float dtype;
    returned contiguous in the accumulator dtype the kernels read (None stays None)."""
    if v is None:
        return None
    n = x.shape[-1] if n is None else n
    if not isinstance(v, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor or None, got {type(v).__name__}")
    if v.device != x.device:
        raise DeviceError(f"{name} is on {v.device} but x is on {x.device}; move them to one device")
    if v.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{name}: expected a floating-point tensor, got {v.dtype}")
    check_dense(v, name)
    if v.shape != (n,):
        raise ShapeError(
            f"{name}: expected shape ({n},) to match x's last dimension, got {tuple(v.shape)}"
        )
    acc = acc_dtype(x.dtype)
    if v.dtype == acc and v.is_contiguous() and (_is_compiling() or not v.is_neg()):
        return v.detach() if v.requires_grad else v  # (each check here costs ~0.1 us of a small call)
    return v.detach().resolve_neg().to(acc).contiguous()


def check_eps(eps) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise ArgumentError(f"eps: expected a number, got {eps!r}") from None
    if not e >= 0.0:
        raise ArgumentError(f"eps: expected a non-negative number, got {eps!r}")
    return e


def check_out(out, x: torch.Tensor, name: str = "out") -> torch.Tensor:
    """A caller-provided output buffer: x's shape, dtype and device, readable as rows (and not a negated view,
    whose memory would receive the values, not their negation)."""
    if isinstance(out, torch.Tensor) and not _is_compiling() and out.is_neg():  # (traced: the binding refuses it)
        raise DTypeError(f"{name}: a negated view (is_neg() is True); pass a plain tensor")
    out = check_like(out, x, name)
    if not _rows_ok(out):
        raise ShapeError(f"{name}: must be contiguous in its last dimension with collapsible rows")
    return out


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses of t's elements (torch strides are non-negative)."""
    if t.numel() == 0:
        return 0, 0
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def check_no_overlap(out: torch.Tensor, name: str, inputs: dict, same_ok: tuple = ()) -> None:
    """An output buffer must not share memory with what the kernel reads, except (for the inputs
    named in same_ok, which row-local kernels read before writing) by being exactly the same view.
    A partial overlap would be read after being written: silently wrong results. Like torch, a
    shared address range counts as overlap (strided views that interleave without sharing elements
    are refused too)."""
    lo, hi = byte_span(out)
    if lo == hi:
        return
    for iname, t in inputs.items():
        if not isinstance(t, torch.Tensor) or t.device != out.device:
            continue
        a, b = byte_span(t)
        if a >= hi or lo >= b:
            continue
        same = (t.data_ptr() == out.data_ptr() and t.dtype == out.dtype and t.shape == out.shape
                and t.stride() == out.stride())
        if same and iname in same_ok:
            continue
        what = (f"is the same buffer as {iname}, which cannot be written in place here" if same
                else f"partially overlaps {iname} in memory: its elements would be read after being overwritten")
        allowed = f" (in place, as the identical view, is allowed for {' / '.join(same_ok)})" if same_ok else ""
        raise ArgumentError(f"{name} {what}; pass a separate output buffer{allowed}")
