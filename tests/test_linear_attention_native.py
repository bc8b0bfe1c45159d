"""The native CPU training kernels of linear_attention / mala_attention / norm_attention
(cpp/ops/linear_attention_train.cpp, chunked, C = 64): forward against the float64 token-by-token
reference, backward (q, k, v, initial state; through o and the final state) against torch autograd of
that reference, for every kind / feature map / normalize / out-norm / decay / causal combination and
T around the chunk edges; bf16 / fp16 inputs; non-contiguous inputs; thread counts; every CPU ISA;
bad arguments of the _C entry points."""

import pytest
import torch

import normengine as ne
from normengine import _C, errors
import importlib

LA = importlib.import_module("normengine.ops.linear_attention")
from normengine.reference import linear_attention as R
from conftest import _supported_isas, rel_err

# name -> (op kwargs, reference fn, reference kwargs). Identity + normalize is left out: its
# denominator q . z cancels, so fp32 against fp64 is ill-conditioned by construction.
CONFIGS = {
    "linear-elu1": ("linear", {"feature_map": "elu1"}, {"feature_map_name": "elu1"}),
    "linear-elu1-raw": ("linear", {"feature_map": "elu1", "normalize": False},
                        {"feature_map_name": "elu1", "normalize": False}),
    "linear-relu": ("linear", {"feature_map": "relu"}, {"feature_map_name": "relu"}),
    "linear-relu-raw": ("linear", {"feature_map": "relu", "normalize": False},
                        {"feature_map_name": "relu", "normalize": False}),
    "linear-identity-raw": ("linear", {"feature_map": "identity", "normalize": False},
                            {"feature_map_name": "identity", "normalize": False}),
    "mala": ("mala", {}, {}),
    "norm-rms": ("norm", {"norm": "rms"}, {"norm": "rms"}),
    "norm-layer": ("norm", {"norm": "layer"}, {"norm": "layer"}),
    "norm-rms-decay": ("norm", {"norm": "rms", "decay": "yes"}, {"norm": "rms", "decay": "yes"}),
    "norm-layer-decay": ("norm", {"norm": "layer", "decay": "yes"}, {"norm": "layer", "decay": "yes"}),
}
CAUSAL_ONLY = {"norm-rms-decay", "norm-layer-decay"}
# Gradients that cancel to ~0 (dq at T = 1 without a state: a one-token MALA / normalized / normed
# readout hardly depends on q, and what is left is a difference of large terms) are compared against
# a tenth of the largest gradient of the same test (rel_err's floor) instead of their own maximum.
GRAD_FLOOR = 0.1


def _floor(b, few_tokens=False):
    """few_tokens (T <= 3, no state): a denominator of one or two products (relu . relu + eps) can be
    arbitrarily small, so the whole test's gradient scale is the floor."""
    return (1.0 if few_tokens else GRAD_FLOOR) * max(y.grad.abs().max().item() for y in b)


def _decay(H):
    return torch.tensor([0.9, 0.99, 0.7, 1.0][:H] + [0.95] * max(0, H - 4))


def _call(name, q, k, v, causal, S0=None, **extra):
    kind, kw, _ = CONFIGS[name]
    kw = dict(kw)
    if kw.get("decay") == "yes":
        kw["decay"] = _decay(q.shape[2])
    op = {"linear": ne.ops.linear_attention, "mala": ne.ops.mala_attention, "norm": ne.ops.norm_attention}[kind]
    return op(q, k, v, causal=causal, initial_state=S0, output_final_state=True, **kw, **extra)


def _ref(name, q, k, v, causal, S0=None):
    kind, _, rkw = CONFIGS[name]
    rkw = dict(rkw)
    if rkw.get("decay") == "yes":
        rkw["decay"] = _decay(q.shape[2]).double()
    fn = {"linear": R.linear_attention, "mala": R.mala_attention, "norm": R.norm_attention}[kind]
    return fn(q, k, v, causal=causal, initial_state=S0, **rkw)


def _inputs(B, T, H, Dk, Dv, gen, dtype=torch.float32):
    q = torch.randn(B, T, H, Dk, generator=gen)
    k = torch.randn(B, T, H, Dk, generator=gen)
    v = torch.randn(B, T, H, Dv, generator=gen)
    S0 = torch.rand(B, H, Dk + 1, Dv + 1, generator=gen)
    S0[:, :, Dk, Dv] = 4.0  # as if 4 tokens came before
    return [t.to(dtype) for t in (q, k, v, S0)]


def _fwd_ok(name, o, ro, q, k, v, causal, S0):
    """o within 1e-5 of the float64 reference, or (an ill-conditioned draw: a LayerNorm / RMS readout
    over a few channels of small spread, a relu denominator near 0) no worse than 3x the float32
    evaluation of the reference itself."""
    err = rel_err(o, ro)
    if err <= 1e-5:
        return True
    with torch.no_grad():
        r32 = _ref(name, q.float(), k.float(), v.float(), causal, None if S0 is None else S0.float())[0]
    return err <= 3 * rel_err(r32, ro)


def _params(names):
    return [(n, c) for n in names for c in (True, False) if c or n not in CAUSAL_ONLY]


def _grads(name, q, k, v, causal, S0, with_gS, gen, native=True):
    """(o, S, grads of q, k, v, S0) of ours and of the float64 reference under one random cotangent."""
    a = [t.clone().requires_grad_() for t in (q, k, v)] + ([None] if S0 is None else [S0.clone().requires_grad_()])
    b = [t.double().clone().requires_grad_() for t in (q, k, v)] + (
        [None] if S0 is None else [S0.double().clone().requires_grad_()])
    o, S = _call(name, *a[:3], causal, a[3])
    ro, rS = _ref(name, *b[:3], causal, b[3])
    go = torch.randn(o.shape, generator=gen)
    loss = (o * go).sum()
    rloss = (ro * go.double()).sum()
    gS = None
    if with_gS:
        gS = torch.randn(S.shape, generator=gen)
        loss = loss + (S * gS).sum()
        rloss = rloss + (rS * gS.double()).sum()
    loss.backward()
    rloss.backward()
    _grads.cotangents = (go, gS)
    return o, S, ro, rS, [x for x in a if x is not None], [y for y in b if y is not None]


def _ref_grads_f32(name, q, k, v, causal, S0, go, gS):
    """The gradients of the reference evaluated in float32 (torch autograd): what float32 itself
    allows on this draw (a relu feature map's small denominators make some draws ill-conditioned)."""
    c = [t.clone().requires_grad_() for t in (q, k, v)] + ([] if S0 is None else [S0.clone().requires_grad_()])
    ro, rS = _ref(name, *c[:3], causal, c[3] if S0 is not None else None)
    loss = (ro * go).sum() + ((rS * gS).sum() if gS is not None else 0)
    loss.backward()
    return [t.grad for t in c]


def test_native_path_is_used(gen):
    q, k, v, _ = _inputs(1, 5, 2, 4, 3, gen)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert LA._native(q.to(dt))
    assert not LA._native(q.double())
    assert not LA._native(q, "recurrent")
    # the op's output is the _C kernel's, bit for bit
    o = ne.ops.linear_attention(q, k, v)
    o2 = torch.empty_like(o)
    _C.linear_attention_forward(0, 0, True, True, 0, 1e-6, q, k, v, None, None, o2, None)
    assert torch.equal(o, o2)


@pytest.mark.parametrize("name,causal", _params(CONFIGS))
@pytest.mark.parametrize("T", [1, 3, 63, 64, 65, 200, 4097])
@pytest.mark.parametrize("with_state", [True, False])
def test_forward_matches_reference(name, causal, T, with_state, gen):
    if T == 4097 and not with_state:
        pytest.skip("T = 4097 runs once per config (with a state)")
    B, H = (2, 3) if T < 4097 else (1, 2)
    q, k, v, S0 = _inputs(B, T, H, 6, 5, gen)
    S0 = S0 if with_state else None
    o, S = _call(name, q, k, v, causal, S0)
    ro, rS = _ref(name, q.double(), k.double(), v.double(), causal, None if S0 is None else S0.double())
    assert o.shape == (B, T, H, 5) and o.dtype == torch.float32
    assert S.shape == (B, H, 7, 6) and S.dtype == torch.float32
    assert _fwd_ok(name, o, ro, q, k, v, causal, S0)
    assert rel_err(S, rS) <= 1e-5


@pytest.mark.parametrize("name,causal", _params(CONFIGS))
@pytest.mark.parametrize("T", [1, 3, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state,with_gS", [(True, True), (False, False), (True, False), (False, True)])
def test_backward_matches_reference_autograd(name, causal, T, with_state, with_gS, gen):
    q, k, v, S0 = _inputs(2, T, 2, 6, 5, gen)
    o, S, ro, rS, a, b = _grads(name, q, k, v, causal, S0 if with_state else None, with_gS, gen)
    assert _fwd_ok(name, o.detach(), ro.detach(), q, k, v, causal, S0 if with_state else None)
    assert rel_err(S, rS) <= 1e-5
    floor = _floor(b, few_tokens=T <= 3 and not with_state)
    f32 = None
    for i, (which, x, y) in enumerate(zip("q k v S0".split(), a, b)):
        assert x.grad is not None and x.grad.dtype == x.dtype, which
        err = rel_err(x.grad, y.grad, floor=floor)
        if err > 1e-4:
            # An ill-conditioned draw: with a relu feature map and normalize, phi(q) . z can be tiny,
            # and dq = sum_j B_ij phi(k_j), B_ij = dr_i . [v_j; 1], cancels its numerator and
            # denominator parts to ~1/den of their size, so float32 rounding there is amplified (the
            # chunked sums run in another order than the reference's cumulative sums). Then: within
            # 10x the error of the reference itself evaluated in float32, or 5e-4.
            if f32 is None:
                f32 = _ref_grads_f32(name, q, k, v, causal, S0 if with_state else None, *_grads.cotangents)
            ref32 = rel_err(f32[i], y.grad, floor=floor)
            assert err <= max(5e-4, 10 * ref32), (which, err, ref32)


@pytest.mark.parametrize("name", ["linear-elu1", "mala", "norm-layer-decay", "linear-relu-raw"])
def test_backward_long_sequence(name, gen):
    q, k, v, S0 = _inputs(1, 4097, 1, 6, 5, gen)
    o, S, ro, rS, a, b = _grads(name, q, k, v, True, S0, True, gen)
    for which, x, y in zip("q k v S0".split(), a, b):
        assert rel_err(x.grad, y.grad, floor=_floor(b)) <= 1e-4, which


@pytest.mark.parametrize("isa", _supported_isas())
@pytest.mark.parametrize("name,causal", _params(["linear-elu1", "linear-relu", "mala", "norm-rms", "norm-layer-decay"]))
def test_every_isa_and_wide_heads(isa, name, causal, gen):
    """Head dims past one vector (Dk 33, Dv 20), forward and backward, with each ISA's kernels."""
    best = _C.cpu_isa()
    _C.force_cpu_isa(isa)
    try:
        q, k, v, S0 = _inputs(1, 130, 2, 33, 20, gen)
        o, S, ro, rS, a, b = _grads(name, q, k, v, causal, S0, True, gen)
    finally:
        _C.force_cpu_isa(best)
    assert _fwd_ok(name, o.detach(), ro.detach(), q, k, v, causal, S0) and rel_err(S, rS) <= 1e-5
    for which, x, y in zip("q k v S0".split(), a, b):
        assert rel_err(x.grad, y.grad, floor=_floor(b)) <= 1e-4, which


@pytest.mark.parametrize("name", ["linear-elu1", "mala", "norm-rms"])
def test_recurrent_request_agrees(name, gen):
    q, k, v, S0 = _inputs(1, 100, 2, 8, 6, gen)
    o, S = _call(name, q, k, v, True, S0)
    o2, S2 = _call(name, q, k, v, True, S0, algorithm="recurrent")
    assert rel_err(o, o2) <= 1e-5 and rel_err(S, S2) <= 1e-5


@pytest.mark.parametrize("name", ["linear-elu1", "mala", "norm-rms", "norm-layer-decay"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(name, dtype, gen):
    T = 8192 if dtype == torch.bfloat16 else 700
    q, k, v, _ = _inputs(1, T, 2, 16, 16, gen)
    o32, _ = _call(name, q, k, v, True)
    qh, kh, vh = (t.to(dtype).requires_grad_() for t in (q, k, v))
    o, S = _call(name, qh, kh, vh, True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert ((o.float() - o32).norm() / o32.norm()).item() < 0.05
    o.float().square().mean().backward()
    for t in (qh, kh, vh):
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
    # the kernel accumulates in float32: the same rounded inputs in float32 give (nearly) the same output
    o_up, _ = _call(name, *(t.detach().float() for t in (qh, kh, vh)), True)
    assert rel_err(o.float(), o_up) <= 1e-2


def test_non_contiguous_inputs(gen):
    """Transposed views (any strides; the last dim contiguous or not) give the contiguous result."""
    B, T, H, D = 2, 70, 3, 8
    qt = torch.randn(B, H, T, D, generator=gen).transpose(1, 2)           # [B, T, H, D], unit last stride
    kt = torch.randn(B, T, D, H, generator=gen).transpose(2, 3)           # last-dim stride H
    vt = torch.randn(T, B, H, 5, generator=gen).transpose(0, 1)[..., ::1]
    assert not qt.is_contiguous() and not kt.is_contiguous() and not vt.is_contiguous()
    for name in ("linear-elu1", "mala", "norm-layer-decay"):
        for causal in (True, False) if name not in CAUSAL_ONLY else (True,):
            a = [t.clone().requires_grad_() for t in (qt, kt, vt)]
            c = [t.contiguous().requires_grad_() for t in (qt, kt, vt)]
            o1, S1 = _call(name, *a, causal)
            o2, S2 = _call(name, *c, causal)
            assert rel_err(o1, o2) <= 1e-6 and rel_err(S1, S2) <= 1e-6
            go = torch.randn(o1.shape, generator=gen)
            (o1 * go).sum().backward()
            (o2 * go).sum().backward()
            for x, y in zip(a, c):
                assert rel_err(x.grad, y.grad) <= 1e-6


def test_thread_counts_agree(gen):
    q, k, v, S0 = _inputs(2, 300, 3, 8, 6, gen)
    before = ne.num_threads()
    out = []
    try:
        for n in (1, 2):
            ne.set_num_threads(n)
            a = [t.clone().requires_grad_() for t in (q, k, v, S0)]
            o, S = _call("mala", *a[:3], True, a[3])
            ((o * o).sum() + S.sum()).backward()
            out.append([o, S] + [t.grad for t in a])
    finally:
        ne.set_num_threads(before)
    for x, y in zip(*out):
        assert torch.equal(x, y)


def _fwd_args(q, k, v, o, decay=None, S0=None, S=None, kind=0):
    return (kind, 0, True, True, 0, 1e-6, q, k, v, decay, S0, o, S)


def test_bad_input(gen):
    q, k, v, S0 = _inputs(1, 5, 2, 4, 3, gen)
    o = torch.empty(1, 5, 2, 3)
    S = torch.empty(1, 2, 5, 4)
    f = _C.linear_attention_forward
    f(*_fwd_args(q, k, v, o, S0=S0, S=S))  # the good call
    with pytest.raises(errors.ShapeError, match="^o:"):
        f(*_fwd_args(q, k, v, torch.empty(1, 5, 2, 4)))
    with pytest.raises(errors.DTypeError, match="^q:"):
        f(*_fwd_args(q.double(), k.double(), v.double(), o.double()))
    with pytest.raises(errors.DTypeError, match="^k:"):
        f(*_fwd_args(q, k.bfloat16(), v, o))
    with pytest.raises(errors.DTypeError, match="^o:"):
        f(*_fwd_args(q, k, v, o.half()))
    with pytest.raises(errors.ShapeError, match="^v:"):
        f(*_fwd_args(q, k, v[:, :4], o))
    with pytest.raises(errors.ShapeError, match="^k:"):
        f(*_fwd_args(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, o))
    with pytest.raises(errors.ShapeError, match="^initial_state:"):
        f(*_fwd_args(q, k, v, o, S0=S0[..., :-1].contiguous()))
    with pytest.raises(errors.DTypeError, match="^final_state:"):
        f(*_fwd_args(q, k, v, o, S=S.double()))
    with pytest.raises(errors.ShapeError, match="^final_state:"):
        f(*_fwd_args(q, k, v, o, S=torch.empty(1, 2, 4, 5).transpose(2, 3)))
    with pytest.raises(errors.ArgumentError, match="^decay:"):
        f(*_fwd_args(q, k, v, o, decay=torch.tensor([0.9, 0.9])))  # kind linear
    with pytest.raises(errors.ShapeError, match="^decay:"):
        f(*_fwd_args(q, k, v, o, decay=torch.tensor([0.9]), kind=2))
    with pytest.raises(errors.ArgumentError, match="^decay:"):
        f(*_fwd_args(q, k, v, o, decay=torch.tensor([0.9, 1.5]), kind=2))
    with pytest.raises(errors.ArgumentError, match="kind"):
        f(*_fwd_args(q, k, v, o, kind=3))
    with pytest.raises(errors.ShapeError, match="^q:"):
        f(*_fwd_args(q[0], k[0], v[0], o[0]))
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    b = _C.linear_attention_backward
    b(0, 0, True, True, 0, 1e-6, q, k, v, None, S0, o, S, gq, gk, gv, torch.empty_like(S0))  # the good call
    with pytest.raises(errors.ShapeError, match="^grad_v:"):
        b(0, 0, True, True, 0, 1e-6, q, k, v, None, None, o, None, gq, gk, gv[..., :2], None)
    with pytest.raises(errors.DTypeError, match="^grad_o:"):
        b(0, 0, True, True, 0, 1e-6, q, k, v, None, None, o.bfloat16(), None, gq, gk, gv, None)
    with pytest.raises(errors.ShapeError, match="^grad_initial_state:"):
        b(0, 0, True, True, 0, 1e-6, q, k, v, None, S0, o, None, gq, gk, gv, torch.empty(1, 2, 5, 5))
    with pytest.raises(errors.DTypeError, match="^grad_final_state:"):
        b(0, 0, True, True, 0, 1e-6, q, k, v, None, None, o, S.half(), gq, gk, gv, None)
