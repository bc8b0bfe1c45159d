"""cuda/norm.cu RUN without a GPU: the CUDA norm kernels and their launchers (the same source the nvcc
build compiles, launches rewritten for the host) run on the CPU through the SIMT emulator of
tests/cuda_emu/cuda_emu.h (one fiber per CUDA thread, barriers and lockstep warp shuffles), built by
g++ into a ctypes library (tests/cuda_emu/norm_emu.cpp). Checked against the CPU kernels
(normengine._C) and float64 references: forward (y, x + residual, mean, rstd) and backward (dx, dw,
db) of LayerNorm / RMSNorm / CRMSNorm, fp32 and bf16, odd widths, every kernel path the launchers
pick (warp- and block-wide cached kernels, wide kernels with 16-byte vectors or scalar), large-mean
rows, NaN propagation, many rows per row group, three thread schedules; plus norm_stats and
the channel ops. Outputs live inside guard regions that must come back untouched. Skips when g++ is
absent.

What the emulator cannot show: anything about timing, occupancy or the memory model of the GPU, and
nvcc's fma contraction (the host build rounds a*b+c twice): so the GPU's results may differ from
these by an ulp or so per operation, which the float64 tolerances below leave room for."""

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

LAYER, RMS, CRMS = 0, 1, 2
KINDS = {"layer": LAYER, "rms": RMS, "crms": CRMS}
DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
SENTINEL = -123.0
ORDERS = {"forward": 0, "reverse": 1, "eager": 2}  # schedules of a block's fibers (cuda_emu.h)
EPS = {LAYER: 1e-5, RMS: 1e-6, CRMS: 1e-6}



@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("normemu")
    src = d / "norm.emu.cu"
    src.write_text(emu_source(os.path.join(ROOT, "cuda", "norm.cu")))
    L = build(d / "libnormemu.so", [os.path.join(EMU, "norm_emu.cpp"), os.path.join(EMU, "emu_selftest.cpp")],
              [f'-DNE_EMU_NORM_SOURCE="{src}"'],
              prefix="ne_emu")
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    L.ne_emu_configure.argtypes = [ci, ci]
    L.ne_emu_selftest.argtypes = [ctypes.c_char_p, ci]
    L.ne_emu_norm_forward.argtypes = [ci, ci, i64, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, vp, vp, vp,
                                      ctypes.c_double]
    L.ne_emu_norm_backward.argtypes = [ci, ci, i64, i64, vp, i64, vp, i64, vp, i64, vp, i64, vp, vp, vp, vp]
    L.ne_emu_norm_stats.argtypes = [ci, ci, i64, i64, vp, i64, vp, vp, ctypes.c_double]
    L.ne_emu_channel_moments.argtypes = [ci, i64, i64, vp, i64, vp, i64, vp, vp]
    L.ne_emu_channel_affine.argtypes = [ci, i64, i64, vp, i64, vp, i64, vp, i64, vp, vp]
    L.ne_emu_configure(0, 0)
    return L


@pytest.fixture
def device_cfg(lib):
    """Set the emulated occupancy / schedule for one test, restored afterwards."""
    def set_(blocks_per_sm=0, order="forward"):
        lib.ne_emu_configure(blocks_per_sm, ORDERS[order])
    yield set_
    lib.ne_emu_configure(0, 0)


def launches(lib):
    return launch_names(lib.ne_emu_launches)


def check(lib, rc):
    assert rc == 0, lib.ne_emu_error().decode()


def ptr(t):
    return None if t is None else t.data_ptr()


class Mat:
    """A rows x n matrix inside a sentinel-filled buffer. layout: 'contig' (ld = n), 'padded' (every
    row 16-byte aligned, 16 bytes of gap after it: the vector kernels), 'offset' (base one element past
    a 16-byte boundary: the scalar kernels). A trailing guard follows the matrix."""

    def __init__(self, rows, n, dtype, layout, value=None):
        v = 16 // torch.empty((), dtype=dtype).element_size()
        off = 1 if layout == "offset" else 0
        self.ld = (n + v - 1) // v * v + v if layout == "padded" else n + (1 if layout == "offset" else 0)
        self.buf = torch.full((rows * self.ld + off + v,), SENTINEL, dtype=dtype)
        self.inside = torch.zeros(self.buf.shape, dtype=torch.bool)
        self.t = self.buf[off:off + rows * self.ld].view(rows, self.ld)[:, :n]
        self.inside[off:off + rows * self.ld].view(rows, self.ld)[:, :n] = True
        if value is not None:
            self.t.copy_(value)

    def guard_ok(self):
        return bool((self.buf[~self.inside] == SENTINEL).all())


def nan_vec(n, dtype):
    return torch.full((n,), float("nan"), dtype=dtype)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- references (float64)

def ref_rstd(kind, h, eps):
    h = h.double()
    n = h.size(-1)
    if kind == LAYER:
        var = ((h - h.mean(-1, keepdim=True)) ** 2).mean(-1)
        return 1 / torch.sqrt(var + eps)
    if kind == RMS:
        return 1 / torch.sqrt((h * h).mean(-1) + eps)
    return 1 / torch.sqrt(((h * h).sum(-1) + h.sum(-1) ** 2) / (n + 1) + eps)


def ref_norm(kind, h, w, b, eps):
    if kind == LAYER:
        return ref.layer_norm(h, w, b, eps)
    y = (ref.rms_norm if kind == RMS else ref.crms_norm)(h, w, eps)
    return y if b is None else y + b


def scaled_err(got, want, scale):
    """max |got - want| / max(max |want|, scale): errors of sums that may cancel, measured against the
    size of their terms."""
    got, want = got.double(), want.double()
    diff = (got - want).abs()
    diff[got.isnan() & want.isnan()] = 0  # NaN where the reference has NaN is right
    d = diff.max().item()
    if d != d:
        return float("inf")  # a NaN the reference does not have
    return d / max(want.abs().max().item(), scale, 1e-300) if d > 0 else 0.0


def close_elems(got, want, rel, scale):
    """Element-wise |got - want| <= rel * |want| + 1e-5 * scale (bf16: rel = one ulp of the output)."""
    got, want = got.double(), want.double()
    bad = ~((got - want).abs() <= rel * want.abs() + 1e-5 * scale)
    bad &= ~(got.isnan() & want.isnan())
    return int(bad.sum())


# ---------------------------------------------------------------------------- runners

def emu_forward(lib, kind, x, res, w, b, eps, layout="contig"):
    rows, n = x.shape
    X = Mat(rows, n, x.dtype, layout, x)
    Rm = Mat(rows, n, x.dtype, layout, res) if res is not None else None
    Y = Mat(rows, n, x.dtype, layout)
    H = Mat(rows, n, x.dtype, layout) if res is not None else None
    a = acc(x.dtype)
    mean, rstd = nan_vec(rows, a), nan_vec(rows, a)
    check(lib, lib.ne_emu_norm_forward(kind, DT[x.dtype], rows, n, X.t.data_ptr(), X.ld,
                                       Rm.t.data_ptr() if Rm else None, Rm.ld if Rm else 0, Y.t.data_ptr(), Y.ld,
                                       H.t.data_ptr() if H else None, H.ld if H else 0, ptr(w), ptr(b),
                                       mean.data_ptr(), rstd.data_ptr(), eps))
    names = launches(lib)
    for m in (X, Rm, Y, H):
        assert m is None or m.guard_ok(), "a kernel wrote outside its rows"
    return Y.t.clone(), (H.t.clone() if H else None), mean, rstd, names


def cpu_forward(kind, x, res, w, b, eps):
    rows = x.shape[0]
    y = torch.empty_like(x)
    h = torch.empty_like(x) if res is not None else None
    a = acc(x.dtype)
    mean = torch.empty(rows, dtype=a) if kind == LAYER else None
    rstd = torch.empty(rows, dtype=a)
    _C.norm_forward(kind, x, res, w, b, eps, y, h, mean, rstd, 0)
    return y, h, mean, rstd


def emu_backward(lib, kind, dy, h, w, rstd, dres, want_dw, want_db, layout="contig"):
    rows, n = h.shape
    DY = Mat(rows, n, h.dtype, layout, dy)
    Hm = Mat(rows, n, h.dtype, layout, h)
    DR = Mat(rows, n, h.dtype, layout, dres) if dres is not None else None
    DX = Mat(rows, n, h.dtype, layout)
    a = acc(h.dtype)
    dw = nan_vec(n, a) if want_dw else None
    db = nan_vec(n, a) if want_db else None
    check(lib, lib.ne_emu_norm_backward(kind, DT[h.dtype], rows, n, DY.t.data_ptr(), DY.ld, Hm.t.data_ptr(), Hm.ld,
                                        DR.t.data_ptr() if DR else None, DR.ld if DR else 0, DX.t.data_ptr(), DX.ld,
                                        ptr(w), rstd.data_ptr(), ptr(dw), ptr(db)))
    names = launches(lib)
    for m in (DY, Hm, DR, DX):
        assert m is None or m.guard_ok(), "a kernel wrote outside its rows"
    return DX.t.clone(), dw, db, names


def cpu_backward(kind, dy, h, w, rstd, dres, want_dw, want_db):
    n = h.shape[1]
    a = acc(h.dtype)
    dx = torch.empty_like(h)
    dw = torch.empty(n, dtype=a) if want_dw else None
    db = torch.empty(n, dtype=a) if want_db else None
    _C.norm_backward(kind, dy, h, w, rstd, dres, dx, dw, db, 0)
    return dx, dw, db


def ref_backward(kind, dy, h, w, b, dres, eps):
    """float64 autograd of the reference: (dx (+ dres), dw, db) and the scales the errors are measured
    against (the largest term of each sum, for gradients that cancel to ~0)."""
    h64 = h.double().requires_grad_()
    w64 = None if w is None else w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    y = ref_norm(kind, h64, w64, b64, eps)
    y.backward(dy.double())
    dx = h64.grad + (dres.double() if dres is not None else 0)
    g = dy.double() * (w.double() if w is not None else 1)
    rstd = ref_rstd(kind, h, eps)[:, None]
    xhat = (ref_norm(kind, h.double(), None, None, eps)).detach()
    scale_dx = (rstd * g.abs()).max().item() + (dres.double().abs().max().item() if dres is not None else 0)
    scale_dw = (dy.double() * xhat).abs().sum(0).max().item()
    scale_db = dy.double().abs().sum(0).max().item()
    return (dx, None if w64 is None else w64.grad, None if b64 is None else b64.grad,
            (scale_dx, scale_dw, scale_db))


# ---------------------------------------------------------------------------- cases

def width(n, dtype):
    """'wide': the narrowest row the forward cannot cache in registers (> 512 threads x 8 vectors)."""
    if n != "wide":
        return n
    v = 16 // torch.empty((), dtype=dtype).element_size()
    return 512 * 8 * v + 3  # and not a whole number of vectors


def rows_for(n):
    return 3 if n > 4097 else (5 if n > 512 else 9)


def inputs(kind, dtype, rows, n, variant, gen):
    """x, residual, weight, bias for a variant: 'plain' (none), 'affine' (weight; bias for LayerNorm),
    'res' (residual add, weight, bias for LayerNorm)."""
    x = (torch.randn(rows, n, generator=gen) * 2 + 0.5).to(dtype)
    res = torch.randn(rows, n, generator=gen).to(dtype) if variant == "res" else None
    w = b = None
    if variant != "plain":
        w = torch.randn(n, generator=gen).to(acc(dtype))  # per-channel vectors: the accumulator dtype
        if kind == LAYER:
            b = torch.randn(n, generator=gen).to(acc(dtype))
    return x, res, w, b


# y per element, relative (16-bit types: one ulp of the output), plus 1e-5 of the output's scale
TOL_Y = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float64: 1e-13}


def check_forward(lib, kind, dtype, n, variant, layout, gen):
    rows = rows_for(n)
    x, res, w, b = inputs(kind, dtype, rows, n, variant, gen)
    eps = EPS[kind]
    y, h, mean, rstd, names = emu_forward(lib, kind, x, res, w, b, eps, layout)
    cy, ch, cmean, crstd = cpu_forward(kind, x, res, w, b, eps)
    hh = x if res is None else (x.double() + res.double()).to(dtype)  # the sum rounded to dtype, as stored
    want = ref_norm(kind, hh.double(), None if w is None else w.double(), None if b is None else b.double(), eps)
    scale = want.abs().max().item()
    if res is not None:
        assert torch.equal(h, hh) and torch.equal(h, ch), "x + residual differs from the rounded sum"
    assert close_elems(y, want, TOL_Y[dtype], scale) == 0, f"y vs float64: rel err {rel_err(y, want, 1e-3):.3g}"
    assert close_elems(y, cy, TOL_Y[dtype], scale) == 0, f"y vs CPU kernel: rel err {rel_err(y, cy, 1e-3):.3g}"
    # the statistics: each kernel within 1e-5 of float64 (the spec); the two kernels sum in different
    # orders, so they may differ from each other by up to the sum of their errors, 2e-5 (one 1.07e-5
    # in five runs seen at bf16 [3, 32771] LayerNorm rows, each side then within 1e-5 of float64)
    assert rel_err(rstd, ref_rstd(kind, hh, eps)) <= 1e-5
    assert rel_err(crstd, ref_rstd(kind, hh, eps)) <= 1e-5
    assert rel_err(rstd, crstd) <= 2e-5
    if kind == LAYER:
        # a sum of n shifted terms: its error scales with the terms (max |h|), not with the mean
        hmax = hh.double().abs().max().item()
        assert scaled_err(mean, hh.double().mean(-1), hmax) <= 1e-5
        assert scaled_err(cmean, hh.double().mean(-1), hmax) <= 1e-5
        assert scaled_err(mean, cmean, hmax) <= 2e-5
    else:
        assert torch.equal(mean, torch.zeros_like(mean))
    return names


def check_backward(lib, kind, dtype, n, variant, layout, gen):
    rows = rows_for(n)
    x, res, w, b = inputs(kind, dtype, rows, n, variant, gen)
    eps = EPS[kind]
    h = x if res is None else (x.float() + res.float()).to(dtype)
    rstd = cpu_forward(kind, h, None, w, b, eps)[3]
    dy = torch.randn(rows, n, generator=gen).to(dtype)
    dres = torch.randn(rows, n, generator=gen).to(dtype) if variant == "res" else None
    want_dw, want_db = w is not None, b is not None
    dx, dw, db, names = emu_backward(lib, kind, dy, h, w, rstd, dres, want_dw, want_db, layout)
    cdx, cdw, cdb = cpu_backward(kind, dy, h, w, rstd, dres, want_dw, want_db)
    rdx, rdw, rdb, (sdx, sdw, sdb) = ref_backward(kind, dy, h, w, b, dres, eps)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9, torch.float64: 1e-12}[dtype]
    e = scaled_err(dx, rdx, sdx)
    assert e <= tol, f"dx vs float64: {e:.3g}"
    e = scaled_err(dx, cdx, max(rdx.abs().max().item(), sdx))
    assert e <= tol, f"dx vs CPU kernel: {e:.3g}"
    for got, cpu, want, s, what in ((dw, cdw, rdw, sdw, "dw"), (db, cdb, rdb, sdb, "db")):
        if want is None:
            continue
        e = scaled_err(got, want, s)
        assert e <= 1e-5, f"{what} vs float64: {e:.3g}"
        e = scaled_err(cpu, want, s)
        assert e <= 1e-5, f"{what} of the CPU kernel vs float64: {e:.3g}"
        # each kernel within 1e-5 of float64, summing in its own order (the CPU's by ISA: 1.12e-5 apart seen
        # with AVX2's at f16 [3, 65539]), so the two within the sum of their errors
        e = scaled_err(got, cpu, max(want.abs().max().item(), s))
        assert e <= 2e-5, f"{what} vs CPU kernel: {e:.3g}"
    return names


WIDTHS = [1, 3, 31, 33, 4097, "wide"]


@pytest.mark.parametrize("layout", ["contig", "padded"])
@pytest.mark.parametrize("n", WIDTHS, ids=str)
@pytest.mark.parametrize("variant", ["plain", "affine", "res"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward(lib, kind, dt, variant, n, layout, gen):
    dtype = DTYPES[dt]
    n = width(n, dtype)
    names = check_forward(lib, KINDS[kind], dtype, n, variant, layout, gen)
    assert len(names) == 1
    v = 16 // torch.empty((), dtype=dtype).element_size()
    if layout == "padded" or n % v == 0:  # every row 16-byte aligned: vector kernels
        want = "norm_fwd_wide" if n > 512 * 8 * v else "norm_fwd_cached"
        assert names[0].startswith(want) and not names[0].endswith(",v=1>"), names
    else:
        assert names[0].startswith("norm_fwd_wide") and names[0].endswith(",v=1>"), names


@pytest.mark.parametrize("layout", ["contig", "padded"])
@pytest.mark.parametrize("n", WIDTHS, ids=str)
@pytest.mark.parametrize("variant", ["plain", "affine", "res"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_backward(lib, kind, dt, variant, n, layout, gen):
    dtype = DTYPES[dt]
    n = width(n, dtype)
    names = check_backward(lib, KINDS[kind], dtype, n, variant, layout, gen)
    assert names[0].startswith("norm_bwd_")
    assert names[1:] == (["colsum_kernel<f32>"] if variant != "plain" else [])


def test_every_kernel_path(lib, gen):
    """Widths that reach the remaining register-cache sizes (kv = 2, 8 forward; 1, 2, 4 backward) and
    the misaligned (scalar) paths; every norm kernel instantiation of fp32 and bf16 must have run."""
    seen = set()
    for dtype in DTYPES.values():
        v = 16 // torch.empty((), dtype=dtype).element_size()
        for n in (33, 40 * v, 2100 * v, 4097, width("wide", dtype), 64):
            for kind in KINDS.values():
                layout = "offset" if n == 64 else "padded"
                seen.update(check_forward(lib, kind, dtype, n, "res", layout, gen))
                seen.update(check_backward(lib, kind, dtype, n, "res", layout, gen))
    for dt, v in (("f32", 4), ("bf16", 8)):
        kvb = (1, 2, 4) if dt == "f32" else (1, 2)
        for k in KINDS:
            want = {f"norm_fwd_cached<{dt},{k},kv={kv}>" for kv in (1, 2, 4, 8)}
            want |= {f"norm_bwd_cached<{dt},{k},kv={kv}>" for kv in kvb}
            want |= {f"norm_{d}_wide<{dt},{k},v={vv}>" for d in ("fwd", "bwd") for vv in (1, v)}
            assert want <= seen, sorted(want - seen)


@pytest.mark.parametrize("layout", ["contig", "padded"])
@pytest.mark.parametrize("n", [3, 33, 4097, "wide"], ids=str)
@pytest.mark.parametrize("dt", ["f16", "f64"])
@pytest.mark.parametrize("kind", KINDS)
def test_f16_f64(lib, kind, dt, n, layout, gen):
    """The other two dtypes the launchers dispatch (float64 accumulates, and shuffles, in double)."""
    dtype = {"f16": torch.float16, "f64": torch.float64}[dt]
    n = width(n, dtype)
    check_forward(lib, KINDS[kind], dtype, n, "res", layout, gen)
    check_backward(lib, KINDS[kind], dtype, n, "res", layout, gen)


@pytest.mark.parametrize("order", ["reverse", "eager"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_many_rows_per_row_group(lib, device_cfg, kind, dt, order, gen):
    """One resident block per SM (4 SMs): each backward row group sums many rows into its partial
    dw / db row. Fibers resumed in reverse order, or eagerly (warp 0 runs ahead as far as the
    barriers let it): a shared buffer reused without a barrier, or any read of another thread's
    write that no barrier orders, would change the result."""
    dtype = DTYPES[dt]
    device_cfg(blocks_per_sm=1, order=order)
    for n, layout in ((33, "padded"), (33, "contig"), (600, "padded"), (width("wide", dtype), "padded")):
        check_forward(lib, KINDS[kind], dtype, n, "res", layout, gen)
        names = check_backward(lib, KINDS[kind], dtype, n, "res", layout, gen)
    assert names[-1].startswith("colsum")


@pytest.mark.parametrize("order", ["forward", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,layout", [(33, "padded"), (600, "padded"), (4097, "contig"), ("wide", "padded")], ids=str)
def test_in_place(lib, device_cfg, kind, n, layout, order, gen):
    """norm.cu's aliasing contract, bit for bit against separate buffers: forward y may alias x, and
    x + residual may be written over x or over residual; backward dx may alias dy or h."""
    kind, dtype = KINDS[kind], torch.bfloat16
    device_cfg(order=order)
    n = width(n, dtype)
    rows = rows_for(n)
    x, res, w, b = inputs(kind, dtype, rows, n, "res", gen)
    a = acc(dtype)

    def fwd(X, R, Y, H):
        mean, rstd = nan_vec(rows, a), nan_vec(rows, a)
        check(lib, lib.ne_emu_norm_forward(kind, DT[dtype], rows, n, X.t.data_ptr(), X.ld,
                                           R.t.data_ptr() if R else None, R.ld if R else 0, Y.t.data_ptr(), Y.ld,
                                           H.t.data_ptr() if H else None, H.ld if H else 0, ptr(w), ptr(b),
                                           mean.data_ptr(), rstd.data_ptr(), EPS[kind]))
        return Y.t.clone(), (H.t.clone() if H else None), rstd

    y0, _, _ = fwd(Mat(rows, n, dtype, layout, x), None, Mat(rows, n, dtype, layout), None)
    X = Mat(rows, n, dtype, layout, x)
    assert torch.equal(fwd(X, None, X, None)[0], y0)  # y over x
    y1, h1, rstd = fwd(Mat(rows, n, dtype, layout, x), Mat(rows, n, dtype, layout, res), Mat(rows, n, dtype, layout),
                       Mat(rows, n, dtype, layout))
    X = Mat(rows, n, dtype, layout, x)
    y, h, _ = fwd(X, Mat(rows, n, dtype, layout, res), Mat(rows, n, dtype, layout), X)  # h over x
    assert torch.equal(y, y1) and torch.equal(h, h1)
    Rm = Mat(rows, n, dtype, layout, res)
    y, h, _ = fwd(Mat(rows, n, dtype, layout, x), Rm, Mat(rows, n, dtype, layout), Rm)  # h over residual
    assert torch.equal(y, y1) and torch.equal(h, h1)
    X = Mat(rows, n, dtype, layout, x)
    Rm = Mat(rows, n, dtype, layout, res)
    y, h, _ = fwd(X, Rm, X, Rm)  # y over x, h over residual
    assert torch.equal(y, y1) and torch.equal(h, h1)

    dy = torch.randn(rows, n, generator=gen).to(dtype)

    def bwd(DY, Hm, DX):
        dw = nan_vec(n, a)
        check(lib, lib.ne_emu_norm_backward(kind, DT[dtype], rows, n, DY.t.data_ptr(), DY.ld, Hm.t.data_ptr(),
                                            Hm.ld, None, 0, DX.t.data_ptr(), DX.ld, ptr(w), rstd.data_ptr(),
                                            dw.data_ptr(), None))
        return DX.t.clone(), dw

    dx0, dw0 = bwd(Mat(rows, n, dtype, layout, dy), Mat(rows, n, dtype, layout, h1), Mat(rows, n, dtype, layout))
    DY = Mat(rows, n, dtype, layout, dy)
    dx, dw = bwd(DY, Mat(rows, n, dtype, layout, h1), DY)  # dx over dy
    assert torch.equal(dx, dx0) and torch.equal(dw, dw0)
    Hm = Mat(rows, n, dtype, layout, h1)
    dx, dw = bwd(Mat(rows, n, dtype, layout, dy), Hm, Hm)  # dx over h
    assert torch.equal(dx, dx0) and torch.equal(dw, dw0)


@pytest.mark.parametrize("n", [33, 1024, 4097, 16389], ids=str)
def test_large_mean_rows(lib, n, gen):
    """LayerNorm of 1e4 + N(0, 1) rows (fp32): within 1e-5 of float64, forward and backward."""
    rows = 4
    x = (1e4 + torch.randn(rows, n, generator=gen, dtype=torch.float64)).float()
    res = torch.randn(rows, n, generator=gen)
    w, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    for r, layout in ((None, "padded"), (res, "contig")):
        y, h, mean, rstd, _ = emu_forward(lib, LAYER, x, r, w, b, 1e-5, layout)
        hh = x if r is None else x + r
        want = ref.layer_norm(hh.double(), w.double(), b.double(), 1e-5)
        assert rel_err(y, want) <= 1e-5
        assert rel_err(mean, hh.double().mean(-1)) <= 1e-6
        assert rel_err(rstd, ref_rstd(LAYER, hh, 1e-5)) <= 1e-5
        dy = torch.randn(rows, n, generator=gen)
        dx, dw, db, _ = emu_backward(lib, LAYER, dy, hh, w, rstd, None, True, True, layout)
        rdx, rdw, rdb, (sdx, sdw, sdb) = ref_backward(LAYER, dy, hh, w, b, None, 1e-5)
        assert scaled_err(dx, rdx, sdx) <= 1e-5
        assert scaled_err(dw, rdw, sdw) <= 1e-5
        assert scaled_err(db, rdb, sdb) <= 1e-5


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,layout", [(33, "padded"), (4097, "contig"), ("wide", "padded")], ids=str)
def test_nan_propagates(lib, kind, dt, n, layout, gen):
    """A NaN in x poisons its row's y (and only that row); a NaN in dy its row's dx and its column of
    dw / db, exactly where the CPU kernels put NaNs."""
    kind, dtype = KINDS[kind], DTYPES[dt]
    n = width(n, dtype)
    rows = 3
    x, res, w, b = inputs(kind, dtype, rows, n, "res", gen)
    x[1, n // 2] = float("nan")
    y, h, _, rstd, _ = emu_forward(lib, kind, x, res, w, b, EPS[kind], layout)
    cy, ch, _, crstd = cpu_forward(kind, x, res, w, b, EPS[kind])
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    assert torch.equal(y.isnan(), cy.isnan()) and torch.equal(h.isnan(), ch.isnan())
    assert torch.equal(rstd.isnan(), crstd.isnan())
    hh = (x.float() + res.float()).to(dtype)
    hh[1, n // 2] = 0
    rstd = cpu_forward(kind, hh, None, w, b, EPS[kind])[3]
    dy = torch.randn(rows, n, generator=gen).to(dtype)
    dy[2, n // 3] = float("nan")
    dx, dw, db, _ = emu_backward(lib, kind, dy, hh, w, rstd, None, True, b is not None, layout)
    cdx, cdw, cdb = cpu_backward(kind, dy, hh, w, rstd, None, True, b is not None)
    assert dx[2].isnan().all() and not dx[:2].isnan().any()
    assert torch.equal(dx.isnan(), cdx.isnan()) and torch.equal(dw.isnan(), cdw.isnan())
    assert dw.isnan().sum() == 1
    if b is not None:
        assert torch.equal(db.isnan(), cdb.isnan()) and db.isnan().sum() == 1


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 33, 4097], ids=str)
def test_norm_stats(lib, kind, dt, n, gen):
    kind, dtype = KINDS[kind], DTYPES[dt]
    rows = 5
    x = (torch.randn(rows, n, generator=gen) + 3).to(dtype)
    X = Mat(rows, n, dtype, "contig", x)
    mean, rstd = nan_vec(rows, torch.float32), nan_vec(rows, torch.float32)
    check(lib, lib.ne_emu_norm_stats(kind, DT[dtype], rows, n, X.t.data_ptr(), X.ld, mean.data_ptr(),
                                     rstd.data_ptr(), EPS[kind]))
    cmean, crstd = torch.empty(rows), torch.empty(rows)
    _C.norm_stats(kind, x, EPS[kind], cmean, crstd, 0)
    assert rel_err(rstd, ref_rstd(kind, x, EPS[kind])) <= 1e-5 and rel_err(rstd, crstd) <= 1e-5
    want = x.double().mean(-1) if kind == LAYER else torch.zeros(rows)
    assert scaled_err(mean, want, x.double().abs().max().item()) <= 1e-5


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n,layout", [(3, "contig"), (33, "padded"), (1000, "offset"), (4100, "padded")], ids=str)
def test_channel_ops(lib, dt, n, layout, gen):
    dtype = DTYPES[dt]
    rows = 70
    x = torch.randn(rows, n, generator=gen).to(dtype)
    dy = torch.randn(rows, n, generator=gen).to(dtype)
    X, DY = Mat(rows, n, dtype, layout, x), Mat(rows, n, dtype, layout, dy)
    for with_dy in (False, True):
        o1, o2 = nan_vec(n, torch.float32), nan_vec(n, torch.float32)
        check(lib, lib.ne_emu_channel_moments(DT[dtype], rows, n, X.t.data_ptr(), X.ld,
                                              DY.t.data_ptr() if with_dy else None, DY.ld,
                                              o1.data_ptr(), o2.data_ptr() if with_dy else None))
        c1, c2 = torch.empty(n), torch.empty(n)
        _C.channel_moments(x, dy if with_dy else None, c1, c2 if with_dy else None, 0)
        x64, d64 = x.double(), dy.double()
        w1 = (x64 * d64).sum(0) if with_dy else (x64 * x64).sum(0)
        s1 = (x64 * d64).abs().sum(0).max().item() if with_dy else w1.abs().max().item()
        assert scaled_err(o1, w1, s1) <= 1e-5 and scaled_err(o1, c1, s1) <= 1e-5
        if with_dy:
            s2 = d64.abs().sum(0).max().item()
            assert scaled_err(o2, d64.sum(0), s2) <= 1e-5 and scaled_err(o2, c2, s2) <= 1e-5
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    OUT = Mat(rows, n, dtype, layout)
    check(lib, lib.ne_emu_channel_affine(DT[dtype], rows, n, X.t.data_ptr(), X.ld, None, 0, OUT.t.data_ptr(),
                                         OUT.ld, a.data_ptr(), b.data_ptr()))
    assert OUT.guard_ok()
    cout = torch.empty_like(x)
    _C.channel_affine(x, a, b, cout, 0)
    want = a.double() * x.double() + b.double()
    assert close_elems(OUT.t, want, TOL_Y[dtype], want.abs().max().item()) == 0
    assert close_elems(OUT.t, cout, TOL_Y[dtype], want.abs().max().item()) == 0


def test_emulator_selftest(lib):
    """The emulator itself: shuffles (every variant and width), barriers across warps, atomics, and the
    faults it must report (divergent or skipped barriers, partial shuffle masks, bad configurations)."""
    buf = ctypes.create_string_buffer(512)
    assert lib.ne_emu_selftest(buf, len(buf)) == 0, buf.value.decode()


def test_launcher_errors_surface(lib):
    """An ne::Error thrown by norm.cu's host side comes back as an error (rows of more than 2^30 features
    are refused before any launch)."""
    x = torch.zeros(1, 4)
    y = torch.empty_like(x)
    rstd = torch.empty(1)
    rc = lib.ne_emu_norm_forward(LAYER, 0, 1, (1 << 30) + 1, x.data_ptr(), 4, None, 0, y.data_ptr(), 4, None, 0,
                                 None, None, None, rstd.data_ptr(), 1e-5)
    assert rc == -1 and "2^30" in lib.ne_emu_error().decode()
