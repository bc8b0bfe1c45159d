"""cuda/activation.cu RUN without a GPU: the gated-activation kernels and their launchers on the CPU through
the SIMT emulator (tests/cuda_emu/cuda_emu.h; harness tests/cuda_emu/act_emu.cpp), against the CPU kernels
(normengine._C) and the float64 reference: forward and backward of every activation, gated or not, float32 /
bfloat16 / float16 / float64, odd widths, rows with a leading dimension past their width, outputs inside
guard regions. Skips when g++ is absent."""

import ctypes
import os

import pytest
import torch

from conftest import rel_err
from normengine import _C
from normengine import reference as ref

from cuda_emu.emu_build import CXX, EMU, ROOT, build, emu_source, launch_names
from cuda_emu.emu_build import one_torch_thread  # noqa: F401 (an autouse fixture: applies to this module)

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found (the emulator harness is built with it)")
ACTS = {"gelu_tanh": 0, "gelu": 1, "silu": 2, "relu": 3}
DT = {torch.float32: (0, "f32", 1e-5), torch.bfloat16: (1, "bf16", 1e-2), torch.float16: (2, "f16", 2e-3),
      torch.float64: (3, "f64", 1e-12)}
SENTINEL = -123.0


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("actemu")
    src = d / "activation.emu.cu"
    src.write_text(emu_source(os.path.join(ROOT, "cuda", "activation.cu")))
    L = build(d / "libactemu.so", [os.path.join(EMU, "act_emu.cpp")], [f'-DNE_EMU_ACT_SOURCE="{src}"'],
              prefix="ne_emu_act")
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    L.ne_emu_act_forward.argtypes = [ci, ci, i64, i64, vp, i64, vp, i64, vp, i64]
    L.ne_emu_act_backward.argtypes = [ci, ci, i64, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, i64]
    return L


def _p(t):
    return None if t is None else t.data_ptr()


def _guarded(rows, n, dtype):
    """A rows x n view (leading dimension n + 3) inside a buffer of SENTINEL, and the buffer."""
    buf = torch.full((rows + 1, n + 3), SENTINEL, dtype=dtype)
    return buf[:rows, 1:n + 1], buf


def _untouched(buf, view):
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[:view.size(0), 1:view.size(1) + 1] = False
    return bool((buf[mask] == SENTINEL).all())


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("n", [1, 3, 777])
@pytest.mark.parametrize("gated", [True, False])
def test_forward_backward(lib, act, dtype, n, gated):
    code, tname, tol = DT[dtype]
    g = torch.Generator().manual_seed(n)
    a = (2 * torch.randn(5, n, generator=g)).to(dtype)
    b = torch.randn(5, n, generator=g).to(dtype) if gated else None
    dy = torch.randn(5, n, generator=g).to(dtype)
    y, ybuf = _guarded(5, n, dtype)
    rc = lib.ne_emu_act_forward(ACTS[act], code, 5, n, _p(a), n, _p(b), n, _p(y), y.stride(0))
    assert rc == 0, lib.ne_emu_act_error().decode()
    assert launch_names(lib.ne_emu_act_launches) == [f"gated_fwd<{tname}>"] and _untouched(ybuf, y)
    da, dabuf = _guarded(5, n, dtype)
    db, dbbuf = _guarded(5, n, dtype)
    rc = lib.ne_emu_act_backward(ACTS[act], code, 5, n, _p(dy), n, _p(a), n, _p(b), n, _p(da), da.stride(0),
                                 _p(db) if gated else None, db.stride(0))
    assert rc == 0, lib.ne_emu_act_error().decode()
    assert launch_names(lib.ne_emu_act_launches) == [f"gated_bwd<{tname}>"] and _untouched(dabuf, da)
    # the CPU kernels and the float64 reference
    cy, cda, cdb = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    _C.gated_activation(ACTS[act], a, b, cy)
    _C.gated_activation_backward(ACTS[act], dy, a, b, cda, cdb if gated else None)
    ad = a.double().requires_grad_()
    bd = b.double().requires_grad_() if gated else None
    want = ref.gated_activation(ad, bd, act)
    want.backward(dy.double())
    assert rel_err(y, want) <= tol and rel_err(y, cy) <= tol
    assert rel_err(da, ad.grad) <= tol and rel_err(da, cda) <= tol
    if gated:
        assert rel_err(db, bd.grad) <= tol and rel_err(db, cdb) <= tol and _untouched(dbbuf, db)
    else:
        assert bool((dbbuf == SENTINEL).all())
