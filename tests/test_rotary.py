"""normengine.ops.rotary_embedding / apply_rotary_pos_emb on every backend against the reference formula
(transformers' apply_rotary_pos_emb) in float64: forward and backward, gradcheck, 16-bit dtypes, partial rotary,
broadcast tables, halves that differ, non-contiguous inputs, transformers' own function, bad arguments."""

import pytest
import torch

import normengine as ne
from conftest import rel_err
from normengine import reference as ref
from normengine.errors import ArgumentError, ShapeError


def _tables(lead, R, g, dtype=torch.float32, same_halves=True):
    f = torch.randn(*lead, R // 2 if same_halves else R, generator=g, dtype=torch.float64) * 3
    emb = torch.cat([f, f], -1) if same_halves else f
    return emb.cos().to(dtype), emb.sin().to(dtype)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 10, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables((2, 1, 5), 8, g, torch.float64, same_halves=False)
    assert torch.autograd.gradcheck(lambda t: ne.ops.rotary_embedding(t, cos, sin), (x,))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("D,R", [(64, 64), (96, 32), (2, 2), (130, 130)])
def test_against_reference(device, dtype, tol, D, R):
    g = torch.Generator().manual_seed(D + R)
    x = torch.randn(2, 4, 7, D, generator=g).to(dtype).to(device).requires_grad_()
    cos, sin = (t.to(device) for t in _tables((2, 1, 7), R, g, same_halves=R != 130))
    y = ne.ops.rotary_embedding(x, cos, sin)
    xd = x.detach().double().requires_grad_()
    want = ref.rotary_embedding(xd, cos.double(), sin.double())
    assert y.dtype == dtype and y.shape == x.shape and rel_err(y, want) <= tol
    dy = torch.randn(y.shape, generator=g).to(dtype).to(device)
    y.backward(dy)
    want.backward(dy.double())
    assert rel_err(x.grad, xd.grad) <= tol


def test_transformers_layouts_and_noncontiguous(device):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    g = torch.Generator().manual_seed(3)
    qs = torch.randn(2, 9, 4, 16, generator=g).to(device)  # [B, T, H, D] as projected ...
    q = qs.transpose(1, 2)                                   # ... seen as [B, H, T, D]: not contiguous
    k = torch.randn(2, 2, 9, 16, generator=g).to(device)
    cos, sin = (t.to(device) for t in _tables((2, 9), 16, g))
    got_q, got_k = ne.ops.apply_rotary_pos_emb(q, k, cos, sin)
    want_q, want_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert rel_err(got_q, want_q) <= 1e-6 and rel_err(got_k, want_k) <= 1e-6
    # one [T, D] table for every batch and head
    c2, s2 = (t.to(device) for t in _tables((9,), 16, g))
    assert rel_err(ne.ops.rotary_embedding(k, c2, s2), ref.rotary_embedding(k, c2, s2)) <= 1e-6


def test_bad_arguments():
    x = torch.randn(2, 5, 8)
    cos, sin = _tables((5,), 8, torch.Generator().manual_seed(1))
    with pytest.raises(ShapeError, match="cos"):
        ne.ops.rotary_embedding(x, cos[:, :7], sin[:, :7])  # odd width
    with pytest.raises(ShapeError, match="cos"):
        ne.ops.rotary_embedding(x[..., :6], cos, sin)  # wider than x
    with pytest.raises(ShapeError, match="broadcast"):
        ne.ops.rotary_embedding(x, cos[:4], sin[:4])
    with pytest.raises(ShapeError, match="sin"):
        ne.ops.rotary_embedding(x, cos, sin[:, :6])
    with pytest.raises(ArgumentError, match="detached"):
        ne.ops.rotary_embedding(x, cos.requires_grad_(), sin)


def test_native_entry_checks_the_position_rows():
    from normengine import _C

    x, y = torch.randn(3, 8), torch.empty(3, 8)
    cos, sin = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ArgumentError, match=r"position_rows\[1\] = 5"):
        _C.rotary_embedding(x, cos, sin, torch.tensor([0, 5, 1]), y, False)
    with pytest.raises(ShapeError, match="position_rows"):
        _C.rotary_embedding(x, cos, sin, torch.tensor([0, 1]), y, False)
