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
