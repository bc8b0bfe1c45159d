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


def native_op(name: str, fake):
    def wrap(fn):
        op = torch.library.custom_op(f"{_NS}::{name}", fn, mutates_args=())
        op.register_fake(fake)

        def call(*args):
            if torch.compiler.is_compiling():
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
