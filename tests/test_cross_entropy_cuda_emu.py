"""cuda/cross_entropy.cu RUN without a GPU: its kernel and launcher on the CPU through the SIMT emulator
(tests/cuda_emu/cuda_emu.h; harness tests/cuda_emu/ce_emu.cpp), against the CPU kernel (normengine._C) and
the float64 reference: losses, log-sum-exps and gradients of float32 and float64 rows, odd vocabularies,
ignored rows, label smoothing, per-row scales, the gradient written over the logits in place, an
out-of-range target (NaN row), NaN logits, three fiber schedules. Skips when g++ is absent. (Timing, and
nvcc's own exp / log rounding, are not what this shows: the float32 tolerance leaves room for the latter.)"""

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
ORDERS = {"forward": 0, "reverse": 1, "eager": 2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("ceemu")
    src = d / "cross_entropy.emu.cu"
    src.write_text(emu_source(os.path.join(ROOT, "cuda", "cross_entropy.cu")))
    L = build(d / "libceemu.so", [os.path.join(EMU, "ce_emu.cpp")], [f'-DNE_EMU_CE_SOURCE="{src}"'],
              prefix="ne_emu_ce")
    vp, i64, ci, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    L.ne_emu_ce_run.argtypes = [ci, i64, i64, vp, i64, vp, i64, dbl, vp, vp, vp, i64, vp, dbl]
    L.ne_emu_ce_configure.argtypes = [ci]
    yield L
    L.ne_emu_ce_configure(0)


def _p(t):
    return None if t is None else t.data_ptr()


def _emu(lib, z, t, ignore, s, grad=None, row_scale=None, scale=1.0):
    loss = torch.empty(z.size(0), dtype=z.dtype)
    lse = torch.empty(z.size(0), dtype=z.dtype)
    rc = lib.ne_emu_ce_run(int(z.dtype == torch.float64), z.size(0), z.size(1), _p(z), z.stride(0), _p(t), ignore, s,
                           _p(loss), _p(lse), _p(grad), 0 if grad is None else grad.stride(0), _p(row_scale), scale)
    assert rc == 0, lib.ne_emu_ce_error().decode()
    return loss, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("V", [1, 3, 257, 4097])
@pytest.mark.parametrize("order", list(ORDERS))
def test_rows_against_cpu_and_float64(lib, dtype, V, order):
    lib.ne_emu_ce_configure(ORDERS[order])
    g = torch.Generator().manual_seed(V)
    wide = (3 * torch.randn(6, V + 5, generator=g)).to(dtype)
    z = wide[:, 2:V + 2]  # rows with a leading dimension past V
    t = torch.randint(0, V, (6,), generator=g)
    t[3] = -100
    row_scale = torch.rand(6, generator=g).to(dtype)
    grad = torch.full_like(z, 7.0)
    loss, lse = _emu(lib, z, t, -100, 0.2, grad, row_scale, 0.5)
    assert launch_names(lib.ne_emu_ce_launches) == [f"ce_rows<{'f64' if dtype == torch.float64 else 'f32'}>"]
    # the CPU kernel, and the float64 reference with autograd
    c_loss, c_lse, c_grad = torch.empty(6, dtype=dtype), torch.empty(6, dtype=dtype), torch.empty_like(z)
    _C.cross_entropy(z, t, -100, 0.2, c_loss, c_lse, c_grad, row_scale, 0.5)
    zd = z.double().requires_grad_()
    want = ref.cross_entropy(zd, t, reduction="none", label_smoothing=0.2)
    (want * row_scale.double() * 0.5).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # (floor 1: losses near 0 (V = 1) are compared on the logits' scale)
    assert rel_err(loss, want, floor=1.0) <= tol and rel_err(loss, c_loss, floor=1.0) <= tol
    kept = t != -100
    assert rel_err(lse[kept], torch.logsumexp(zd.detach(), -1)[kept]) <= tol
    assert lse[3] == 0 and rel_err(lse, c_lse) <= tol
    # (floor: with V = 1 the gradient is c - c s - c (1 - s) = 0 up to float32 rounding of c ~ 0.5)
    assert rel_err(grad, zd.grad, floor=1e-2) <= tol and rel_err(grad, c_grad, floor=1e-2) <= tol
    assert torch.equal(grad[3], torch.zeros_like(grad[3]))


@pytest.mark.parametrize("order", list(ORDERS))
def test_in_place_gradient_bad_target_and_nan(lib, order):
    lib.ne_emu_ce_configure(ORDERS[order])
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 1000, generator=g)
    t = torch.tensor([5, 999, 0, 17])
    want_loss, _ = _emu(lib, z.clone(), t, -100, 0.0)
    want_grad = torch.empty_like(z)
    _emu(lib, z.clone(), t, -100, 0.0, want_grad)
    zz = z.clone()
    loss, _ = _emu(lib, zz, t, -100, 0.0, zz)  # the gradient over the logits (z_t read before it is overwritten)
    assert torch.equal(loss, want_loss) and torch.equal(zz, want_grad)
    # an out-of-range target: NaN loss and gradient row there, the others untouched
    bad = torch.tensor([5, 1000, 0, -3])
    grad = torch.empty_like(z)
    loss, _ = _emu(lib, z, bad, -100, 0.0, grad)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3]) and torch.isnan(grad[1]).all()
    assert loss[0] == want_loss[0] and torch.equal(grad[2], want_grad[2])
    # a NaN logit: that row's loss NaN, the rest as before
    zn = z.clone()
    zn[2, 400] = float("nan")
    loss, _ = _emu(lib, zn, t, -100, 0.0)
    assert torch.isnan(loss[2]) and torch.equal(loss[[0, 1, 3]], want_loss[[0, 1, 3]])
