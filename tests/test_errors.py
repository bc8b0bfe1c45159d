"""Bad input gets a clear exception naming the argument, never a crash or silently wrong output."""

import numpy as np
import pytest
import torch

import normengine as ne
from normengine import _C


def test_weight_shape_mismatch():
    x = torch.randn(4, 8)
    with pytest.raises(ne.ShapeError, match=r"weight.*\(8,\)"):
        ne.ops.layer_norm(x, torch.ones(7))
    with pytest.raises(ne.ShapeError, match="bias"):
        ne.ops.layer_norm(x, torch.ones(8), torch.zeros(8, 1))
    with pytest.raises(ValueError):  # errors are ValueErrors too
        ne.ops.rms_norm(x, torch.ones(9))


def test_residual_mismatch():
    x = torch.randn(4, 8)
    with pytest.raises(ne.ShapeError, match="residual"):
        ne.ops.add_layer_norm(x, torch.randn(4, 9))
    with pytest.raises(ne.DTypeError, match="residual"):
        ne.ops.add_rms_norm(x, torch.randn(4, 8, dtype=torch.float64))


def test_mixed_devices():
    x = torch.randn(4, 8)
    with pytest.raises(ne.DeviceError, match="weight"):
        ne.ops.layer_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ne.DeviceError, match="x"):
        ne.ops.layer_norm(torch.randn(4, 8, device="meta"))


def test_unsupported_dtypes():
    with pytest.raises(ne.DTypeError, match="x"):
        ne.ops.layer_norm(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ne.DTypeError, match="x"):
        ne.ops.rms_norm(torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ne.DTypeError, match="weight"):
        ne.ops.layer_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.int64))
    with pytest.raises(ne.DTypeError):
        ne.ops.layer_norm(np.ones((4, 8), dtype=np.int64))
    with pytest.raises(TypeError):  # DTypeError is a TypeError
        ne.ops.layer_norm([[1.0, 2.0]])


def test_bad_scalars_and_shapes():
    with pytest.raises(ne.ArgumentError, match="eps"):
        ne.ops.layer_norm(torch.randn(2, 3), eps=-1.0)
    with pytest.raises(ne.ArgumentError, match="eps"):
        ne.ops.rms_norm(torch.randn(2, 3), eps=float("nan"))
    with pytest.raises(ne.ShapeError, match="x"):
        ne.ops.layer_norm(torch.randn(3, 0))
    with pytest.raises(ne.ShapeError, match="x"):
        ne.ops.layer_norm(torch.tensor(1.0))
    with pytest.raises(ne.ShapeError, match="out"):
        ne.ops.layer_norm(torch.randn(3, 4), out=torch.empty(3, 5))
    with pytest.raises(ne.ArgumentError):
        ne.set_num_threads("4")


def test_empty_rows_are_fine():
    y = ne.ops.layer_norm(torch.randn(0, 16))
    assert y.shape == (0, 16)


def test_native_layer_checks_too():
    """The C++ entry points validate on their own: calling _C directly with bad views raises."""
    x = torch.randn(4, 8)
    y = torch.empty(4, 8)
    with pytest.raises(ne.DTypeError, match="weight"):
        _C.norm_forward(0, x, None, torch.ones(8, dtype=torch.float64), None, 1e-5, y, None, None, None, 0)
    with pytest.raises(ne.ShapeError, match="out"):
        _C.norm_forward(0, x, None, None, None, 1e-5, torch.empty(4, 9), None, None, None, 0)
    with pytest.raises(ne.ShapeError, match="rstd"):
        _C.norm_forward(1, x, None, None, None, 1e-6, y, None, None, torch.empty(3), 0)
    with pytest.raises(ne.ArgumentError, match="residual_out"):
        _C.norm_forward(1, x, x, None, None, 1e-6, y, None, None, None, 0)
    with pytest.raises(ne.ArgumentError, match="kind"):
        _C.norm_forward(7, x, None, None, None, 1e-6, y, None, None, None, 0)
    with pytest.raises(ne.ShapeError, match="x"):
        _C.norm_forward(0, x.t(), None, None, None, 1e-5, y.t(), None, None, None, 0)
    with pytest.raises(ne.DTypeError, match="x"):
        _C.norm_forward(0, "not a tensor", None, None, None, 1e-5, y, None, None, None, 0)
    with pytest.raises(ne.ArgumentError, match="x"):
        _C.norm_forward(0, None, None, None, None, 1e-5, y, None, None, None, 0)
    with pytest.raises(ne.ShapeError, match="grad_output"):
        _C.norm_backward(0, torch.randn(4, 7), x, None, torch.ones(4), None, y, None, None, 0)
    with pytest.raises(ne.ArgumentError, match="bias"):
        _C.norm_forward(2, x, None, None, torch.zeros(8), 1e-6, y, None, None, None, 0)


def test_out_buffers_that_overlap_inputs():
    """An out= buffer that shares memory with an input: the identical view is allowed where the kernel
    is row-local (norms, channel ops: each row is read before it is written) and gives the right answer;
    a partial overlap, or any overlap with a GEMM's input, raises instead of silently reading values it
    already overwrote."""
    from normengine import reference as R

    g = torch.Generator().manual_seed(5)
    for rows, n in ((64, 1024), (2048, 1100)):  # the second is written with streaming stores (>= 8 MiB)
        x = torch.randn(rows, n, generator=g)
        w, b, r = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(rows, n, generator=g)
        y = x.clone()
        assert ne.ops.layer_norm(y, w, b, out=y) is y
        assert torch.allclose(y, R.layer_norm(x, w, b), rtol=1e-5, atol=1e-5)
        xx, rr = x.clone(), r.clone()
        ne.ops.add_rms_norm(xx, rr, w, out=xx, residual_out=rr)  # the residual stream updated in place
        assert torch.allclose(xx, R.rms_norm(x + r, w), rtol=1e-5, atol=1e-5) and torch.equal(rr, x + r)
        buf = torch.empty(rows + 1, n)
        buf[1:] = x
        with pytest.raises(ne.ArgumentError, match="out partially overlaps x"):
            ne.ops.layer_norm(buf[1:], w, b, out=buf[:-1])
        with pytest.raises(ne.ArgumentError, match="residual_out is the same buffer as out"):
            ne.ops.add_layer_norm(xx, rr, w, b, out=xx, residual_out=xx)
        with pytest.raises(ne.ArgumentError, match="out partially overlaps residual"):
            ne.ops.add_layer_norm(x, buf[1:], w, b, out=buf[:-1])
    u = torch.randn(8, 16, generator=g)
    s = torch.randn(16, generator=g)
    v = u.clone()
    ne.ops.channel_affine(v, s, s, out=v)
    assert torch.allclose(v, u * s + s)
    # GEMMs read every row of x for every output column block: no in-place at all
    x = torch.randn(6, 32, generator=g)
    wsq = torch.randn(32, 32, generator=g)
    with pytest.raises(ne.ArgumentError, match="out is the same buffer as x"):
        ne.ops.linear(x, wsq, out=x)
    with pytest.raises(ne.ArgumentError, match="out is the same buffer as x"):
        ne.ops.norm_linear(x, wsq, out=x)
    qw = ne.ops.quantize_weight(torch.randn(32, 128, generator=g), "int8")
    flat = torch.randn(6 * 128 + 200, generator=g)  # out starts inside x's last row
    with pytest.raises(ne.ArgumentError, match="out partially overlaps x"):
        ne.ops.quantized_linear(flat[:768].view(6, 128), qw, out=flat[700:892].view(6, 32))


def test_negated_views():
    """A lazily negated view (torch._neg_view; x.conj().imag of a complex tensor) holds -x in memory, and
    torch's __dlpack__ exports that memory as is: inputs are resolved (values as for the plain tensor), an
    out= buffer that is one is refused, and the binding refuses any that reaches it (it gave silently
    negated operands before)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    x, r, w, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(8), torch.randn(8)
    neg = torch._neg_view
    assert neg(x).is_neg()
    torch.testing.assert_close(ne.ops.layer_norm(neg(x), neg(w), neg(b)), F.layer_norm(-x, (8,), -w, -b))
    torch.testing.assert_close(ne.ops.rms_norm(neg(x)), F.rms_norm(-x, (8,), eps=1e-6))
    y, h = ne.ops.add_layer_norm(x, neg(r))
    torch.testing.assert_close(h, x - r)
    torch.testing.assert_close(y, F.layer_norm(x - r, (8,)))
    W, bias = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    torch.testing.assert_close(ne.ops.linear(neg(x), neg(W), neg(bias)), F.linear(-x, -W, -bias))
    torch.testing.assert_close(ne.ops.norm_linear(neg(x), neg(W), neg(bias), norm="layer"),
                               F.linear(F.layer_norm(-x, (8,)), -W, -bias), rtol=1e-5, atol=1e-5)
    xc = torch.randn(4, 8, dtype=torch.complex64, generator=g).conj().imag  # is_neg, and strided
    torch.testing.assert_close(ne.ops.layer_norm(xc), F.layer_norm(xc.resolve_neg(), (8,)))
    with pytest.raises(ne.DTypeError, match="out: a negated view"):
        ne.ops.layer_norm(x, out=neg(torch.empty(4, 8)))
    with pytest.raises(ne.DTypeError, match="out: a negated view"):
        ne.ops.linear(x, W, out=neg(torch.empty(4, 5)))
    with pytest.raises(ne.DTypeError, match="x: a negated view"):
        _C.norm_forward(0, neg(x), None, None, None, 1e-5, torch.empty(4, 8), None, None, None, 0)


def test_negated_views_in_the_other_ops():
    """L-Mul, quantized and linear-attention ops read a negated input as its values (the same bits as on -x)."""
    neg = torch._neg_view
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(4, 64, generator=g), torch.randn(32, 64, generator=g)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    qw = ne.ops.quantize_weight(W, "int8")
    pairs = [
        (ne.ops.lmul(neg(x), x), ne.ops.lmul(-x, x)),
        (ne.ops.lmul_matmul(neg(x), neg(W.T)), ne.ops.lmul_matmul(-x, -W.T)),
        (ne.ops.quantized_linear(neg(x), qw), ne.ops.quantized_linear(-x, qw)),
        (ne.ops.quantize_weight(neg(W), "int8").dequantize(), ne.ops.quantize_weight(-W, "int8").dequantize()),
        (ne.ops.linear_attention(neg(q), neg(k), neg(v)), ne.ops.linear_attention(-q, -k, -v)),
    ]
    for got, want in pairs:
        assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_tensors_without_strided_memory():
    """Sparse and mkldnn tensors get an error naming the argument (not torch's own about memory formats), and
    a tensor whose data pointer is null (torch._efficientzerotensor) is refused by the binding (it segfaulted)."""
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    for t in (x.to_sparse(), x.to_sparse_csr(), x.to_mkldnn()):
        with pytest.raises(ne.DTypeError, match="x: expected a dense"):
            ne.ops.layer_norm(t)
        with pytest.raises(ne.DTypeError, match="residual: expected a dense"):
            ne.ops.add_rms_norm(x, t)
        with pytest.raises(ne.DTypeError, match="a: expected a dense"):
            ne.ops.lmul(t, x)
    for t in (w.to_sparse(), w.to_sparse_csr(), w.to_mkldnn()):
        with pytest.raises(ne.DTypeError, match="weight: expected a dense"):
            ne.ops.linear(x, t)
    with pytest.raises(ne.DTypeError, match="weight: expected a dense"):
        ne.ops.layer_norm(x, torch.randn(8).to_sparse())
    with pytest.raises(ne.DTypeError, match="bias: expected a dense"):
        ne.ops.linear(x, w, torch.randn(3).to_sparse())
    z = torch._efficientzerotensor(4, 8)
    for call, name in ((lambda: ne.ops.layer_norm(z), "x"), (lambda: ne.ops.add_layer_norm(x, z), "residual"),
                       (lambda: ne.ops.linear(x, torch._efficientzerotensor(3, 8)), "weight")):
        with pytest.raises(ne.DTypeError, match=f"{name}: a tensor without memory"):
            call()
    with pytest.raises(ne.DTypeError, match="sparse"):
        _C.norm_forward(0, x.to_sparse(), None, None, None, 1e-5, torch.empty(4, 8), None, None, None, 0)
