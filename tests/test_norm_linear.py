"""norm_linear (norm applied in the GEMM epilogue) against the unfused reference: forward on every
backend, gradcheck in float64, backward against reference autograd, and the runner's fused path."""

import pytest
import torch
from torch.autograd import gradcheck

import normengine as ne
from normengine import reference as ref
from conftest import rel_err

NORMS = ["rms", "crms", "layer"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (3, 5, 7), (17, 129, 33), (64, 256, 96), (2, 4097, 3)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_forward_matches_unfused(norm, M, K, N, wdtype, device, gen):
    x = torch.randn(M, K, generator=gen).to(device)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(wdtype).to(device)
    b = torch.randn(N, generator=gen).to(device)
    y = ne.ops.norm_linear(x, w, b, norm=norm)
    want = ref.norm_linear(x.double(), w.double(), b.double(), norm=norm)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert rel_err(y, want) <= 1e-5, (norm, gen.initial_seed())
    if norm == "layer":  # a precomputed column sum gives the same result
        y2 = ne.ops.norm_linear(x, w, b, norm=norm, col_sum=w.float().sum(1))
        assert rel_err(y2, want) <= 1e-5


def test_3d_and_noncontiguous_input(gen):
    base = torch.randn(2, 5, 80, generator=gen)
    x = base[..., :64]
    w = torch.randn(10, 64, generator=gen)
    assert rel_err(ne.ops.norm_linear(x, w, norm="rms"), ref.norm_linear(x.double(), w.double(), norm="rms")) <= 1e-5


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(norm, gen):
    x = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, w, b: ne.ops.norm_linear(x, w, b, norm=norm), (x, w, b))


@pytest.mark.parametrize("norm", NORMS)
def test_backward_fp32_against_reference(norm, gen):
    x = torch.randn(9, 130, generator=gen, requires_grad=True)
    w = (torch.randn(40, 130, generator=gen) / 11).requires_grad_()
    b = torch.randn(40, generator=gen, requires_grad=True)
    g = torch.randn(9, 40, generator=gen)
    ne.ops.norm_linear(x, w, b, norm=norm).backward(g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref.norm_linear(xd, wd, bd, norm=norm).backward(g.double())
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert rel_err(got, want) <= 1e-5


def test_bad_input(gen):
    x = torch.randn(2, 8)
    with pytest.raises(ne.ShapeError, match="in_features"):
        ne.ops.norm_linear(x, torch.randn(3, 9))
    with pytest.raises(ne.ArgumentError, match="norm"):
        ne.ops.norm_linear(x, torch.randn(3, 8), norm="batch")
    with pytest.raises(ne.DTypeError, match="x"):
        ne.ops.norm_linear(x.half(), torch.randn(3, 8))
    with pytest.raises(ne.ShapeError, match="bias"):
        ne.ops.norm_linear(x, torch.randn(3, 8), torch.randn(4))


@pytest.mark.parametrize("norm", ["layer", "rms", "crms"])
def test_norm_linear_out(norm, gen):
    """out= writes the same values as the allocating call, into the given memory."""
    x = torch.randn(5, 37, generator=gen) * 2 + 1
    w = torch.randn(11, 37, generator=gen)
    b = torch.randn(11, generator=gen)
    out = torch.full((5, 11), float("nan"))
    got = ne.ops.norm_linear(x, w, b, norm=norm, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = ref.norm_linear(x.double(), w.double(), b.double(), norm=norm)
    assert rel_err(out, want) < 1e-5
    with pytest.raises(ne.errors.ShapeError, match="out"):
        ne.ops.norm_linear(x, w, b, norm=norm, out=torch.empty(5, 10))
    xg = x.clone().requires_grad_()
    with pytest.raises(ne.errors.ArgumentError, match="out"):
        ne.ops.norm_linear(xg, w, b, norm=norm, out=out)
