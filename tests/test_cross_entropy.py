"""normengine.ops.cross_entropy / linear_cross_entropy on every backend against the float64 reference
(normengine.reference.cross_entropy) and torch: losses and gradients, gradcheck in float64, odd vocabularies,
ignored rows, label smoothing, large offsets, NaN, chunking, non-contiguous inputs, bad arguments."""

import pytest
import torch
import torch.nn.functional as F

import normengine as ne
from conftest import rel_err
from normengine import reference as ref
from normengine.errors import ArgumentError, DeviceError, DTypeError, ShapeError

REDUCTIONS = ["mean", "sum", "none"]


def _targets(n, V, g, ignore=(), device="cpu"):
    t = torch.randint(0, V, (n,), generator=g)
    for i in ignore:
        t[i] = -100
    return t.to(device)


def _grad_out(loss, g):
    return torch.randn(loss.shape, generator=g, dtype=loss.dtype).to(loss.device) if loss.dim() else \
        torch.tensor(1.7, dtype=loss.dtype, device=loss.device)


@pytest.mark.parametrize("V", [1, 3, 4097])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_against_float64(device, V, reduction, smoothing):
    g = torch.Generator().manual_seed(V)
    z = (3 * torch.randn(13, V, generator=g)).to(device).requires_grad_()
    t = _targets(13, V, g, ignore=(2, 7), device=device)
    loss = ne.ops.cross_entropy(z, t, reduction=reduction, label_smoothing=smoothing)
    zd = z.detach().double().requires_grad_()
    want = ref.cross_entropy(zd, t, reduction=reduction, label_smoothing=smoothing)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    # (floor: with V = 1 every loss and gradient is 0, the float64 reference's ~1e-17 rounding included)
    assert rel_err(loss.double(), want, floor=1e-6) <= 1e-5
    go = _grad_out(want, g)
    loss.backward(go.float())
    want.backward(go)
    assert rel_err(z.grad.double(), zd.grad, floor=1e-6) <= 1e-5
    # torch's own loss agrees too (the reference's definition is torch's)
    assert rel_err(want, F.cross_entropy(zd.detach(), t, reduction=reduction, label_smoothing=smoothing),
                   floor=1e-6) <= 1e-9


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_gradcheck(reduction, smoothing):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = _targets(6, 9, g, ignore=(4,))
    assert torch.autograd.gradcheck(
        lambda a: ne.ops.cross_entropy(a, t, reduction=reduction, label_smoothing=smoothing), (z,))
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    t = _targets(7, 11, g, ignore=(0,))
    assert torch.autograd.gradcheck(
        lambda a, w, c: ne.ops.linear_cross_entropy(a, w, t, c, reduction=reduction, label_smoothing=smoothing,
                                                    chunk_size=3), (x, W, b))


@pytest.mark.parametrize("chunk", [1, 3, None])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_against_reference(device, chunk, reduction, bias):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, 32, generator=g).to(device).requires_grad_()  # 3-D: [batch, tokens, hidden]
    W = (0.3 * torch.randn(1001, 32, generator=g)).to(device).requires_grad_()
    b = torch.randn(1001, generator=g).to(device).requires_grad_() if bias else None
    t = _targets(18, 1001, g, ignore=(3,), device=device).reshape(2, 9)
    loss = ne.ops.linear_cross_entropy(x, W, t, b, reduction=reduction, label_smoothing=0.05, chunk_size=chunk)
    leaves = [v for v in (x, W, b) if v is not None]
    dl = [v.detach().double().requires_grad_() for v in leaves]
    want = ref.linear_cross_entropy(*dl[:2], t, dl[2] if bias else None, reduction=reduction, label_smoothing=0.05)
    assert loss.shape == want.shape and rel_err(loss.double(), want) <= 1e-5
    go = _grad_out(want, g)
    got = torch.autograd.grad(loss, leaves, go.float())
    exp = torch.autograd.grad(want, dl, go)
    for name, a, e in zip(("x", "weight", "bias"), got, exp):
        assert a.dtype == torch.float32 and rel_err(a.double(), e) <= 1e-5, name


def test_linear_cross_entropy_bf16_and_noncontiguous():
    g = torch.Generator().manual_seed(3)
    xf = torch.randn(40, 64, generator=g)
    Wf = 0.2 * torch.randn(64, 515, generator=g)  # stored transposed: weight = Wf.T is a non-contiguous view
    t = _targets(40, 515, g, ignore=(1, 2))
    x = xf.bfloat16().requires_grad_()
    W = Wf.bfloat16().requires_grad_()
    loss = ne.ops.linear_cross_entropy(x, W.t(), t, chunk_size=7)
    want = F.cross_entropy(F.linear(x.double(), W.t().double()), t)
    assert loss.dtype == torch.bfloat16 and rel_err(loss.double(), want) <= 1e-2
    loss.backward()
    xd, Wd = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    F.cross_entropy(F.linear(xd, Wd.t()), t).backward()
    assert x.grad.dtype == torch.bfloat16 and rel_err(x.grad.double(), xd.grad) <= 1e-2
    assert rel_err(W.grad.double(), Wd.grad) <= 1e-2
    # float32 through a non-contiguous x (a column slice) and weight view
    big = torch.randn(40, 80, generator=g)
    xs = big[:, 8:72]
    assert not xs.is_contiguous()
    l32 = ne.ops.linear_cross_entropy(xs, Wf.t(), t)
    assert rel_err(l32.double(), F.cross_entropy(F.linear(xs.double(), Wf.t().double()), t)) <= 1e-5


def test_large_offsets_nan_and_caller_logits_untouched(device):
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(9, 257, generator=g) + 1e4).to(device)
    t = _targets(9, 257, g, device=device)
    keep = z.clone()
    zr = z.clone().requires_grad_()
    loss = ne.ops.cross_entropy(zr, t)
    loss.backward()
    zd = z.double().requires_grad_()
    want = ref.cross_entropy(zd, t)
    want.backward()
    assert rel_err(loss.double(), want) <= 1e-5 and rel_err(zr.grad.double(), zd.grad) <= 1e-5
    assert torch.equal(zr.detach(), keep)  # the gradient was made in a copy
    z[4, 17] = float("nan")
    per_row = ne.ops.cross_entropy(z, t, reduction="none")
    assert torch.isnan(per_row[4]) and torch.isfinite(per_row[torch.arange(9, device=device) != 4]).all()
    assert torch.isnan(ne.ops.cross_entropy(z, t))


def test_all_rows_ignored_and_one_class():
    z = torch.randn(4, 6, requires_grad=True)
    t = torch.full((4,), -100)
    assert torch.isnan(ne.ops.cross_entropy(z, t)) == torch.isnan(F.cross_entropy(z, t))
    assert ne.ops.cross_entropy(z, t, reduction="sum").item() == 0.0
    # V = 1: every loss is exactly 0 (logsumexp of one logit is the logit)
    one = torch.randn(5, 1)
    assert torch.equal(ne.ops.cross_entropy(one, torch.zeros(5, dtype=torch.long), reduction="none"), torch.zeros(5))


def test_bad_arguments_name_what_is_wrong():
    z = torch.randn(4, 10)
    t = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ArgumentError, match=r"target\[2\] = 10"):
        ne.ops.cross_entropy(z, torch.tensor([1, 2, 10, 4]))
    with pytest.raises(ArgumentError, match=r"target\[0\] = -1"):
        ne.ops.linear_cross_entropy(torch.randn(2, 3), torch.randn(10, 3), torch.tensor([-1, 2]))
    with pytest.raises(DTypeError, match="target"):
        ne.ops.cross_entropy(z, t.float())
    with pytest.raises(ShapeError, match="target"):
        ne.ops.cross_entropy(z, t[:3])
    with pytest.raises(DTypeError, match="logits"):
        ne.ops.cross_entropy(z.long(), t)
    with pytest.raises(ArgumentError, match="reduction"):
        ne.ops.cross_entropy(z, t, reduction="avg")
    with pytest.raises(ArgumentError, match="label_smoothing"):
        ne.ops.cross_entropy(z, t, label_smoothing=1.5)
    with pytest.raises(ArgumentError, match="ignore_index"):
        ne.ops.cross_entropy(z, t, ignore_index=1.0)
    x, W = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ShapeError, match="x"):
        ne.ops.linear_cross_entropy(torch.randn(4, 5), W, t)
    with pytest.raises(ShapeError, match="weight"):
        ne.ops.linear_cross_entropy(x, W[None], t)
    with pytest.raises(DTypeError, match="weight"):
        ne.ops.linear_cross_entropy(x, W.double(), t)
    with pytest.raises(ShapeError, match="bias"):
        ne.ops.linear_cross_entropy(x, W, t, torch.randn(9))
    with pytest.raises(ArgumentError, match="chunk_size"):
        ne.ops.linear_cross_entropy(x, W, t, chunk_size=0)
    if torch.cuda.is_available() and ne.cuda_available():
        with pytest.raises(DeviceError, match="target"):
            ne.ops.cross_entropy(z.cuda(), t)


@pytest.mark.skipif(not (torch.cuda.is_available() and ne.cuda_available()), reason="no CUDA GPU visible")
def test_cuda_matches_cpu_and_checks_targets():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 96, generator=g)
    W = 0.2 * torch.randn(50257, 96, generator=g)
    t = _targets(300, 50257, g, ignore=(5,))
    cpu = ne.ops.linear_cross_entropy(x, W, t, label_smoothing=0.1)
    gpu = ne.ops.linear_cross_entropy(x.cuda(), W.cuda(), t.cuda(), label_smoothing=0.1)
    assert rel_err(gpu.cpu().double(), cpu.double()) <= 1e-5
    with pytest.raises(ArgumentError, match=r"target\[1\]"):
        ne.ops.cross_entropy(torch.randn(3, 4, device="cuda"), torch.tensor([0, 4, 1], device="cuda"))


def test_loss_modules():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(12, 40, generator=g)
    t = _targets(12, 40, g, ignore=(0,))
    for red in REDUCTIONS:
        m = ne.nn.CrossEntropyLoss(reduction=red, label_smoothing=0.1)
        assert rel_err(m(z, t), torch.nn.CrossEntropyLoss(reduction=red, label_smoothing=0.1)(z, t)) <= 1e-6
    h, W, b = torch.randn(12, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    m = ne.nn.LinearCrossEntropyLoss(chunk_size=5)
    assert rel_err(m(h, W, t, b), F.cross_entropy(F.linear(h, W, b), t)) <= 1e-6
    assert "label_smoothing" in repr(m)


def test_repeated_backward_accumulates_correctly():
    """The gradients handed back as made (incoming gradient 1) are never written into: .grad accumulates
    the same values on every backward of a retained graph."""
    g = torch.Generator().manual_seed(12)
    x, W = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(9, 4, generator=g, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=g)
    loss = ne.ops.linear_cross_entropy(x, W, t)
    for _ in range(3):
        loss.backward(retain_graph=True)
    xr, Wr = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(xr, Wr), t).backward()
    assert rel_err(W.grad, 3 * Wr.grad) <= 1e-5 and rel_err(x.grad, 3 * xr.grad) <= 1e-5
