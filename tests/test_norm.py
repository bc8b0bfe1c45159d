"""LayerNorm, RMSNorm, CRMSNorm and the fused residual forms against normengine.reference and
torch, forward and backward, on every backend."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import normengine as ne
from normengine import reference as ref
from conftest import rel_err, smaps_fields

OPS = {
    # name: (op, reference, takes bias)
    "layer_norm": (ne.ops.layer_norm, ref.layer_norm, True),
    "rms_norm": (ne.ops.rms_norm, ref.rms_norm, False),
    "crms_norm": (ne.ops.crms_norm, ref.crms_norm, False),
}
ADD_OPS = {
    "add_layer_norm": (ne.ops.add_layer_norm, ref.add_layer_norm, True),
    "add_rms_norm": (ne.ops.add_rms_norm, ref.add_rms_norm, False),
}


def randn(*shape, gen, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def params(n, gen, device, bias=True, dtype=torch.float32):
    w = randn(n, gen=gen, device=device, dtype=dtype) + 1.0
    b = randn(n, gen=gen, device=device, dtype=dtype) if bias else None
    return w, b


def call(op, takes_bias, x, w, b, **kw):
    return op(x, w, b, **kw) if takes_bias else op(x, w, **kw)


def ref_call(fn, takes_bias, x, w, b, **kw):
    return fn(x, w, b, **kw) if takes_bias else fn(x, w, **kw)


# ----------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", [(7, 1), (5, 3), (3, 4097), (2, 3, 64), (64, 768)])
def test_forward_fp32(name, shape, device, gen):
    op, rfn, hb = OPS[name]
    x = randn(*shape, gen=gen, device=device)
    w, b = params(shape[-1], gen, device, hb)
    y = call(op, hb, x, w, b)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    want = ref_call(rfn, hb, x.double(), w.double(), None if b is None else b.double())
    assert rel_err(y, want) <= 1e-5, gen.initial_seed()


@pytest.mark.parametrize("shape", [(5, 3), (3, 4097), (2, 3, 64)])
def test_forward_matches_torch(shape, device, gen):
    x = randn(*shape, gen=gen, device=device)
    w, b = params(shape[-1], gen, device)
    n = shape[-1]
    assert rel_err(ne.ops.layer_norm(x, w, b, eps=1e-5), F.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5)) <= 1e-5
    assert rel_err(ne.ops.rms_norm(x, w, eps=1e-6), F.rms_norm(x.double(), (n,), w.double(), 1e-6)) <= 1e-5
    # without affine parameters
    assert rel_err(ne.ops.layer_norm(x), F.layer_norm(x.double(), (n,))) <= 1e-5


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [3, 1000, 4097])
def test_forward_16bit(name, dtype, n, device, gen):
    op, rfn, hb = OPS[name]
    x = randn(9, n, gen=gen, device=device, dtype=dtype)
    w, b = params(n, gen, device, hb)
    y = call(op, hb, x, w, b)
    assert y.dtype == dtype
    want = ref_call(rfn, hb, x.double(), w.double(), None if b is None else b.double())
    assert rel_err(y, want) <= 1e-2, gen.initial_seed()


@pytest.mark.parametrize("name", OPS)
def test_forward_fp64(name, device, gen):
    op, rfn, hb = OPS[name]
    x = randn(4, 300, gen=gen, device=device, dtype=torch.float64)
    w, b = params(300, gen, device, hb, dtype=torch.float64)
    assert rel_err(call(op, hb, x, w, b), ref_call(rfn, hb, x, w, b)) <= 1e-12


@pytest.mark.parametrize("n", [1024, 4096, 4097])
def test_large_mean_rows(n, device, gen):
    """Rows of 1e4 + N(0, 1): within 1e-5 of the float64 reference, tighter than torch's kernel."""
    x = randn(16, n, gen=gen, device=device, offset=1e4)
    want = ref.layer_norm(x.double())
    ours = rel_err(ne.ops.layer_norm(x), want)
    assert ours <= 1e-5, (ours, gen.initial_seed())
    theirs = rel_err(F.layer_norm(x, (n,)), want)
    assert ours <= theirs
    # the fused form normalizes the (rounded) sum just as accurately
    r = randn(16, n, gen=gen, device=device)
    y, h = ne.ops.add_layer_norm(x, r)
    assert rel_err(y, ref.layer_norm(h.double())) <= 1e-5


def test_large_offset_rms_crms(device, gen):
    x = randn(8, 513, gen=gen, device=device, offset=1e4)
    assert rel_err(ne.ops.rms_norm(x), ref.rms_norm(x.double())) <= 1e-5
    assert rel_err(ne.ops.crms_norm(x), ref.crms_norm(x.double())) <= 1e-5


@pytest.mark.parametrize("name", list(OPS) + list(ADD_OPS))
def test_nan_and_inf_propagate_per_row(name, device, gen):
    op, _, hb = {**OPS, **ADD_OPS}[name]
    x = randn(4, 33, gen=gen, device=device)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    w, b = params(33, gen, device, hb)
    args = (x, torch.zeros_like(x)) if name in ADD_OPS else (x,)
    y = op(*args, w, b) if hb else op(*args, w)
    y = y[0] if isinstance(y, tuple) else y
    assert torch.isnan(y[1]).all()
    assert not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def _nan_with_bits(bits):
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0].item()


# NaN payloads that a plain (u + 0x7fff + lsb) >> 16 rounding would carry into the sign (a zero) or the exponent
NAN_BITS = [0x7FFFFFFF, 0xFFFFFFFF - (1 << 32), 0x7FFF8000, 0xFFC00000 - (1 << 32)]


@pytest.mark.parametrize("name", list(OPS) + list(ADD_OPS))
def test_nan_payloads_in_weights_stay_nan(name, device, gen):
    """A weight or bias NaN of any payload gives NaN outputs in bf16, forward and backward (the AVX2 bf16 store
    rounds without a NaN test and relies on the kernels replacing such payloads first)."""
    op, _, hb = {**OPS, **ADD_OPS}[name]
    n = 37
    x = randn(3, n, gen=gen, device=device, dtype=torch.bfloat16).requires_grad_(True)
    w, b = params(n, gen, device, hb)
    for j, bits in enumerate(NAN_BITS):
        w[j] = _nan_with_bits(bits)
        if hb:
            b[j + len(NAN_BITS)] = _nan_with_bits(bits)
    args = (x, torch.zeros_like(x)) if name in ADD_OPS else (x,)
    y = op(*args, w, b) if hb else op(*args, w)
    y = y[0] if isinstance(y, tuple) else y
    nan_cols = torch.zeros(n, dtype=torch.bool)
    nan_cols[: len(NAN_BITS) * (2 if hb else 1)] = True
    assert torch.isnan(y[:, nan_cols.to(y.device)]).all()
    assert torch.isfinite(y[:, ~nan_cols.to(y.device)]).all()
    y.backward(torch.ones_like(y))
    assert torch.isnan(x.grad).all()  # every dx of a row sums over g = dy * w


def test_bf16_stores_round_to_nearest_even(device, gen):
    """y = a * x (UN's eval affine: one float32 product, then the bf16 store) bit for bit as torch's float32 ->
    bf16 conversion: random values, exact ties (x a power of two, a = 1 + 2^-8 or 1 + 3 * 2^-8), values that
    round up to the next binade or overflow to Inf, subnormals, and NaN / Inf in x."""
    n = 4097
    x = randn(5, n, gen=gen, device=device).to(torch.bfloat16)
    p2 = 2.0 ** torch.randint(-20, 20, (n,), generator=gen).to(torch.float32)
    x[1] = p2.to(torch.bfloat16).to(device)
    x[2] = (-p2).to(torch.bfloat16).to(device)
    x[3, :4] = torch.tensor([3.3895e38, -3.3895e38, 1e-40, float("nan")], dtype=torch.bfloat16)
    x[3, 4] = float("inf")
    a = (torch.rand(n, generator=gen, dtype=torch.float32) + 0.5).to(device)
    a[:2048] = 1 + 2.0 ** -8
    a[2048:4000] = 1 + 3 * 2.0 ** -8
    a[:2] = 1.0079  # the largest bf16 times this overflows
    a[2] = 0.75  # a subnormal product
    y = torch.empty_like(x)
    ne._C.channel_affine(x, a, None, y)
    want = (x.float() * a).to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16)) or (
        torch.equal(torch.isnan(y), torch.isnan(want))
        and torch.equal(y[~torch.isnan(y)].view(torch.int16), want[~torch.isnan(want)].view(torch.int16)))
    a[5:9] = torch.tensor([_nan_with_bits(b) for b in NAN_BITS])  # a scale holding NaN payloads: NaN out
    ne._C.channel_affine(x, a, None, y)
    assert torch.isnan(y[:, 5:9]).all()


def test_crms_equals_rms_of_full_zero_mean_vector(device, gen):
    """CRMSNorm of the first d-1 coordinates == RMSNorm of the full zero-mean d-vector, truncated."""
    d = 257
    full = randn(6, d, gen=gen, device=device, dtype=torch.float64)
    full = full - full.mean(-1, keepdim=True)
    w = randn(d, gen=gen, device=device, dtype=torch.float64)
    want = ne.ops.rms_norm(full, w)[..., :-1]
    got = ne.ops.crms_norm(full[..., :-1].contiguous(), w[:-1])
    assert rel_err(got, want) <= 1e-12


# ----------------------------------------------------------------------------- fused add
@pytest.mark.parametrize("name", ADD_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm_forward(name, dtype, device, gen):
    op, rfn, hb = ADD_OPS[name]
    x = randn(5, 3, 130, gen=gen, device=device, dtype=dtype)
    r = randn(5, 3, 130, gen=gen, device=device, dtype=dtype)
    w, b = params(130, gen, device, hb)
    y, h = op(x, r, w, b) if hb else op(x, r, w)
    assert torch.equal(h, x + r)  # the sum, rounded to x's dtype, exactly as torch adds
    want_y, _ = rfn(h.double(), torch.zeros_like(h.double()), w.double(), *( [b.double()] if hb else []))
    assert rel_err(y, want_y) <= (1e-5 if dtype == torch.float32 else 1e-2)


# ----------------------------------------------------------------------------- layouts, out=, numpy
def test_non_contiguous_inputs(device, gen):
    base = randn(8, 300, gen=gen, device=device)
    w, b = params(200, gen, device)
    x = base[:, 50:250]  # column slice: read in place with a row stride
    assert not x.is_contiguous()
    assert rel_err(ne.ops.layer_norm(x, w, b), ref.layer_norm(x.double(), w.double(), b.double())) <= 1e-5
    xt = randn(200, 8, gen=gen, device=device).t()  # last dim strided: copied explicitly
    assert rel_err(ne.ops.rms_norm(xt, w), ref.rms_norm(xt.double(), w.double())) <= 1e-5
    x3 = randn(4, 6, 200, gen=gen, device=device).transpose(0, 1)  # leading dims do not collapse
    assert rel_err(ne.ops.layer_norm(x3, w, b), ref.layer_norm(x3.double(), w.double(), b.double())) <= 1e-5
    wv = randn(400, gen=gen, device=device)[::2]  # strided weight
    assert rel_err(ne.ops.rms_norm(x, wv), ref.rms_norm(x.double(), wv.double())) <= 1e-5


def test_out_buffers(device, gen):
    x = randn(16, 100, gen=gen, device=device)
    r = randn(16, 100, gen=gen, device=device)
    w, b = params(100, gen, device)
    out = torch.empty_like(x)
    res = ne.ops.layer_norm(x, w, b, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, ne.ops.layer_norm(x, w, b))
    ho = torch.empty_like(x)
    y, h = ne.ops.add_rms_norm(x, r, w, out=out, residual_out=ho)
    assert y.data_ptr() == out.data_ptr() and h.data_ptr() == ho.data_ptr()
    assert torch.equal(ho, x + r)
    # in place: out aliasing x is allowed
    x2 = x.clone()
    ne.ops.rms_norm(x2, w, out=x2)
    assert torch.equal(x2, ne.ops.rms_norm(x, w))


def test_out_with_grad_is_an_error():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ne.ArgumentError, match="out"):
        ne.ops.layer_norm(x, out=torch.empty(3, 4))


def test_numpy_forward(gen):
    x = randn(6, 50, gen=gen).numpy()
    w = np.linspace(0.5, 1.5, 50, dtype=np.float32)
    y = ne.ops.layer_norm(x, torch.from_numpy(w))
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert rel_err(torch.from_numpy(y), ref.layer_norm(torch.from_numpy(x).double(), torch.from_numpy(w).double())) <= 1e-5
    y64 = ne.ops.rms_norm(x.astype(np.float64))
    assert y64.dtype == np.float64
    y, h = ne.ops.add_rms_norm(x, x)
    assert isinstance(h, np.ndarray) and np.array_equal(h, x + x)


# ----------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(name, affine, gen):
    op, _, hb = OPS[name]
    x = randn(3, 2, 9, gen=gen, dtype=torch.float64).requires_grad_()
    if affine:
        w, b = params(9, gen, "cpu", hb, dtype=torch.float64)
        w.requires_grad_()
        if b is not None:
            b.requires_grad_()
        inputs = (x, w, b) if hb else (x, w)
        assert gradcheck(lambda *a: op(*a), inputs)
    else:
        assert gradcheck(lambda a: op(a), (x,))


@pytest.mark.parametrize("name", ADD_OPS)
def test_gradcheck_add(name, gen):
    op, _, hb = ADD_OPS[name]
    x = randn(4, 11, gen=gen, dtype=torch.float64).requires_grad_()
    r = randn(4, 11, gen=gen, dtype=torch.float64).requires_grad_()
    w, b = params(11, gen, "cpu", hb, dtype=torch.float64)
    w.requires_grad_()
    extra = (w, b.requires_grad_()) if hb else (w,)
    # both outputs carry gradient: y into the next layer, h along the residual stream
    assert gradcheck(lambda x, r, *p: op(x, r, *p), (x, r) + extra)
    # only the normalized output used
    assert gradcheck(lambda x, r, *p: op(x, r, *p)[0], (x, r) + extra)
    # only the sum used
    assert gradcheck(lambda x, r, *p: op(x, r, *p)[1].sin(), (x, r) + extra)


def _row_rstd(name, h):
    n = h.size(-1)
    if "layer" in name:
        return 1 / torch.sqrt(h.var(-1, unbiased=False) + 1e-5)
    if "crms" in name:
        return 1 / torch.sqrt(((h * h).sum(-1) + h.sum(-1) ** 2) / (n + 1) + 1e-6)
    return 1 / torch.sqrt((h * h).mean(-1) + 1e-6)


@pytest.mark.parametrize("name", list(OPS) + list(ADD_OPS))
@pytest.mark.parametrize("shape", [(2, 1), (17, 3), (5, 4097), (2, 3, 200)])
def test_backward_against_reference_autograd(name, shape, device, gen):
    op, rfn, hb = {**OPS, **ADD_OPS}[name]
    fused = name in ADD_OPS
    n = shape[-1]
    x = randn(*shape, gen=gen, device=device).requires_grad_()
    r = randn(*shape, gen=gen, device=device).requires_grad_() if fused else None
    w, b = params(n, gen, device, hb)
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    p = (w, b) if hb else (w,)
    xd = x.detach().double().requires_grad_()
    rd = r.detach().double().requires_grad_() if fused else None
    pd = tuple(t.detach().double().requires_grad_() for t in p)
    if fused:
        y, h = op(x, r, *p)
        yd, hd = rfn(xd, rd, *pd)
        gy, gh = randn(*shape, gen=gen, device=device), randn(*shape, gen=gen, device=device)
        torch.autograd.backward((y, h), (gy, gh))
        torch.autograd.backward((yd, hd), (gy.double(), gh.double()))
        pairs = [(x.grad, xd.grad), (r.grad, rd.grad)]
    else:
        y, yd = op(x, *p), rfn(xd, *pd)
        g = randn(*shape, gen=gen, device=device)
        y.backward(g)
        yd.backward(g.double())
        pairs = [(x.grad, xd.grad)]
    pairs += [(a.grad, ad.grad) for a, ad in zip(p, pd)]
    # The natural scale of dx is |dy| |w| rstd; a gradient far below it is a cancellation (a norm over
    # one feature has dx ~ eps), which float32 can only resolve to that scale: compare absolutely there.
    h = (xd + rd if fused else xd).detach()
    scale = gy.abs().max().item() if fused else g.abs().max().item()
    scale *= w.abs().max().item() * _row_rstd(name, h).max().item()
    for got, want in pairs:
        assert got.dtype == torch.float32
        assert rel_err(got, want, floor=scale) <= 1e-5, (name, gen.initial_seed())


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_backward_bf16(name, device, gen):
    op, rfn, hb = OPS[name]
    x = randn(8, 256, gen=gen, device=device, dtype=torch.bfloat16).requires_grad_()
    w, b = params(256, gen, device, hb, dtype=torch.bfloat16)
    w.requires_grad_()
    y = call(op, hb, x, w, b)
    g = randn(8, 256, gen=gen, device=device, dtype=torch.bfloat16)
    y.backward(g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref_call(rfn, hb, xd, wd, None if b is None else b.double()).backward(g.double())
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert rel_err(x.grad, xd.grad) <= 2e-2
    assert rel_err(w.grad, wd.grad) <= 2e-2


def test_large_mean_backward(device, gen):
    x = randn(8, 1024, gen=gen, device=device, offset=1e4).requires_grad_()
    g = randn(8, 1024, gen=gen, device=device)
    ne.ops.layer_norm(x).backward(g)
    xd = x.detach().double().requires_grad_()
    ref.layer_norm(xd).backward(g.double())
    assert rel_err(x.grad, xd.grad) <= 1e-4


# --------------------------------------------------------------------------------- modules
def test_modules_match_torch_modules(gen):
    m = ne.nn.LayerNorm(64)
    t = torch.nn.LayerNorm(64)
    with torch.no_grad():
        t.weight.copy_(randn(64, gen=gen))
        t.bias.copy_(randn(64, gen=gen))
    m.load_state_dict(t.state_dict())
    x = randn(3, 5, 64, gen=gen)
    assert rel_err(m(x), t(x.double() if False else x)) <= 1e-5
    rm, rt = ne.nn.RMSNorm(64), torch.nn.RMSNorm(64, eps=1e-6)
    rm.load_state_dict(rt.state_dict())
    assert rel_err(rm(x), rt(x)) <= 1e-5
    y, h = m(x, x)
    assert torch.equal(h, x + x)
    c = ne.nn.CRMSNorm(63)
    assert c(x[..., :63]).shape == (3, 5, 63)
    (m(x).sum() + rm(x).sum()).backward()
    assert m.weight.grad is not None and rm.weight.grad is not None


def test_modules_take_torch_normalized_shapes_and_eps(gen):
    """As torch.nn.LayerNorm / RMSNorm: normalized_shape may name several trailing dims (the statistics
    then run over all their elements; weight and bias have that shape), and RMSNorm(eps=None) means
    finfo(dtype).eps. Forward, backward and state_dict against torch's modules."""
    shape = (4, 16)
    for ours, theirs in ((ne.nn.LayerNorm(shape), torch.nn.LayerNorm(shape)),
                         (ne.nn.RMSNorm(shape, eps=None), torch.nn.RMSNorm(shape))):
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(randn(*p.shape, gen=gen))
        ours.load_state_dict(theirs.state_dict())
        x = (randn(3, 5, 4, 16, gen=gen) * 1e-3).requires_grad_()  # small: eps matters
        a, b = ours(x), theirs(x)
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5
        g = randn(*a.shape, gen=gen)
        ga = torch.autograd.grad(a, [x, ours.weight], g)
        gb = torch.autograd.grad(b, [x, theirs.weight], g)
        for u, v in zip(ga, gb):
            assert u.shape == v.shape and rel_err(u, v) <= 1e-4
        y, h = ours(x, x)
        assert y.shape == x.shape and torch.equal(h, x + x)
        with pytest.raises(ne.ShapeError, match=r"x: expected trailing dimensions \(4, 16\)"):
            ours(randn(3, 16, 4, gen=gen))


def test_thread_counts_agree(gen):
    """Results do not depend on the thread count (rows are independent; dw sums per thread)."""
    x = randn(301, 257, gen=gen).requires_grad_()
    w = (randn(257, gen=gen) + 1).requires_grad_()
    g = randn(301, 257, gen=gen)
    before = ne.num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            ne.set_num_threads(t)
            x.grad = w.grad = None
            y = ne.ops.layer_norm(x, w)
            y.backward(g)
            outs.append((y.detach().clone(), x.grad.clone(), w.grad.clone()))
    finally:
        ne.set_num_threads(before)
    # dw[c] = sum over rows of g * xhat, summed per thread in float32: the order changes with the thread
    # count, so compare against the size of the summed terms (a channel's sum may cancel)
    xhat = torch.nn.functional.layer_norm(x.detach().double(), (257,))
    scale = (g.double() * xhat).abs().sum(0).max().item()
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])
        assert (o[2] - outs[0][2]).abs().max().item() <= 1e-6 * scale


# ---------------------------------------------------------------------------- large outputs on huge pages

@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="no transparent huge pages in this kernel")
def test_large_outputs_ask_for_huge_pages(monkeypatch):
    """An op's own output of 32 MiB or more (what glibc maps afresh, a page fault per 4 KiB on first touch) is
    advised MADV_HUGEPAGE before the kernel writes it (VmFlags 'hg'); values as without the advice;
    NORMENGINE_HUGEPAGES=0 turns it off (a fresh process: the setting is read once)."""
    import subprocess
    import sys

    x = torch.randn(8192, 1024)
    r = torch.randn(8192, 1024)
    y, h = ne.ops.add_layer_norm(x, r)
    for t in (y, h):
        mid = t.data_ptr() + t.numel() * t.element_size() // 2
        assert "hg" in smaps_fields(mid)["VmFlags"].split()
    want = F.layer_norm(x + r, (1024,))
    assert rel_err(y, want) <= 1e-5 and torch.equal(h, x + r)
    code = ("import torch, normengine as ne, sys; sys.path.insert(0, 'tests'); from conftest import smaps_fields; "
            "y = ne.ops.layer_norm(torch.randn(8192, 1024)); "
            "print('hg' in smaps_fields(y.data_ptr() + y.numel() * 2)['VmFlags'].split())")
    env = dict(os.environ, NORMENGINE_HUGEPAGES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
