"""The native kernels as torch custom operators (torch.library), so that torch.compile traces the
autograd Functions of normengine.ops (fullgraph=True included) instead of breaking the graph at
each pybind11 call it cannot see into.

native_op(name, fake) registers a functional wrapper (inputs in, freshly allocated outputs out) as
normengine::<name>, with `fake` giving the outputs' shapes and dtypes for tracing. The returned
callable runs the wrapper directly in eager mode (no dispatcher overhead on small calls) and the
registered operator while torch.compile traces. Custom operators cannot return None: an absent
output is an empty placeholder tensor, which the callers (who know it is absent) read as None."""

from __future__ import annotations

import torch

_NS = "normengine"
# torch.library.custom_op and torch.compiler.is_compiling came with torch 2.4 / 2.3; on an older torch
# the kernels are called directly (eager as before; torch.compile breaks its graph at each of them)
_custom_op = getattr(torch.library, "custom_op", None)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def native_op(name: str, fake):
    def wrap(fn):
        if _custom_op is None or _is_compiling is None:
            fn.op = None
            return fn
        op = _custom_op(f"{_NS}::{name}", fn, mutates_args=())
        op.register_fake(fake)

        def call(*args):
            if _is_compiling():
                return op(*args)
            return fn(*args)

        call.__name__ = call.__qualname__ = fn.__name__
        call.__doc__ = fn.__doc__
        call.op = op
        return call

    return wrap


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """An absent output: empty, on like's device (the caller, which knows it is absent, reads None)."""
    return like.new_empty(0)
