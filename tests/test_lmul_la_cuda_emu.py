"""cuda/lmul.cu and cuda/linear_attention.cu (+ the chunked kernels of cuda/linear_attention_chunk.cu it
dispatches to) RUN without a GPU: launches and `extern __shared__` rewritten for the host in temporary
copies, the kernels and launchers run on the CPU through the SIMT emulator of tests/cuda_emu/cuda_emu.h,
built by g++ into a ctypes library (tests/cuda_emu/la_lmul_emu.cpp).

Checked: ne::cuda::lmul_map and lmul_bmm BIT FOR BIT against the CPU kernels (_C.lmul_elementwise /
_C.lmul_bmm: same integer products, fp32 sums strictly in k order), with zeros, subnormals, Inf, NaN,
odd M / N / K, batch > 1 and strided operands; ne::cuda::linear_attention_forward / backward with
algorithm Chunk and Recurrent (also the recurrent kernels' global-state path, forced by a small shared
memory opt-in limit) for linear attention (elu1 / relu / identity, normalize on / off), MALA and norm
attention (rms / layer, decay), causal and non-causal, initial / final state, against the CPU training
kernels (_C.linear_attention_forward / backward on CPU tensors) within fp32 tolerance: outputs, final
state and every gradient.

What the emulator cannot show: timing, the memory model, nvcc's fma contraction (the build uses
-ffp-contract=off) and the GPU's expf ulps."""

import ctypes
import os

import pytest
import torch

from normengine import _C

from cuda_emu.emu_build import CXX, EMU, ROOT, build, emu_source, launch_names, ptr
from cuda_emu.emu_build import one_torch_thread  # noqa: F401 (an autouse fixture: applies to this module)
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found (the emulator harness is built with it)")

DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}



@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("lalmulemu")
    srcs = {}
    for key, name in (("LMUL", "lmul.cu"), ("LA", "linear_attention.cu"), ("LA_CHUNK", "linear_attention_chunk.cu")):
        p = d / (name[:-3] + ".emu.cu")
        # device_paths: linear_attention_chunk.cu's DeviceExec::phase runs the block's threads only under
        # __CUDA_ARCH__
        p.write_text(emu_source(os.path.join(ROOT, "cuda", name), device_paths=True))
        srcs[key] = p
    L = build(d / "liblalmulemu.so", [os.path.join(EMU, "la_lmul_emu.cpp")],
              ["-DNE_CUDA_EMU", "-DNE_WITH_CUDA"] + [f'-DNE_EMU_{k}_SOURCE="{v}"' for k, v in srcs.items()],
              prefix="ne_lemu")
    vp, i64, ci, cf = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    L.ne_lemu_configure.argtypes = [ci, ci]
    L.ne_lemu_lmul_map.argtypes = [i64, vp, vp, vp, ci]
    L.ne_lemu_lmul_bmm.argtypes = [i64, i64, i64, i64, vp, i64, i64, vp, i64, i64, vp, i64, i64, ci]
    head = [ci, ci, ci, ci, ci, cf, ci, ci, i64, i64, i64, i64, i64, vp, vp, vp, vp, vp, vp, vp, vp]
    L.ne_lemu_la_forward.argtypes = head + [vp, vp]
    L.ne_lemu_la_backward.argtypes = head + [vp, vp, vp, vp, vp, vp]
    L.ne_lemu_configure(0, 0)
    return L


def check(lib, rc):
    assert rc == 0, lib.ne_lemu_error().decode()


def launches(lib):
    return launch_names(lib.ne_lemu_launches)


def bits_eq(a, b):
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def sums_eq(a, b):
    """Bit for bit, except that a NaN SUM may carry any sign / payload (an fp32 add that makes or
    propagates a NaN: x86 gives 0xffc00000 for Inf - Inf, the GPU its canonical 0x7fffffff; only the
    products' NaN, 0x7fc00000, is the engine's contract)."""
    an, bn = torch.isnan(a), torch.isnan(b)
    return torch.equal(an, bn) and bits_eq(torch.where(an, torch.zeros(()), a), torch.where(bn, torch.zeros(()), b))


# ------------------------------------------------------------------------------------------ lmul
def special_values(n, g):
    """fp32 values with zeros, subnormals, Inf, NaN (payloads), huge and tiny normals."""
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float())
    r = torch.rand(n, generator=g)
    x = torch.where(r < 0.05, torch.zeros(n), x)
    x = torch.where((r >= 0.05) & (r < 0.08), -torch.zeros(n), x)
    x = torch.where((r >= 0.08) & (r < 0.12), torch.randn(n, generator=g) * 1e-39, x)  # subnormal
    x = torch.where((r >= 0.12) & (r < 0.14), torch.full((n,), float("inf")), x)
    x = torch.where((r >= 0.14) & (r < 0.16), torch.full((n,), float("-inf")), x)
    x = torch.where((r >= 0.16) & (r < 0.20), torch.randn(n, generator=g) * 1e37, x)  # overflowing products
    x = torch.where((r >= 0.20) & (r < 0.24), torch.randn(n, generator=g) * 1e-37, x)  # underflowing products
    xi = x.view(torch.int32)
    nan = torch.randint(0x7f800001, 0x7fffffff, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(0, dtype=torch.int32),
                       torch.tensor(-2 ** 31, dtype=torch.int32))
    xi = torch.where((r >= 0.24) & (r < 0.27), nan | sign, xi)
    return xi.view(torch.float32)


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 23])
def test_lmul_map_bit_exact(lib, bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 1000, 70000):
        a, b = special_values(n, g), special_values(n, g)
        ref = torch.empty(n)
        _C.lmul_elementwise(a, b, ref, bits, 0)
        out = torch.full((n,), -123.0)
        check(lib, lib.ne_lemu_lmul_map(n, ptr(a), ptr(b), ptr(out), bits))
        assert bits_eq(out, ref), (n, bits)
        assert set(launches(lib)) == {"lmul_map_kernel"}


@pytest.mark.parametrize("B,M,N,K,bits", [(1, 1, 1, 1, 4), (1, 3, 65, 130, 4), (2, 65, 3, 17, 3),
                                          (3, 130, 70, 33, 7), (1, 1, 130, 65, 23), (2, 64, 64, 16, 1),
                                          (1, 5, 7, 0, 4)])
def test_lmul_bmm_bit_exact(lib, B, M, N, K, bits):
    g = torch.Generator().manual_seed(B * 1000 + M * 10 + N + K)
    x = special_values(B * M * K, g).reshape(B, M, K) if K else torch.empty(B, M, 0)
    w = special_values(B * N * K, g).reshape(B, N, K) if K else torch.empty(B, N, 0)
    # a clean (finite-only) copy too, so most outputs are finite sums and not all NaN
    xc = torch.where(torch.isfinite(x) & (x.abs() < 1e30), x, torch.zeros(())).contiguous()
    wc = torch.where(torch.isfinite(w) & (w.abs() < 1e30), w, torch.zeros(())).contiguous()
    for xx, ww in ((x, w), (xc, wc)):
        ref = torch.empty(B, M, N)
        _C.lmul_bmm(xx.contiguous(), ww.contiguous(), ref, bits, 0)
        # strided: x rows padded, w rows padded, y rows padded, batch strides larger still
        ldx, ldw, ldy = K + 3, K + 5, N + 2
        sxb, swb, syb = M * ldx + 7, N * ldw + 1, M * ldy + 9
        xs = torch.full((B * sxb + 8,), float("nan"))
        ws = torch.full((B * swb + 8,), float("nan"))
        ys = torch.full((B * syb + 8,), -123.0)
        xv = xs.as_strided((B, M, K), (sxb, ldx, 1))
        wv = ws.as_strided((B, N, K), (swb, ldw, 1))
        xv.copy_(xx)
        wv.copy_(ww)
        check(lib, lib.ne_lemu_lmul_bmm(B, M, N, K, ptr(xs), sxb, ldx, ptr(ws), swb, ldw, ptr(ys), syb, ldy, bits))
        yv = ys.as_strided((B, M, N), (syb, ldy, 1))
        assert sums_eq(yv, ref), (B, M, N, K, bits)
        mask = torch.ones_like(ys, dtype=torch.bool)
        mask.as_strided((B, M, N), (syb, ldy, 1)).fill_(False)
        assert (ys[mask] == -123.0).all(), "lmul_bmm wrote outside y"
        if xx is xc and K:
            assert torch.isfinite(ref).float().mean() > 0.3
    assert set(launches(lib)) == {"lmul_bmm_kernel"}


# ------------------------------------------------------------------------------ linear attention
KINDS = {"linear": 0, "mala": 1, "norm": 2}
FMAPS = {"elu1": 0, "relu": 1, "identity": 2}
LA_CASES = [  # kind, fmap, normalize, norm, causal, decay, init
    ("linear", "elu1", True, "rms", True, False, True),
    ("linear", "relu", True, "rms", False, False, False),
    ("linear", "identity", False, "rms", True, False, True),
    ("linear", "elu1", False, "rms", False, False, True),
    ("mala", "elu1", True, "rms", True, False, True),
    ("mala", "elu1", True, "rms", False, False, False),
    ("norm", "identity", True, "rms", True, True, True),
    ("norm", "identity", True, "layer", True, False, False),
    ("norm", "identity", True, "layer", False, False, True),
]


def la_ref(kind, fmap, normalize, norm, causal, eps, q, k, v, d, s0, go, gS):
    """The CPU training kernels (cpp/ops/linear_attention_train.cpp) on CPU tensors."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    codes = (KINDS[kind], FMAPS[fmap], causal, normalize, 0 if norm == "rms" else 1, eps)
    o = torch.empty(B, T, H, Dv)
    S = torch.empty(B, H, Dk + 1, Dv + 1)
    _C.linear_attention_forward(*codes, q, k, v, d, s0, o, S, 0, recurrent=False)
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    gi = None if s0 is None else torch.empty_like(s0)
    _C.linear_attention_backward(*codes, q, k, v, d, s0, go, gS, gq, gk, gv, gi, 0, recurrent=False)
    return o, S, gq, gk, gv, gi


def la_emu(lib, algorithm, kind, fmap, normalize, norm, causal, eps, q, k, v, d, s0, go, gS):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    st = lambda t: (ctypes.c_int64 * 4)(*t.stride())  # noqa: E731
    head = (KINDS[kind], FMAPS[fmap], int(causal), int(normalize), 0 if norm == "rms" else 1, eps, algorithm,
            DT[q.dtype], B, T, H, Dk, Dv, ptr(q), st(q), ptr(k), st(k), ptr(v), st(v), ptr(d), ptr(s0))
    o = torch.full((B, T, H, Dv), -123.0)
    S = torch.full((B, H, Dk + 1, Dv + 1), -123.0)
    check(lib, lib.ne_lemu_la_forward(*head, ptr(o), ptr(S)))
    fwd = launches(lib)
    gq, gk, gv = (torch.full(t.shape, -123.0) for t in (q, k, v))
    gi = None if s0 is None else torch.full(s0.shape, -123.0)
    check(lib, lib.ne_lemu_la_backward(*head, ptr(go), ptr(gS), ptr(gq), ptr(gk), ptr(gv), ptr(gi)))
    return (o, S, gq, gk, gv, gi), fwd + launches(lib)


def close(a, b, what):
    """fp32 tolerance relative to the largest entry, with an absolute floor for gradients that are zero
    up to rounding (T = 1 with normalize / MALA / LayerNorm: grad_q cancels to ~1e-7, both sides noise)."""
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= 2e-4 * scale + 2e-6, f"{what}: max error {err} (scale {scale})"
    return err


@pytest.mark.parametrize("T", [1, 5, 70])
@pytest.mark.parametrize("case", LA_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_linear_attention(lib, case, T):
    kind, fmap, normalize, norm, causal, decay, init = case
    g = torch.Generator().manual_seed(T * 31 + LA_CASES.index(case))
    B, H, Dk, Dv = (2, 2, 8, 8) if T != 5 else (1, 3, 16, 12)
    eps = 1e-6
    # q, k, v strided: views into [B, T, H, D + pad] buffers (unit last stride), k transposed storage
    q = torch.randn(B, T, H, Dk + 3, generator=g)[..., :Dk]
    k = torch.randn(B, H, T, Dk, generator=g).transpose(1, 2)
    v = torch.randn(B, T, H, Dv, generator=g)
    d = torch.rand(H, generator=g) * 0.3 + 0.7 if decay else None
    s0 = None
    if init:
        s0 = torch.randn(B, H, Dk + 1, Dv + 1, generator=g) * 0.3
        if kind != "norm":  # linear / MALA divide by the state's z / n: keep them positive
            s0[:, :, :Dk, Dv] = s0[:, :, :Dk, Dv].abs() + 1.0
            s0[:, :, Dk, :Dv] = 0.1 * s0[:, :, Dk, :Dv]
            s0[:, :, Dk, Dv] = 3.0
    go = torch.randn(B, T, H, Dv, generator=g)
    gS = torch.randn(B, H, Dk + 1, Dv + 1, generator=g)
    ref = la_ref(kind, fmap, normalize, norm, causal, eps, q.contiguous(), k.contiguous(), v, d, s0, go, gS)
    names = ("o", "final_state", "grad_q", "grad_k", "grad_v", "grad_initial_state")
    for algorithm, smem in ((0, 0), (1, 0), (1, 4096)):  # chunk; recurrent (state in smem / in global)
        lib.ne_lemu_configure(0, smem)
        try:
            got, ran = la_emu(lib, algorithm, kind, fmap, normalize, norm, causal, eps, q, k, v, d, s0, go, gS)
        finally:
            lib.ne_lemu_configure(0, 0)
        if algorithm == 1:
            assert set(ran) == {"lin_attn_fwd_kernel<f32>", "lin_attn_bwd_kernel<f32>"}, ran
        else:
            assert "output_kernel<f32>" in ran and "backward_kv_kernel<f32>" in ran, ran
        for n, a, b in zip(names, got, ref):
            if b is None:
                assert a is None
                continue
            assert torch.isfinite(a).all(), (n, algorithm)
            close(a, b, f"{n} (algorithm {algorithm}, smem {smem})")
