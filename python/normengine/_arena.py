"""One huge-page arena for a loaded model's weights (CPU).

A decode step streams every weight once. On 4 KiB pages that is a TLB miss per 4 KiB of weights
(about 120k per step for a 124M fp32 model), and the page walks stall the stream: the runner decoded
8-10% faster with its weights on 2 MiB pages (benchmarks/RESULTS.md). The kernel hands huge pages to
anonymous memory that asks for them (madvise MADV_HUGEPAGE; with transparent_hugepage/enabled =
"madvise", the usual default, nothing else gets them), and neither a mapped checkpoint nor torch's
allocator asks. So normengine.load sizes one such region for the model's final weights and writes
each weight (converted, when its dtype changes) straight into its slot, handing each source back as
it goes: one pass over the weights, no second copy of them. Where the kernel has no huge page to give
(THP off, memory fragmented) the arena is ordinary memory and nothing else changes.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os

import numpy as np

HUGE_PAGE = 2 << 20


def hugepages_wanted() -> bool:
    """Whether normengine asks for huge pages at all: yes unless the environment sets
    NORMENGINE_HUGEPAGES=0 (for this weight arena; cpp/core/host_cache.cpp reads the same variable for
    the host cache's blocks)."""
    return os.environ.get("NORMENGINE_HUGEPAGES", "1") != "0"


_ALIGN = 64


def hugepage_array(nbytes: int) -> np.ndarray:
    """A uint8 numpy array of nbytes, 2 MiB aligned, advised to the kernel as huge-page memory (where
    the platform has madvise(MADV_HUGEPAGE), unless the environment sets NORMENGINE_HUGEPAGES=0); its
    pages are not touched yet. Private anonymous memory
    (a shared mapping would be shmem, which THP's "madvise" setting leaves on small pages). It lives
    as long as any view of it."""
    span = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE  # whole huge pages (the last one partly used)
    try:
        mm = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, TypeError):  # no POSIX mmap flags (Windows): ordinary memory
        return np.empty(nbytes, dtype=np.uint8)
    whole = np.frombuffer(mm, dtype=np.uint8)  # holds a reference to mm
    start = (-whole.ctypes.data) % HUGE_PAGE
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None and hugepages_wanted():
        try:
            mm.madvise(advise, start, span)
        except OSError:  # no THP in this kernel: ordinary pages
            pass
    return whole[start:start + nbytes]


def hugepage_buffer(nbytes: int):
    """hugepage_array as a uint8 torch tensor (sharing its memory)."""
    import torch

    return torch.from_numpy(hugepage_array(nbytes))


def _is_torch_dtype(dtype) -> bool:
    return type(dtype).__module__ == "torch"


def _itemsize(dtype) -> int:
    if _is_torch_dtype(dtype):
        return dtype.itemsize
    return np.dtype(dtype).itemsize


class Arena:
    """Slots carved in order from one hugepage_array of at most `nbytes` (the sum of what will be
    taken plus 64 bytes each for alignment): torch tensors for a torch dtype, numpy arrays for a
    numpy one (normengine._lite's torch-free load)."""

    def __init__(self, nbytes: int):
        self.buf = hugepage_array(nbytes)
        self._tbuf = None
        self.used = 0
        try:
            self._trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._trim = None
        self._freed = 0

    @staticmethod
    def room(shape, dtype) -> int:
        """Bytes to reserve for one slot of this shape and dtype."""
        return _ALIGN + math.prod(shape) * _itemsize(dtype)

    def take(self, shape, dtype, follow: bool = False):
        """A contiguous slot; follow=True puts it right after the previous one (no padding: tensors
        the runner reads as one back-to-back matrix), else at the next 64-byte boundary."""
        size = _itemsize(dtype)
        n = math.prod(shape) * size
        align = size if follow else _ALIGN
        start = -(-self.used // align) * align
        if start + n > self.buf.size:
            raise AssertionError("arena: slot past the reserved size")  # internal: room() was summed wrong
        self.used = start + n
        if _is_torch_dtype(dtype):
            if self._tbuf is None:  # one torch view of the whole buffer: every slot shares its storage
                import torch

                self._tbuf = torch.from_numpy(self.buf)
            return self._tbuf[start:start + n].view(dtype).view(tuple(shape))
        return self.buf[start:start + n].view(dtype).reshape(tuple(shape))

    def freed(self, nbytes: int) -> None:
        """A source of nbytes was dropped: glibc keeps freed heap chunks (those under its 32 MB mmap
        threshold) in the process, so every 16 MB of them is handed back to the system here."""
        self._freed += nbytes
        if self._trim is not None and self._freed >= (16 << 20):
            self._trim(0)
            self._freed = 0
