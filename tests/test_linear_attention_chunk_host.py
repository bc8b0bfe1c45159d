"""The chunked CUDA kernels' arithmetic without a GPU: tests/linear_attention_chunk_host.cu compiles the
kernel bodies of cuda/linear_attention_chunk.cuh (the very code the GPU runs, __host__ __device__) into a
host library with nvcc, each thread block emulated on the CPU phase by phase (threads in order, or in
reverse to expose hazards inside a phase; shared memory and scratch start as NaN). Checked against the
float64 recurrent reference of tests/test_linear_attention_cuda.py and the CPU op: forward, final state
and every gradient, causal and not, decay, odd lengths, every chunk size and both state placements.
Skips when nvcc is absent."""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from conftest import rel_err
from test_linear_attention_cuda import IDS, VARIANTS, _opts, make_inputs, ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (the harness compiles the CUDA sources)")

KIND = {"linear": 0, "mala": 1, "norm": 2}
FMAP = {"elu1": 0, "relu": 1, "identity": 2}
DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
H100_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100 (227 KB)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("la2host") / "libla2host.so"
    cmd = [NVCC, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", os.path.join(ROOT, "cuda"), "-I", os.path.join(ROOT, "cpp"),
           os.path.join(ROOT, "tests", "linear_attention_chunk_host.cu"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    L = ctypes.CDLL(str(out))
    vp, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    L.la2_host_forward.argtypes = [ctypes.c_int, vp, i64, f32] + [vp] * 7
    L.la2_host_backward.argtypes = [ctypes.c_int, vp, i64, f32] + [vp] * 11
    L.la2_host_plan.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, vp, vp]
    L.la2_host_smem_floats.argtypes = [ctypes.c_int] * 5
    L.la2_host_smem_floats.restype = i64
    return L


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _ints(kind, opt, causal, B, H, Dk, Dv, C, state_smem, nthr, reverse):
    fm = {"linear": opt.get("feature_map", "elu1"), "mala": "elu1", "norm": "identity"}[kind]
    vals = [B, H, Dk, Dv, KIND[kind], FMAP[fm], 1 if opt.get("norm", "rms") == "layer" else 0, int(causal),
            int(opt.get("normalize", True)), C, int(state_smem), nthr, int(reverse)]
    return (ctypes.c_int * 13)(*vals)


def host_run(lib, kind, opt, causal, q, k, v, init, decay, go, gfin, C=64, state_smem=True, nthr=256, reverse=False,
             eps=1e-6):
    """(o, final_state, grad_q, grad_k, grad_v, grad_initial_state) from the chunked kernel bodies."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    q, k, v, go = (x.contiguous() for x in (q, k, v, go))
    init = None if init is None else init.float().contiguous()
    decay = None if decay is None else decay.float().contiguous()
    ints = _ints(kind, opt, causal, B, H, Dk, Dv, C, state_smem, nthr, reverse)
    dt = DTYPE[q.dtype]
    o = torch.full((B, T, H, Dv), float("nan"), dtype=q.dtype)
    fin = torch.full((B, H, Dk + 1, Dv + 1), float("nan"))
    assert lib.la2_host_forward(dt, ints, T, eps, _ptr(q), _ptr(k), _ptr(v), _ptr(decay), _ptr(init), _ptr(o),
                                _ptr(fin)) == 0
    gq, gk = (torch.full((B, T, H, Dk), float("nan"), dtype=q.dtype) for _ in range(2))
    gv = torch.full((B, T, H, Dv), float("nan"), dtype=q.dtype)
    gi = None if init is None else torch.full_like(init, float("nan"))
    gfin = None if gfin is None else gfin.float().contiguous()
    assert lib.la2_host_backward(dt, ints, T, eps, _ptr(q), _ptr(k), _ptr(v), _ptr(decay), _ptr(init), _ptr(go),
                                 _ptr(gfin), _ptr(gq), _ptr(gk), _ptr(gv), _ptr(gi)) == 0
    return o, fin, gq, gk, gv, gi


def ref_run(kind, opt, causal, q, k, v, init, decay, go, gfin):
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    li = None if init is None else init.detach().double().requires_grad_(True)
    o, fin = ref(kind, *leaves, causal, li, decay, **opt)
    loss = (o * go.double()).sum() + (fin * gfin.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([li] if li is not None else []))
    return [o, fin] + list(grads) + ([None] if li is None else [])


def cpu_op_run(kind, opt, causal, q, k, v, init, decay, go, gfin):
    """The CPU training kernels (cpp/ops/linear_attention_train.cpp) through the raw binding."""
    from normengine import _C

    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    fm = {"linear": opt.get("feature_map", "elu1"), "mala": "elu1", "norm": "identity"}[kind]
    codes = (KIND[kind], FMAP[fm], causal, bool(opt.get("normalize", True)), 1 if opt.get("norm", "rms") == "layer" else 0,
             1e-6)
    o = torch.empty(B, T, H, Dv, dtype=q.dtype)
    fin = torch.empty(B, H, Dk + 1, Dv + 1)
    _C.linear_attention_forward(*codes, q, k, v, decay, init, o, fin)
    gq, gk, gv = (torch.empty_like(x) for x in (q, k, v))
    gi = None if init is None else torch.empty_like(init)
    _C.linear_attention_backward(*codes, q, k, v, decay, init, go, gfin, gq, gk, gv, gi)
    return o, fin, gq, gk, gv, gi


NAMES = ["o", "final_state", "grad_q", "grad_k", "grad_v", "grad_initial_state"]
# (C, state_smem, threads, reverse): the launch plans the kernels can take, threads in both orders
CONFIGS = [(64, True, 256, False), (64, False, 256, True), (32, True, 96, True), (16, False, 37, False)]
CONFIG_IDS = ["c64-smem", "c64-global-rev", "c32-smem-96-rev", "c16-global-37"]


def _case(kind, opt, causal, T, gen, B=2, H=3, Dk=16, Dv=40, with_init=True, dtype=torch.float32):
    # (Dv = 40: Dv + 1 = 41 state columns, two column tiles in the states kernel)
    opt, decay_on = _opts(kind, opt)
    decay_on = decay_on and causal
    q, k, v, init, decay = make_inputs(kind, B, T, H, Dk, Dv, dtype, gen, with_init, decay_on)
    go = torch.randn(B, T, H, Dv, generator=gen).to(dtype)
    gfin = torch.randn(B, H, Dk + 1, Dv + 1, generator=gen) * 0.01
    return opt, q, k, v, init, decay, go, gfin


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("T", [1, 3, 63, 64, 65, 200])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kind,opt", VARIANTS, ids=IDS)
def test_chunk_bodies_vs_reference(lib, kind, opt, causal, T, cfg, gen):
    C, sm, nthr, rev = cfg
    opt, q, k, v, init, decay, go, gfin = _case(kind, opt, causal, T, gen)
    got = host_run(lib, kind, opt, causal, q, k, v, init, decay, go, gfin, C, sm, nthr, rev)
    want = ref_run(kind, opt, causal, q, k, v, init, decay, go, gfin)
    cpu = cpu_op_run(kind, opt, causal, q, k, v, init, decay, go, gfin)
    for name, g_, w_, c_ in zip(NAMES, got, want, cpu):
        assert torch.isfinite(g_).all(), name
        assert rel_err(g_, w_, floor=1e-6) < 2e-4, f"{name} vs reference"
        assert rel_err(g_, c_, floor=1e-6) < 2e-4, f"{name} vs CPU kernels"


@pytest.mark.parametrize("kind,opt", VARIANTS, ids=IDS)
def test_thread_order_and_count_do_not_matter(lib, kind, opt, gen):
    """Every output element is one thread's: the results are bit-identical whatever the thread order
    (a read of another thread's write inside one phase would differ) and the thread count."""
    opt_, q, k, v, init, decay, go, gfin = _case(kind, opt, True, 150, gen)
    a = host_run(lib, kind, opt_, True, q, k, v, init, decay, go, gfin, 64, True, 256, False)
    b = host_run(lib, kind, opt_, True, q, k, v, init, decay, go, gfin, 64, True, 256, True)
    c = host_run(lib, kind, opt_, True, q, k, v, init, decay, go, gfin, 64, False, 61, True)
    for name, x, y, z in zip(NAMES, a, b, c):
        assert torch.equal(x, y), name
        assert torch.equal(x, z), name


@pytest.mark.parametrize("Dk,Dv", [(64, 64), (32, 96), (128, 40)])
@pytest.mark.parametrize("kind,opt", [VARIANTS[0], VARIANTS[3], VARIANTS[5]], ids=["linear", "mala", "norm-decay"])
def test_wider_heads_no_initial_state(lib, kind, opt, Dk, Dv, gen):
    opt_, q, k, v, init, decay, go, gfin = _case(kind, opt, True, 130, gen, B=1, H=2, Dk=Dk, Dv=Dv, with_init=False)
    got = host_run(lib, kind, opt_, True, q, k, v, init, decay, go, gfin)
    want = ref_run(kind, opt_, True, q, k, v, init, decay, go, gfin)
    for name, g_, w_ in zip(NAMES, got, want):
        if w_ is None:
            assert g_ is None
            continue
        assert rel_err(g_, w_, floor=1e-6) < 2e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,opt", [VARIANTS[0], VARIANTS[3], VARIANTS[5]], ids=["linear", "mala", "norm-decay"])
def test_half_inputs_match_cpu_kernels(lib, kind, opt, dtype, gen):
    """16-bit q, k, v, grad_o: fp32 states and products, outputs rounded once, as the CPU kernels."""
    opt_, q, k, v, init, decay, go, gfin = _case(kind, opt, True, 200, gen, dtype=dtype)
    got = host_run(lib, kind, opt_, True, q, k, v, init, decay, go, gfin)
    cpu = cpu_op_run(kind, opt_, True, q, k, v, init, decay, go, gfin)
    for name, g_, c_ in zip(NAMES, got, cpu):
        assert g_.dtype == c_.dtype, name
        assert torch.isfinite(g_).all(), name
        assert rel_err(g_.float(), c_.float(), floor=1e-3) < 2e-2, name


def test_plans(lib):
    """Chunk sizes and state placement the launchers pick with an H100's 227 KB of shared memory."""

    def plan(kernel, Dk, Dv, limit=H100_SMEM):
        C, sm = ctypes.c_int(0), ctypes.c_int(0)
        ok = lib.la2_host_plan(kernel, Dk, Dv, limit, ctypes.byref(C), ctypes.byref(sm))
        return (C.value, bool(sm.value)) if ok else None

    # states, output, backward kernels at the common head dim 64: C = 64, every state in shared memory
    for kernel in range(3):
        assert plan(kernel, 64, 64) == (64, True)
    assert lib.la2_host_smem_floats(2, 64, 64, 64, 1) * 4 <= H100_SMEM
    assert plan(1, 128, 128) == (64, False) or plan(1, 128, 128)[0] >= 32
    assert plan(2, 128, 128) is not None and plan(2, 256, 256) is not None  # every supported head dim has a plan
    assert plan(2, 256, 256)[1] is False  # two 257 x 257 fp32 states exceed shared memory
    assert plan(2, 64, 64, limit=1024) is None  # nothing fits: the launchers fall back to the recurrent kernels
