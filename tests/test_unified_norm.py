"""normengine.nn.UnifiedNorm (Unified Normalization, Yang et al. 2022) against hand-written
pure-torch computations of its formulas: warm-up / eval forward, exact gradient during warm-up,
geometric-mean window, running_var EMA, compensated backward with r clamping, outlier filtration,
dtypes and shapes, and a small training run against LayerNorm."""

import pytest
import torch

import normengine
from normengine import errors
from normengine.nn import UnifiedNorm
from normengine.reference import unified_norm_eval

_HAS_CUDA = torch.cuda.is_available() and normengine.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA build/GPU"))]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, device="cpu", dtype=torch.float64, scale=1.0):
    """Random normal on the CPU generator, then moved (same numbers on every device)."""
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    return t.to(device=device, dtype=dtype)


def _rel_err(a, ref):
    """max |a - ref| / max |ref|, computed in float64."""
    a, ref = a.double().cpu(), ref.double().cpu()
    return ((a - ref).abs().max() / ref.abs().max()).item()


def _batch_stat(x):
    """var_b = E[x^2] per channel over all tokens (float64)."""
    x = x.double()
    return (x * x).reshape(-1, x.size(-1)).mean(0)


def _set_affine(un, g):
    """Non-trivial weight and bias (so that a wrong formula shows)."""
    with torch.no_grad():
        un.weight.copy_(1.0 + 0.5 * _randn(g, un.d, dtype=un.weight.dtype))
        un.bias.copy_(0.3 * _randn(g, un.d, dtype=un.bias.dtype))


def _geo(stats):
    """Geometric mean over the window axis: exp(mean(log(stats)))."""
    return torch.exp(torch.log(torch.stack(stats)).mean(0))


def _compensated_grad(x, dy, weight, var, r, c, eps):
    """The paper's backward by hand, in float64: z = x / sqrt(var + eps), g = r * weight * dy,
    dx = (g - c * z) / sqrt(var + eps), dweight = sum(dy * z), dbias = sum(dy)."""
    x, dy, w = x.double(), dy.double(), weight.double()
    s = torch.sqrt(var + eps)
    z = x / s
    gr = r * w * dy
    dx = (gr - c * z) / s
    d = x.size(-1)
    return dx, (dy * z).reshape(-1, d).sum(0), dy.reshape(-1, d).sum(0)


def _mean_gz(x, dy, weight, var, r, eps):
    """mean over tokens of g * z per channel (float64)."""
    z = x.double() / torch.sqrt(var + eps)
    gr = r * weight.double() * dy.double()
    return (gr * z).reshape(-1, x.size(-1)).mean(0)


# ------------------------------------------------------------------------------------------------
# 1. forward: warm-up equals the batch-statistic formula, eval equals the reference and affine()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_warmup_forward_is_batch_statistic(device, dtype, tol):
    g = _gen(1)
    d, m, eps = 24, 0.9, 1e-5
    un = UnifiedNorm(d, warmup_iters=4000, momentum=m, eps=eps).to(device=device, dtype=dtype)
    _set_affine(un, g)
    rv = torch.ones(d, dtype=torch.float64)
    for step in range(3):
        x = _randn(g, 5, 7, d, device=device, dtype=dtype, scale=0.5 + step)
        var_b = _batch_stat(x)
        y = un(x)
        assert y.dtype == dtype and y.shape == x.shape
        ref = unified_norm_eval(x.double(), un.weight.double(), un.bias.double(), var_b.to(device), eps)
        assert _rel_err(y, ref) <= tol
        rv = m * rv + (1 - m) * var_b
        assert _rel_err(un.running_var, rv) <= 10 * tol
        assert int(un.step) == step + 1
        # the window buffer records var_b in slot step % window
        assert _rel_err(un.var_window[step % un.window], var_b) <= 10 * tol
    assert un.running_var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_eval_forward_reference_and_affine(device, dtype, tol):
    g = _gen(2)
    d, eps = 33, 1e-5
    un = UnifiedNorm(d, eps=eps).to(device=device, dtype=dtype)
    _set_affine(un, g)
    with torch.no_grad():
        un.running_var.copy_(torch.rand(d, generator=g, dtype=torch.float64) * 4 + 0.05)
    un.eval()
    x = _randn(g, 3, 4, d, device=device, dtype=dtype)
    state = {k: v.clone() for k, v in un.state_dict().items()}
    with torch.no_grad():
        y = un(x)
    ref = unified_norm_eval(x.double(), un.weight.double(), un.bias.double(), un.running_var.double(), eps)
    assert _rel_err(y, ref) <= tol
    # eval must not touch the statistics
    for k, v in un.state_dict().items():
        assert torch.equal(v, state[k]), k
    # affine(): y = x * scale + shift, and it folds into a following linear layer
    scale, shift = un.affine()
    assert scale.shape == (d,) and shift.shape == (d,) and not scale.requires_grad
    assert _rel_err(x.double() * scale.double() + shift.double(), ref) <= tol
    lin = torch.nn.Linear(d, 5, dtype=torch.float64, device=device)
    w_f = lin.weight * scale.double()
    b_f = lin.bias + lin.weight @ shift.double()
    with torch.no_grad():
        assert _rel_err(x.double() @ w_f.T + b_f, lin(ref)) <= 10 * tol


# ------------------------------------------------------------------------------------------------
# 2. exact gradient during warm-up


def test_gradcheck_warmup_float64():
    g = _gen(3)
    d = 5
    un = UnifiedNorm(d, warmup_iters=10**9).double()
    x = _randn(g, 3, 4, d).requires_grad_()
    w = (1.0 + 0.5 * _randn(g, d)).requires_grad_()
    b = (0.3 * _randn(g, d)).requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(un, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert 0 < int(un.step) < un.warmup_iters  # stayed in warm-up all along


def test_gradcheck_eval_float64():
    g = _gen(4)
    d = 6
    un = UnifiedNorm(d).double()
    with torch.no_grad():
        un.running_var.copy_(torch.rand(d, generator=g, dtype=torch.float64) + 0.5)
    un.eval()
    x = _randn(g, 4, d).requires_grad_()
    w = (1.0 + 0.5 * _randn(g, d)).requires_grad_()
    b = _randn(g, d).requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(un, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_warmup_backward_matches_autograd_of_formula(device):
    """On every device: during warm-up the backward is torch's autograd of the formula."""
    g = _gen(5)
    d, eps = 16, 1e-5
    un = UnifiedNorm(d, eps=eps).to(device=device, dtype=torch.float64)
    _set_affine(un, g)
    x = _randn(g, 6, 5, d, device=device).requires_grad_()
    dy = _randn(g, 6, 5, d, device=device)
    un(x).backward(dy)

    xr = x.detach().clone().requires_grad_()
    w = un.weight.detach().clone().requires_grad_()
    b = un.bias.detach().clone().requires_grad_()
    var_b = (xr * xr).reshape(-1, d).mean(0)
    unified_norm_eval(xr, w, b, var_b, eps).backward(dy)
    for got, ref in ((x.grad, xr.grad), (un.weight.grad, w.grad), (un.bias.grad, b.grad)):
        assert _rel_err(got, ref) <= 1e-12


# ------------------------------------------------------------------------------------------------
# 3. past warm-up: geometric mean of the window, running_var EMA, compensated backward


@pytest.mark.parametrize("device", DEVICES)
def test_window_geometric_mean_ema_and_compensated_backward(device):
    g = _gen(6)
    d, W, warmup, m, eps = 6, 3, 2, 0.8, 1e-5
    un = UnifiedNorm(d, window=W, warmup_iters=warmup, momentum=m, eps=eps).to(device=device, dtype=torch.float64)
    _set_affine(un, g)
    channel_scale = torch.linspace(0.2, 3.0, d, dtype=torch.float64).to(device)
    hist = []
    rv = torch.ones(d, dtype=torch.float64, device=device)
    ema = torch.zeros(d, dtype=torch.float64, device=device)
    for t in range(7):
        x = (_randn(g, 4, 9, d, device=device) * channel_scale * (1.0 + 0.4 * (t % 3))).requires_grad_()
        dy = _randn(g, 4, 9, d, device=device)
        var_b = _batch_stat(x.detach())
        hist.append(var_b)
        if t < warmup:
            var = var_b
        else:
            var = _geo(hist[-W:])  # the last W batch statistics, this one included
            assert not torch.allclose(var, var_b, rtol=1e-3)  # the window really differs here
        y = un(x)
        ref = unified_norm_eval(x.detach(), un.weight.detach(), un.bias.detach(), var, eps)
        assert _rel_err(y, ref) <= 1e-12, t
        # buffer = last W statistics in a ring; running_var = EMA of the statistic used
        for k in range(max(0, t - W + 1), t + 1):
            assert _rel_err(un.var_window[k % W], hist[k]) <= 1e-14
        rv = m * rv + (1 - m) * var
        assert _rel_err(un.running_var, rv) <= 1e-13

        # backward: r = 1 (step < 1000); ema_gz <- m ema + (1-m) mean(g z); c = gz in warm-up
        gz = _mean_gz(x.detach(), dy, un.weight.detach(), var, 1.0, eps)
        ema = m * ema + (1 - m) * gz
        c = gz if t < warmup else ema
        dx_ref, dw_ref, db_ref = _compensated_grad(x.detach(), dy, un.weight.detach(), var, 1.0, c, eps)
        un.zero_grad()
        y.backward(dy)
        assert _rel_err(x.grad, dx_ref) <= 1e-12, t
        assert _rel_err(un.weight.grad, dw_ref) <= 1e-12
        assert _rel_err(un.bias.grad, db_ref) <= 1e-12
        assert _rel_err(un.ema_gz, ema) <= 1e-12
        if t >= warmup:  # the compensation is not the exact batch term
            exact, _, _ = _compensated_grad(x.detach(), dy, un.weight.detach(), var, 1.0, gz, eps)
            assert _rel_err(x.grad, exact) > 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step,r_active", [(1001, True), (999, False)])
def test_compensation_r_clamp_after_1000_steps(device, step, r_active):
    g = _gen(7)
    d, W, m, eps = 6, 2, 0.9, 1e-5
    un = UnifiedNorm(d, window=W, warmup_iters=0, momentum=m, eps=eps).to(device=device, dtype=torch.float64)
    _set_affine(un, g)
    ema0 = 0.1 * _randn(g, d, device=device)
    with torch.no_grad():
        un.step.fill_(step)
        un.ema_gz.copy_(ema0)
        un.var_window.copy_(torch.rand(W, d, generator=g, dtype=torch.float64).to(device) + 0.5)
        un.running_var.copy_(torch.rand(d, generator=g, dtype=torch.float64).to(device) + 0.5)
    window0, rv0 = un.var_window.clone(), un.running_var.clone()
    # channel RMS from 1e-3 to 1e3, so that r spans both clamps and the unclamped range
    channel_scale = torch.tensor([1e-3, 0.05, 0.7, 1.5, 4.0, 1e3], dtype=torch.float64, device=device)
    x = (_randn(g, 8, 5, d, device=device) * channel_scale).requires_grad_()
    dy = _randn(g, 8, 5, d, device=device)

    var_b = _batch_stat(x.detach())
    buf = window0.clone()
    buf[step % W] = var_b
    var = _geo(list(buf))
    r = torch.clamp(torch.sqrt(var + eps) / torch.sqrt(rv0 + eps), 1 / 5, 5)
    assert (r == 5).any() and (r == 1 / 5).any() and ((r > 1 / 5) & (r < 5) & ((r - 1).abs() > 0.05)).any()
    r_used = r if r_active else torch.ones_like(r)

    y = un(x)
    assert _rel_err(y, unified_norm_eval(x.detach(), un.weight.detach(), un.bias.detach(), var, eps)) <= 1e-12
    y.backward(dy)
    gz = _mean_gz(x.detach(), dy, un.weight.detach(), var, r_used, eps)
    ema = m * ema0 + (1 - m) * gz
    dx_ref, dw_ref, db_ref = _compensated_grad(x.detach(), dy, un.weight.detach(), var, r_used, ema, eps)
    assert _rel_err(x.grad, dx_ref) <= 1e-12
    assert _rel_err(un.weight.grad, dw_ref) <= 1e-12
    assert _rel_err(un.bias.grad, db_ref) <= 1e-12
    assert _rel_err(un.ema_gz, ema) <= 1e-12
    # the other choice of r gives a different gradient: the test can tell them apart
    r_other = torch.ones_like(r) if r_active else r
    gz_o = _mean_gz(x.detach(), dy, un.weight.detach(), var, r_other, eps)
    dx_other, _, _ = _compensated_grad(x.detach(), dy, un.weight.detach(), var, r_other,
                                       m * ema0 + (1 - m) * gz_o, eps)
    assert _rel_err(x.grad, dx_other) > 1e-3


# ------------------------------------------------------------------------------------------------
# 4. outlier filtration


def _exact_batch(a, device):
    """x of shape [2, d] with rows +a and -a: its batch statistic is exactly a^2."""
    return torch.stack([a, -a]).to(device)


def _hand_outlier(recorded, window_now, W):
    """any channel: AM(window_now) - GM(window_now) > W * unbiased Var over the window axis of
    sqrt(recorded), the recorded window being the statistics before this batch."""
    rec = torch.stack(recorded)
    now = torch.stack(window_now)
    am, gm = now.mean(0), torch.exp(torch.log(now).mean(0))
    return bool((am - gm > W * rec.sqrt().var(0, unbiased=True)).any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filtration", [True, False])
def test_outlier_filtration(device, filtration):
    g = _gen(8)
    d, W, warmup, m, eps = 3, 4, 4, 0.9, 1e-5
    un = UnifiedNorm(d, window=W, warmup_iters=warmup, momentum=m, outlier_filtration=filtration,
                     eps=eps).to(device=device, dtype=torch.float64)
    _set_affine(un, g)
    base = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    # per-step RMS factors: warm-up fills the window, then normal, outlier (100x), normal
    factors = [1.0, 1.1, 0.9, 1.05, 1.0, 100.0, 0.95]
    win = [None] * W
    rv = torch.ones(d, dtype=torch.float64)
    ema = torch.zeros(d, dtype=torch.float64)
    for t, f in enumerate(factors):
        a = base * f
        x = _exact_batch(a, device).requires_grad_()
        dy = _randn(g, 2, d, device=device)
        var_b = a * a
        recorded = list(win)
        now = list(win)
        now[t % W] = var_b
        outlier = False
        if t >= warmup:
            outlier = _hand_outlier(recorded, now, W)
            assert outlier == (f == 100.0), (t, f)  # only the 100x batch violates the bound
            outlier = outlier and filtration
        var = var_b if (t < warmup or outlier) else _geo(now)
        rv_old = rv.clone()

        y = un(x)
        ref = unified_norm_eval(x.detach().cpu(), un.weight.detach().cpu(), un.bias.detach().cpu(), var, eps)
        assert _rel_err(y, ref) <= 1e-12, t
        win[t % W] = rv_old if outlier else var_b
        assert _rel_err(un.var_window[t % W], win[t % W]) <= 1e-14, t
        rv = m * rv + (1 - m) * var
        assert _rel_err(un.running_var, rv) <= 1e-13, t

        # backward: exact (own mean(g z), r = 1) for an outlier batch, ema_gz untouched
        y.backward(dy)
        gz = _mean_gz(x.detach().cpu(), dy.cpu(), un.weight.detach().cpu(), var, 1.0, eps)
        if not outlier:
            ema = m * ema + (1 - m) * gz
        c = gz if (t < warmup or outlier) else ema
        dx_ref, _, _ = _compensated_grad(x.detach().cpu(), dy.cpu(), un.weight.detach().cpu(), var, 1.0, c, eps)
        assert _rel_err(x.grad, dx_ref) <= 1e-12, t
        assert _rel_err(un.ema_gz, ema) <= 1e-12, t
        if f == 100.0:
            # with filtration the 100x batch is normalized by itself (|z| = 1); without, by the
            # window, whose geometric mean is far below its own statistic
            z = (y.detach().cpu() - un.bias.detach().cpu()) / un.weight.detach().cpu()
            if filtration:
                assert torch.allclose(z.abs(), torch.ones_like(z), rtol=1e-6)
            else:
                assert (z.abs() > 5).all()


# ------------------------------------------------------------------------------------------------
# 5. dtypes, shapes, NaN, errors


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16(device):
    g = _gen(9)
    d, eps = 64, 1e-5
    un = UnifiedNorm(d, eps=eps).to(device)
    _set_affine(un, g)
    x = _randn(g, 4, 16, d, device=device, dtype=torch.bfloat16).requires_grad_()
    dy = _randn(g, 4, 16, d, device=device, dtype=torch.bfloat16)
    y = un(x)
    assert y.dtype == torch.bfloat16 and un.running_var.dtype == torch.float32
    y.backward(dy)
    assert x.grad.dtype == torch.bfloat16 and un.weight.grad.dtype == torch.float32

    xr = x.detach().double().requires_grad_()
    w = un.weight.detach().double().requires_grad_()
    b = un.bias.detach().double().requires_grad_()
    ref = unified_norm_eval(xr, w, b, (xr * xr).reshape(-1, d).mean(0), eps)
    ref.backward(dy.double())
    assert _rel_err(y, ref) <= 1e-2
    assert _rel_err(x.grad, xr.grad) <= 1e-2
    assert _rel_err(un.weight.grad, w.grad) <= 1e-2
    assert _rel_err(un.bias.grad, b.grad) <= 1e-2
    un.eval()
    with torch.no_grad():
        ye = un(x.detach())
    assert _rel_err(ye, unified_norm_eval(x.detach().double(), w, b, un.running_var.double(), eps)) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 3, 4097])
def test_shapes_3d(device, d):
    g = _gen(10 + d)
    eps = 1e-5
    un = UnifiedNorm(d, eps=eps).to(device)
    _set_affine(un, g)
    x = _randn(g, 2, 3, d, device=device, dtype=torch.float32).requires_grad_()
    dy = _randn(g, 2, 3, d, device=device, dtype=torch.float32)
    y = un(x)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    w = un.weight.detach().double().requires_grad_()
    b = un.bias.detach().double().requires_grad_()
    ref = unified_norm_eval(xr, w, b, (xr * xr).reshape(-1, d).mean(0), eps)
    ref.backward(dy.double())
    assert y.shape == (2, 3, d)
    assert _rel_err(y, ref) <= 1e-5
    assert _rel_err(x.grad, xr.grad) <= 1e-4
    assert _rel_err(un.weight.grad, w.grad) <= 1e-5
    assert _rel_err(un.bias.grad, b.grad) <= 1e-5
    # a non-contiguous input (transposed leading dims) gives the same result
    xt = x.detach().transpose(0, 1)
    assert not xt.is_contiguous()
    un2 = UnifiedNorm(d, eps=eps).to(device)
    with torch.no_grad():
        un2.weight.copy_(un.weight)
        un2.bias.copy_(un.bias)
        assert _rel_err(un2(xt), ref.detach().transpose(0, 1)) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates(device):
    d = 4
    un = UnifiedNorm(d).to(device)
    x = torch.randn(3, 5, d, generator=_gen(11)).to(device)
    x[1, 2, 1] = float("nan")
    x.requires_grad_()
    y = un(x)
    assert y[..., 1].isnan().all()                 # the NaN channel's statistic is NaN
    assert torch.isfinite(y[..., [0, 2, 3]]).all()  # other channels are untouched
    y.sum().backward()                             # no crash
    assert x.grad[..., 1].isnan().all()
    un.eval()
    with torch.no_grad():
        ye = un(x.detach())
    assert ye[1, 2, 1].isnan()


def test_stats_dtype_follows_input():
    un = UnifiedNorm(5)
    un(torch.randn(3, 5, dtype=torch.float64))
    assert un.running_var.dtype == un.var_window.dtype == un.ema_gz.dtype == torch.float64
    un(torch.randn(3, 5, dtype=torch.float16))
    assert un.running_var.dtype == un.var_window.dtype == un.ema_gz.dtype == torch.float32
    assert set(dict(un.named_buffers())) == {"running_var", "var_window", "step", "ema_gz"}
    assert un.var_window.shape == (4, 5) and int(un.step) == 2
    assert not torch.equal(un.running_var, torch.ones(5))
    un.reset_running_stats()
    assert int(un.step) == 0 and torch.equal(un.running_var, torch.ones(5)) and torch.equal(un.ema_gz, torch.zeros(5))
    # a bfloat16 module keeps its eval affine in float32
    unb = UnifiedNorm(5).to(torch.bfloat16).eval()
    assert unb.affine()[0].dtype == torch.float32


def test_bad_input_and_arguments():
    un = UnifiedNorm(4)
    with pytest.raises(errors.ShapeError):
        un(torch.randn(3, 5))
    with pytest.raises(errors.ShapeError):
        un(torch.tensor(1.0))
    with pytest.raises(errors.ShapeError):
        un(torch.randn(0, 4))  # training needs a token
    with pytest.raises(errors.DTypeError):
        un(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(errors.DTypeError):
        un([[1.0, 2.0, 3.0, 4.0]])
    un.eval()
    with pytest.raises(errors.ShapeError):
        un(torch.randn(2, 3))
    bad = [dict(d=0), dict(d=4.0), dict(d=4, window=0), dict(d=4, window=2.5), dict(d=4, momentum=1.0),
           dict(d=4, momentum=-0.1), dict(d=4, warmup_iters=-1), dict(d=4, eps=-1e-5),
           dict(d=4, outlier_filtration="yes")]
    for kw in bad:
        with pytest.raises(errors.ArgumentError):
            UnifiedNorm(**kw)
    assert issubclass(errors.ArgumentError, ValueError)


# ------------------------------------------------------------------------------------------------
# 6. a small training run: UN trains about as well as LayerNorm


def _train(norm_factory, steps=200):
    """A 2-layer MLP (Linear -> norm -> ReLU -> Linear) regressing a fixed random teacher with Adam;
    returns (mean training loss over the last 50 steps, eval loss on all data, target variance,
    model in eval mode, data)."""
    torch.manual_seed(0)
    g = _gen(123)
    x_all = torch.randn(1024, 16, generator=g)
    teacher = torch.randn(16, 32, generator=g) / 4
    y_all = torch.tanh(x_all @ teacher) @ torch.randn(32, 1, generator=g) / 4 + 0.01 * torch.randn(1024, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), norm_factory(64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 1024, (64,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        eval_loss = torch.nn.functional.mse_loss(model(x_all), y_all).item()
    return sum(losses[-50:]) / 50, eval_loss, y_all.var().item(), model, x_all


def test_training_loss_close_to_layernorm_and_folds():
    ln_train, ln_eval, target_var, _, _ = _train(lambda n: torch.nn.LayerNorm(n))
    un_train, un_eval, _, model, x_all = _train(lambda n: UnifiedNorm(n, warmup_iters=20, window=4))
    assert int(model[1].step) == 200  # well past warm-up: the window statistic was used
    # both learned (an untrained model is far above this bound) ...
    assert max(ln_train, ln_eval, un_train, un_eval) < 0.25 * target_var
    # ... and UN's training loss, and its eval loss as a fixed affine, are close to LN's
    assert un_train <= 1.5 * ln_train + 1e-3, (un_train, ln_train)
    assert un_eval <= 1.5 * ln_eval + 1e-3, (un_eval, ln_eval)
    # the trained UN folds into the preceding linear layer: a norm-free model, same outputs
    scale, shift = model[1].affine()
    lin = model[0]
    folded = torch.nn.Linear(16, 64)
    with torch.no_grad():
        folded.weight.copy_(scale[:, None] * lin.weight)
        folded.bias.copy_(scale * lin.bias + shift)
        y_un = model(x_all)
        y_folded = model[3](torch.relu(folded(x_all)))
    assert _rel_err(y_folded, y_un) <= 1e-5
