"""cuda/rotary.cu RUN without a GPU: the rotary-embedding kernel and its launcher on the CPU through the SIMT
emulator (tests/cuda_emu/cuda_emu.h; harness tests/cuda_emu/rotary_emu.cpp), against the CPU kernel
(normengine._C) and the float64 reference: forward and backward, float32 / bfloat16 / float16 / float64, partial
rotary, halves that differ, rows with a leading dimension past their width, in place, an out-of-range table row
(NaN there). Skips when g++ is absent."""

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
DT = {torch.float32: (0, "f32", 1e-6), torch.bfloat16: (1, "bf16", 1e-2), torch.float16: (2, "f16", 2e-3),
      torch.float64: (3, "f64", 1e-12)}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("rotemu")
    src = d / "rotary.emu.cu"
    src.write_text(emu_source(os.path.join(ROOT, "cuda", "rotary.cu")))
    L = build(d / "librotemu.so", [os.path.join(EMU, "rotary_emu.cpp")], [f'-DNE_EMU_ROTARY_SOURCE="{src}"'],
              prefix="ne_emu_rot")
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    L.ne_emu_rot_run.argtypes = [ci, i64, i64, vp, i64, vp, i64, vp, vp, i64, i64, vp, ci]
    return L


def _p(t):
    return t.data_ptr()


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("D,R", [(16, 16), (20, 8), (2, 2)])
@pytest.mark.parametrize("backward", [False, True])
def test_against_cpu_and_reference(lib, dtype, D, R, backward):
    code, tname, tol = DT[dtype]
    g = torch.Generator().manual_seed(D * 3 + R)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wide = torch.randn(7, D + 3, generator=g).to(dtype)
    x = wide[:, 1:D + 1]  # rows with a leading dimension past their width
    cos, sin = torch.randn(4, R, generator=g).to(acc), torch.randn(4, R, generator=g).to(acc)  # halves differ
    crow = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    y = torch.full((7, D), -123.0).to(dtype)
    rc = lib.ne_emu_rot_run(code, 7, D, _p(x), x.stride(0), _p(y), D, _p(cos), _p(sin), 4, R, _p(crow), int(backward))
    assert rc == 0, lib.ne_emu_rot_error().decode()
    assert launch_names(lib.ne_emu_rot_launches) == [f"rotary<{tname}>"]
    cpu = torch.empty(7, D, dtype=dtype)
    _C.rotary_embedding(x, cos, sin, crow, cpu, backward)
    assert rel_err(y, cpu) <= tol
    c, s = cos[crow].double(), sin[crow].double()
    if backward:  # the transposed map: <rotate(u), v> = <u, rotate^T(v)> for every u
        u = torch.randn(7, D, generator=g, dtype=torch.float64)
        lhs = (ref.rotary_embedding(u, c, s) * x.double()).sum()
        rhs = (u * y.double()).sum()
        assert abs(lhs - rhs) <= 10 * tol * (u.abs() * x.double().abs()).sum()
    else:
        assert rel_err(y, ref.rotary_embedding(x.double(), c, s)) <= tol
    # in place, the same values
    z = x.clone()
    rc = lib.ne_emu_rot_run(code, 7, D, _p(z), D, _p(z), D, _p(cos), _p(sin), 4, R, _p(crow), int(backward))
    assert rc == 0 and rel_err(z, y) <= tol


def test_out_of_range_row_is_nan(lib):
    x = torch.randn(3, 8)
    cos, sin = torch.randn(2, 8), torch.randn(2, 8)
    y, crow = torch.empty(3, 8), torch.tensor([0, 5, 1])
    rc = lib.ne_emu_rot_run(0, 3, 8, _p(x), 8, _p(y), 8, _p(cos), _p(sin), 2, 8, _p(crow), 0)
    assert rc == 0 and torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
