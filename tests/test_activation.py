"""normengine.ops.swiglu / geglu / gated_activation on every backend against the float64 reference
(normengine.reference.gated_activation) and torch's own composition: forward and backward, gradcheck in float64,
16-bit dtypes, odd widths, 3-D and non-contiguous inputs, NaN, bad arguments."""

import pytest
import torch
import torch.nn.functional as F

import normengine as ne
from conftest import rel_err
from normengine import reference as ref
from normengine.errors import ArgumentError, DeviceError, DTypeError, ShapeError

ACTS = ["silu", "gelu_tanh", "gelu", "relu"]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gated", [True, False])
def test_gradcheck(act, gated):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    if act == "relu":  # away from the kink, where the derivative is not defined
        a = (a.detach() + 0.2 * a.detach().sign()).requires_grad_()
    inputs = (a, b) if gated else (a,)
    assert torch.autograd.gradcheck(lambda *t: ne.ops.gated_activation(t[0], t[1] if gated else None, act), inputs)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", [1, 3, 4097])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_against_float64(device, act, n, dtype, tol):
    g = torch.Generator().manual_seed(n)
    a = (2 * torch.randn(2, 3, n, generator=g)).to(dtype).to(device).requires_grad_()
    b = torch.randn(2, 3, n, generator=g).to(dtype).to(device).requires_grad_()
    y = ne.ops.gated_activation(a, b, act)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = ref.gated_activation(ad, bd, act)
    assert y.dtype == dtype and y.shape == want.shape and rel_err(y, want) <= tol
    dy = torch.randn(2, 3, n, generator=g).to(dtype).to(device)
    y.backward(dy)
    want.backward(dy.double())
    assert rel_err(a.grad, ad.grad) <= tol and rel_err(b.grad, bd.grad) <= tol
    # ungated
    a2 = a.detach().clone().requires_grad_()
    y2 = ne.ops.gated_activation(a2, None, act)
    ad2 = a.detach().double().requires_grad_()
    w2 = ref.gated_activation(ad2, None, act)
    y2.backward(dy)
    w2.backward(dy.double())
    assert rel_err(y2, w2) <= tol and rel_err(a2.grad, ad2.grad) <= tol


def test_swiglu_geglu_are_torchs_compositions():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(64, 300, generator=g), torch.randn(64, 300, generator=g)
    assert rel_err(ne.ops.swiglu(a, b), F.silu(a) * b) <= 1e-6
    assert rel_err(ne.ops.geglu(a, b), F.gelu(a, approximate="tanh") * b) <= 1e-6
    assert rel_err(ne.ops.geglu(a, b, approximate="none"), F.gelu(a) * b) <= 1e-6


def test_noncontiguous_nan_and_large_values(device):
    g = torch.Generator().manual_seed(6)
    big = torch.randn(9, 80, generator=g).to(device)
    a, b = big[:, :40], big[:, 40:]  # column slices: rows with a stride past their width
    assert not a.is_contiguous()
    assert rel_err(ne.ops.swiglu(a, b), ref.gated_activation(a.double(), b.double())) <= 1e-5
    x = torch.tensor([[float("nan"), 80.0, -80.0, 1e30, -1e30, 0.0]], device=device)
    for act in ACTS:
        y = ne.ops.gated_activation(x, None, act)
        want = ref.gated_activation(x.double(), None, act)
        assert torch.isnan(y[0, 0])
        assert torch.allclose(y[0, 1:].double(), want[0, 1:], rtol=1e-5, atol=0), act


def test_bad_arguments():
    a = torch.randn(4, 8)
    with pytest.raises(ShapeError, match="up"):
        ne.ops.swiglu(a, torch.randn(4, 7))
    with pytest.raises(DTypeError, match="up"):
        ne.ops.swiglu(a, a.double())
    with pytest.raises(DTypeError, match="gate"):
        ne.ops.swiglu(a.long(), a)
    with pytest.raises(ArgumentError, match="activation"):
        ne.ops.gated_activation(a, a, "tanh")
    with pytest.raises(ArgumentError, match="approximate"):
        ne.ops.geglu(a, a, approximate="fast")
    if torch.cuda.is_available() and ne.cuda_available():
        with pytest.raises(DeviceError, match="up"):
            ne.ops.swiglu(a.cuda(), a)
