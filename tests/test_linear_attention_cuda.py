"""CUDA kernels of linear attention, MALA and norm attention against an independent float64 recurrent
formula (written out below from the contract in cpp/ops/linear_attention.h) and against the CPU op,
forward and backward, causal and not, with initial and final states, odd lengths, for BOTH CUDA
algorithms: "chunk" (the chunkwise-parallel kernels of cuda/linear_attention_chunk.cu, also what "auto"
runs) and "recurrent" (the token-serial kernels of cuda/linear_attention.cu), and the two against each
other. Skips without a CUDA GPU; device-generic checks live in tests/test_linear_attention.py, and the
chunk kernels' arithmetic is also checked without a GPU by tests/test_linear_attention_chunk_host.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import normengine
from normengine import errors

from conftest import rel_err

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and normengine.cuda_available()), reason="no CUDA GPU visible"
)

# (kind, options): the op variants exercised
VARIANTS = [
    ("linear", dict(feature_map="elu1", normalize=True)),
    ("linear", dict(feature_map="relu", normalize=False)),
    ("linear", dict(feature_map="identity", normalize=False)),
    ("mala", dict()),
    ("norm", dict(norm="rms")),
    ("norm", dict(norm="layer", decay=True)),
]
IDS = ["linear-elu1", "linear-relu-raw", "linear-identity-raw", "mala", "norm-rms", "norm-layer-decay"]
ALGORITHMS = ["chunk", "recurrent"]
# odd lengths around the chunk size (64): one token, less than a chunk, exactly one, one past, several
LENGTHS = [1, 3, 63, 64, 65, 130, 200]


def _phi(name, x):
    if name == "elu1":
        return F.elu(x) + 1
    if name == "relu":
        return torch.relu(x)
    return x


def ref(kind, q, k, v, causal, init=None, decay=None, feature_map="elu1", normalize=True, norm="rms", eps=1e-6):
    """float64 recurrent form of the contract: S'_t = lam S'_{t-1} + [f(k); 1][v; 1]^T, per-op readout."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    fm = {"linear": feature_map, "mala": "elu1", "norm": "identity"}[kind]
    a, kf = _phi(fm, q), _phi(fm, k)
    one = torch.ones(B, T, H, 1, dtype=torch.float64, device=q.device)
    kp, vp = torch.cat([kf, one], -1), torch.cat([v, one], -1)
    S = init.double() if init is not None else torch.zeros(B, H, Dk + 1, Dv + 1, dtype=torch.float64, device=q.device)
    lam = decay.double().view(1, H, 1, 1) if decay is not None else 1.0

    def read(S, t):
        r = torch.einsum("bhi,bhij->bhj", a[:, t], S[:, :, :Dk, :])
        row = S[:, :, Dk, :]
        if kind == "linear":
            return r[..., :Dv] / (r[..., Dv:] + eps) if normalize else r[..., :Dv]
        if kind == "mala":
            c, n = Dk**-0.5, row[..., Dv:]
            zq = c * r[..., Dv:] / n
            beta = 1 + 1 / (zq + eps)
            return beta * c * r[..., :Dv] / n - zq * row[..., :Dv] / n
        y = r[..., :Dv]
        if norm == "layer":
            y = y - y.mean(-1, keepdim=True)
        return y / torch.sqrt((y * y).mean(-1, keepdim=True) + eps)

    outs = []
    if causal:
        for t in range(T):
            S = lam * S + torch.einsum("bhi,bhj->bhij", kp[:, t], vp[:, t])
            outs.append(read(S, t))
    else:
        S = S + torch.einsum("bthi,bthj->bhij", kp, vp)
        outs = [read(S, t) for t in range(T)]
    return torch.stack(outs, 1), S


def call(kind, q, k, v, causal, init=None, decay=None, out_final=True, algorithm="auto", **kw):
    """The Python op of `kind` (normengine.ops.{linear,mala,norm}_attention)."""
    from normengine.ops.linear_attention import linear_attention, mala_attention, norm_attention

    fn = {"linear": linear_attention, "mala": mala_attention, "norm": norm_attention}[kind]
    extra = dict(kw, algorithm=algorithm)
    if kind == "norm":
        extra["decay"] = decay
    return fn(q, k, v, causal=causal, initial_state=init, output_final_state=out_final, **extra)


def make_inputs(kind, B, T, H, Dk, Dv, dtype, g, with_init, decay_on):
    q = torch.randn(B, T, H, Dk, generator=g)
    k = torch.randn(B, T, H, Dk, generator=g)
    v = torch.randn(B, T, H, Dv, generator=g)
    if kind == "norm":  # keep S^T q at a sane scale
        q, k = q / math.sqrt(Dk), k / math.sqrt(Dk)
    init = None
    decay = torch.rand(H, generator=g) * 0.5 + 0.45 if decay_on else None
    if with_init:  # a reachable state: the one left by 5 random tokens
        T0 = 5
        kk = torch.randn(B, T0, H, Dk, generator=g)
        vv = torch.randn(B, T0, H, Dv, generator=g)
        fm = "identity" if kind == "norm" else "elu1"
        one = torch.ones(B, T0, H, 1)
        init = torch.einsum("bthi,bthj->bhij", torch.cat([_phi(fm, kk), one], -1), torch.cat([vv, one], -1))
        init = init.float().contiguous()
    return q.to(dtype), k.to(dtype), v.to(dtype), init, decay


def _opts(kind, opt):
    o = dict(opt)
    decay_on = o.pop("decay", False)
    return o, decay_on


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kind,opt", VARIANTS, ids=IDS)
def test_forward_backward_vs_reference_and_cpu(kind, opt, causal, T, algorithm, gen):
    opt, decay_on = _opts(kind, opt)
    if decay_on and not causal:
        decay_on = False
    B, H, Dk, Dv = 2, 3, 16, 24
    q, k, v, init, decay = make_inputs(kind, B, T, H, Dk, Dv, torch.float32, gen, True, decay_on)
    wo = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    ws = torch.randn(B, H, Dk + 1, Dv + 1, generator=gen, dtype=torch.float64) * 0.01

    def run(device, dtype_ref=False):
        leaves = [x.detach().to(device).requires_grad_(True) for x in (q, k, v, init)]
        dec = decay.to(device) if decay is not None else None
        if dtype_ref:
            o, fin = ref(kind, *leaves[:3], causal, leaves[3], dec, **opt)
        else:  # the CPU op always runs its chunked kernels ("auto")
            o, fin = call(kind, *leaves[:3], causal, leaves[3], dec, algorithm=algorithm if device == "cuda" else "auto",
                          **opt)
        loss = (o.double() * wo.to(device)).sum() + (fin.double() * ws.to(device)).sum()
        grads = torch.autograd.grad(loss, leaves)
        return [o, fin] + list(grads)

    want = run("cpu", dtype_ref=True)
    got = run("cuda")
    cpu = run("cpu")
    names = ["o", "final_state", "grad_q", "grad_k", "grad_v", "grad_initial_state"]
    for name, gv, wv, cv in zip(names, got, want, cpu):
        assert gv.shape == wv.shape, name
        assert torch.isfinite(gv).all(), name
        assert rel_err(gv, wv, floor=1e-6) < 2e-4, f"{name} vs reference"
        assert rel_err(gv, cv, floor=1e-6) < 2e-4, f"{name} vs CPU op"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind,opt", [VARIANTS[0], VARIANTS[3], VARIANTS[4]], ids=["linear", "mala", "norm"])
def test_noncontiguous_and_no_state(kind, opt, algorithm, gen):
    B, T, H, Dk, Dv = 1, 67, 2, 32, 32
    base = torch.randn(B, H, T, 2 * Dk, generator=gen)
    q = base[..., :Dk].transpose(1, 2)  # strided in B, T, H; unit last dim
    k = torch.randn(B, T, H, Dk, generator=gen)
    v = torch.randn(B, T, H + 1, Dv, generator=gen)[:, :, 1:]
    want, _ = ref(kind, q, k, v, True, **opt)
    o = call(kind, q.cuda(), k.cuda(), v.cuda(), True, out_final=False, algorithm=algorithm, **opt)
    o = o[0] if isinstance(o, tuple) else o
    assert rel_err(o, want, floor=1e-6) < 2e-4


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,opt", [VARIANTS[0], VARIANTS[3], VARIANTS[4], VARIANTS[5]],
                         ids=["linear", "mala", "norm", "norm-decay"])
def test_half_long_sequence_finite(kind, opt, dtype, algorithm, gen):
    B, T, H, Dk, Dv = 1, 8192, 2, 64, 64
    opt, decay_on = _opts(kind, opt)
    q, k, v, _, decay = make_inputs(kind, B, T, H, Dk, Dv, torch.float32, gen, False, decay_on)
    q, k, v = (x.cuda() for x in (q, k, v))
    decay = decay.cuda() if decay is not None else None
    o32, s32 = call(kind, q, k, v, True, decay=decay, algorithm=algorithm, **opt)
    qh, kh, vh = (x.to(dtype).requires_grad_(True) for x in (q, k, v))
    o, s = call(kind, qh, kh, vh, True, decay=decay, algorithm=algorithm, **opt)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    # inputs rounded to 16 bits, fp32 state: the outputs stay within a few 16-bit ulps of the fp32 run
    assert rel_err(o, o32) < 5e-2
    (o.float() * torch.randn_like(o, dtype=torch.float32)).sum().backward()
    for x in (qh, kh, vh):
        assert x.grad is not None and torch.isfinite(x.grad).all()


def _codes(kind, opt):
    k = {"linear": 0, "mala": 1, "norm": 2}[kind]
    f = {"elu1": 0, "relu": 1, "identity": 2}[opt.get("feature_map", "elu1")]
    return k, f, bool(opt.get("normalize", True)), {"rms": 0, "layer": 1}[opt.get("norm", "rms")]


def direct(kind, opt, causal, q, k, v, init, decay, go, gfin, recurrent, eps=1e-6):
    """The CUDA kernels through the raw bindings (_C.linear_attention_forward / _backward, the contract's
    argument order; recurrent=False: cuda/linear_attention_chunk.cu, True: cuda/linear_attention.cu), on
    CUDA copies of the inputs: (o, final_state, grad_q, grad_k, grad_v, grad_initial_state)."""
    from normengine import _C

    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    kc, fc, norm_c, on = _codes(kind, opt)
    qc, kc_, vc = (x.cuda() for x in (q, k, v))
    ic = init.cuda() if init is not None else None
    dc = decay.cuda() if decay is not None else None
    o = torch.full((B, T, H, Dv), float("nan"), device="cuda", dtype=q.dtype)
    fin = torch.full((B, H, Dk + 1, Dv + 1), float("nan"), device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    _C.linear_attention_forward(kc, fc, causal, norm_c, on, eps, qc, kc_, vc, dc, ic, o, fin, stream,
                                recurrent=recurrent)
    gq, gk, gv = (torch.full_like(x, float("nan")) for x in (qc, kc_, vc))
    gi = torch.full_like(ic, float("nan")) if ic is not None else None
    _C.linear_attention_backward(kc, fc, causal, norm_c, on, eps, qc, kc_, vc, dc, ic, go.cuda(), gfin.cuda(),
                                 gq, gk, gv, gi, stream, recurrent=recurrent)
    torch.cuda.synchronize()
    return o, fin, gq, gk, gv, gi


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kind,opt", VARIANTS, ids=IDS)
def test_kernels_direct(kind, opt, causal, T, algorithm, gen):
    """The CUDA kernels through the raw bindings, whatever path the Python ops take: forward, final
    state and all grads against the float64 reference."""
    opt, decay_on = _opts(kind, opt)
    decay_on = decay_on and causal
    B, H, Dk, Dv = 2, 3, 16, 24
    q, k, v, init, decay = make_inputs(kind, B, T, H, Dk, Dv, torch.float32, gen, True, decay_on)
    go = torch.randn(B, T, H, Dv, generator=gen)
    gfin = torch.randn(B, H, Dk + 1, Dv + 1, generator=gen) * 0.01
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, init)]
    o_ref, fin_ref = ref(kind, *leaves[:3], causal, leaves[3], decay, **opt)
    want = torch.autograd.grad((o_ref * go.double()).sum() + (fin_ref * gfin.double()).sum(), leaves)
    got = direct(kind, opt, causal, q, k, v, init, decay, go, gfin, algorithm == "recurrent")
    for name, g_, w_ in zip(NAMES, got, [o_ref, fin_ref] + list(want)):
        assert torch.isfinite(g_).all(), name
        assert rel_err(g_, w_, floor=1e-6) < 2e-4, name


NAMES = ["o", "final_state", "grad_q", "grad_k", "grad_v", "grad_initial_state"]


@pytest.mark.parametrize("with_init", [True, False], ids=["init", "zero-init"])
@pytest.mark.parametrize("T", LENGTHS + [1000])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kind,opt", VARIANTS, ids=IDS)
def test_chunk_vs_recurrent(kind, opt, causal, T, with_init, gen):
    """The two CUDA algorithms on the same inputs (float32): the same numbers up to summation order."""
    opt, decay_on = _opts(kind, opt)
    decay_on = decay_on and causal
    B, H, Dk, Dv = 2, 3, 32, 48
    q, k, v, init, decay = make_inputs(kind, B, T, H, Dk, Dv, torch.float32, gen, with_init, decay_on)
    go = torch.randn(B, T, H, Dv, generator=gen)
    gfin = torch.randn(B, H, Dk + 1, Dv + 1, generator=gen) * 0.01
    chunk = direct(kind, opt, causal, q, k, v, init, decay, go, gfin, False)
    rec = direct(kind, opt, causal, q, k, v, init, decay, go, gfin, True)
    for name, c_, r_ in zip(NAMES, chunk, rec):
        if r_ is None:
            assert c_ is None
            continue
        assert torch.isfinite(c_).all(), name
        assert rel_err(c_, r_, floor=1e-6) < 2e-4, name


@pytest.mark.parametrize("Dk,Dv", [(64, 64), (128, 128), (256, 256), (96, 160), (1, 3)])
@pytest.mark.parametrize("kind,opt", [VARIANTS[0], VARIANTS[3], VARIANTS[5]], ids=["linear", "mala", "norm-decay"])
def test_chunk_head_dims_vs_recurrent_and_reference(kind, opt, Dk, Dv, gen):
    """Head dims that change the chunk plan (64 / 32 / 16 tokens, states in shared or global memory):
    chunked against the recurrent kernels and, forward, the float64 reference."""
    opt, decay_on = _opts(kind, opt)
    B, H, T = 1, 2, 150
    q, k, v, init, decay = make_inputs(kind, B, T, H, Dk, Dv, torch.float32, gen, True, decay_on)
    go = torch.randn(B, T, H, Dv, generator=gen)
    gfin = torch.randn(B, H, Dk + 1, Dv + 1, generator=gen) * 0.01
    chunk = direct(kind, opt, True, q, k, v, init, decay, go, gfin, False)
    rec = direct(kind, opt, True, q, k, v, init, decay, go, gfin, True)
    for name, c_, r_ in zip(NAMES, chunk, rec):
        assert torch.isfinite(c_).all(), name
        assert rel_err(c_, r_, floor=1e-6) < 5e-4, name
    o_ref, fin_ref = ref(kind, q, k, v, True, init, decay, **opt)
    assert rel_err(chunk[0], o_ref, floor=1e-6) < 5e-4
    assert rel_err(chunk[1], fin_ref, floor=1e-6) < 5e-4


@pytest.mark.parametrize("kind,opt", [VARIANTS[0], VARIANTS[3], VARIANTS[5]], ids=["linear", "mala", "norm-decay"])
def test_auto_is_chunk(kind, opt, gen):
    """algorithm="auto" runs the chunked kernels on CUDA: bit-identical to "chunk", forward and grads."""
    opt, decay_on = _opts(kind, opt)
    q, k, v, init, decay = make_inputs(kind, 1, 300, 2, 32, 32, torch.float32, gen, True, decay_on)
    decay = decay.cuda() if decay is not None else None
    res = {}
    for algorithm in ("auto", "chunk"):
        leaves = [x.detach().cuda().requires_grad_(True) for x in (q, k, v, init)]
        o, fin = call(kind, *leaves[:3], True, leaves[3], decay, algorithm=algorithm, **opt)
        (o.sum() + fin.sum()).backward()
        res[algorithm] = [o, fin] + [x.grad for x in leaves]
    for name, a, c in zip(NAMES, res["auto"], res["chunk"]):
        assert torch.equal(a, c), name


@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("dk,dv,arg", [(300, 8, "q"), (8, 300, "v")])
def test_unsupported_head_dim_raises(dk, dv, arg, recurrent):
    """The kernel's head-dim limit (Dk, Dv <= 256) through the raw binding: UnsupportedError naming the argument."""
    from normengine import _C

    q = torch.randn(1, 4, 1, dk, device="cuda")
    v = torch.randn(1, 4, 1, dv, device="cuda")
    o = torch.empty(1, 4, 1, dv, device="cuda")
    with pytest.raises(errors.UnsupportedError, match=f"^{arg}: head dim"):
        _C.linear_attention_forward(0, 0, True, True, 0, 1e-6, q, q, v, None, None, o, None,
                                    torch.cuda.current_stream().cuda_stream, recurrent=recurrent)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_noncausal_decay_raises(algorithm):
    q = torch.randn(1, 4, 2, 8, device="cuda")
    with pytest.raises(errors.NormEngineError, match="decay"):
        call("norm", q, q, q, False, decay=torch.full((2,), 0.9, device="cuda"), out_final=False, algorithm=algorithm)
