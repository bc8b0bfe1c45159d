"""norm_linear (norm applied in the GEMM epilogue) against the unfused reference: forward on every
backend, gradcheck in float64, backward against reference autograd, and the runner's fused path."""

import sys

import pytest
import torch
from torch.autograd import gradcheck

import normengine as ne
from normengine import reference as ref
from conftest import rel_err

NORMS = ["rms", "crms", "layer"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (3, 5, 7), (7, 100, 41), (17, 129, 33), (64, 256, 96), (2, 4097, 3)])
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
        ne.ops.norm_linear(x.to(torch.int32), torch.randn(3, 8))
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


@pytest.mark.parametrize("norm", ["layer", "rms", "crms"])
def test_medium_precision_normalizes_before_rounding(norm, gen):
    """matmul_precision="medium" (AMX-BF16): x is normalized, then rounded to bf16, so rows with a
    large mean (1e4 + N(0, 1)) keep their N(0, 1) part: the result is the bf16 product of norm(x) and
    W, not of bf16(x). Without AMX-BF16 it is the exact path."""
    from normengine import _C
    x = 1e4 + torch.randn(40, 300, generator=gen)
    w = torch.randn(70, 300, generator=gen) * 0.05
    b = torch.randn(70, generator=gen)
    y = ne.ops.norm_linear(x, w, b, norm=norm, matmul_precision="medium")
    exact = ne.ops.norm_linear(x, w, b, norm=norm)
    if not _C.bf16_products_available():
        assert torch.equal(y, exact)
        return
    xd = x.double()
    if norm == "layer":
        n = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    elif norm == "rms":
        n = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    else:
        s = xd.sum(-1, keepdim=True)
        n = xd / ((xd.pow(2).sum(-1, keepdim=True) + s * s) / 301 + 1e-6).sqrt()
    want = n.float().bfloat16().double() @ w.bfloat16().double().t() + b.double()
    scale = (n.abs() @ w.abs().double().t()).max().item()
    # the row statistics are float32 in both precisions (LayerNorm's mean of 1e4 + N(0, 1) rows to
    # within ulp(1e4) / 2 = 5e-4): the exact path's own error against float64 is the allowance
    own = rel_err(exact, n @ w.double().t() + b.double(), floor=scale)
    assert rel_err(y, want, floor=scale) < 1e-4 + 2 * own
    assert rel_err(y, exact, floor=scale) < 2e-2
    with pytest.raises(ne.errors.ArgumentError, match="matmul_precision"):
        ne.ops.norm_linear(x, w, b, norm=norm, matmul_precision="low")
    # autograd: forward medium, backward exact (straight through)
    xg = x[:20].clone().requires_grad_()
    ne.ops.norm_linear(xg, w, b, norm=norm, matmul_precision="medium").sum().backward()
    xe = x[:20].clone().requires_grad_()
    ne.ops.norm_linear(xe, w, b, norm=norm).sum().backward()
    assert torch.equal(xg.grad, xe.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_16bit_activations(dtype, norm):
    """bfloat16 / float16 x (torch.autocast hands these on): computed from x widened to float32, y in
    x's dtype; gradients reach x (in its dtype) and the weight, equal to the float32 op's rounded."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 48, generator=g).to(dtype).requires_grad_()
    w = torch.randn(20, 48, generator=g, requires_grad=True)
    b = torch.randn(20, generator=g)
    y = ne.ops.norm_linear(x, w, b, norm=norm)
    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().clone().requires_grad_()
    y32 = ne.ops.norm_linear(x32, w32, b, norm=norm)
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype))
    dy = torch.randn(y.shape, generator=g)
    (y.float() * dy).sum().backward()
    (y32.to(dtype).float() * dy).sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, x32.grad.to(dtype))
    assert torch.allclose(w.grad, w32.grad)
    z = ne.ops.linear(x.detach(), w.detach(), b)
    assert z.dtype == dtype and torch.equal(z, ne.ops.linear(x.detach().float(), w.detach(), b).to(dtype))


LAYER_KIND = 0  # normengine.ops.norm.LAYER


def test_layer_rows_with_large_means_stay_exact(device, gen):
    """LayerNorm inside the GEMM subtracts mean * colsum(W) after the dot product, which cancels digits
    when a row's mean is large next to its spread (rows of 1e4 + N(0, 1) lost 4e-3 relative). On the CPU
    such rows are read centred (mean recomputed in float64), near-zero-mean rows raw; on CUDA every row is
    read as (x - mean_hi) - mean_lo, mean_lo = mean(x - mean_hi) (cuda/gemm.cu). Both kinds, mixed,
    match float64 to float32 accuracy, as the unfused layer_norm then linear does."""
    for off in (1e2, 1e4, 1e6):
        x = torch.randn(3, 7, 256, generator=gen) + off
        x[:, ::2] -= off  # every other row near zero mean
        w = torch.randn(96, 256, generator=gen) / 16
        b = torch.randn(96, generator=gen)
        xd, wcpu = x.double(), w
        n = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        want = n @ w.double().t() + b.double()
        x, w, b = x.to(device), w.to(device), b.to(device)
        assert rel_err(ne.ops.norm_linear(x, w, b, norm="layer"), want) < 2e-6
        y = torch.empty(3, 7, 96, device=device)
        assert ne.ops.norm_linear(x, w, b, norm="layer", out=y) is y and rel_err(y, want) < 2e-6
        xg = x.clone().requires_grad_()  # the autograd path reads the same forward
        assert rel_err(ne.ops.norm_linear(xg, w, b, norm="layer"), want) < 2e-6
        dy = torch.randn(3, 7, 96, generator=gen).to(device)  # backward: dx and dweight
        wg = w.clone().requires_grad_()
        gx, gw = torch.autograd.grad(ne.ops.norm_linear(xg, wg, b, norm="layer"), [xg, wg], dy)
        xd64, wd64 = xd.clone().requires_grad_(), wcpu.double().requires_grad_()
        n64 = (xd64 - xd64.mean(-1, keepdim=True)) / (xd64.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        hx, hw = torch.autograd.grad(n64 @ wd64.t(), [xd64, wd64], dy.double().cpu())
        assert rel_err(gx, hx) < 1e-5 and rel_err(gw, hw) < 1e-5
        # the composed form (torch GEMM + native statistics; float64 gradcheck runs it), in float32
        composed = sys.modules["normengine.ops.norm_linear"]._composed
        assert rel_err(composed(LAYER_KIND, x, w, b, 1e-5, None)[0], want) < 2e-6
