"""CUDA quantized GEMMs (cuda/quant_gemm.cu, bound as _C.quant_linear_cuda / _C.quant_activations_cuda)
against the float64 reference with the same activation quantization (normengine.reference.quant) and
against the CPU kernels. Every format (int8 W8A8, int8-weight (g16 with zero points too), int4 symmetric /
asymmetric and every group size, fp8 per tensor / 128 x 128 blocks) at M = 1 and 3 (GEMV), 17 and 200
(tensor-core / tiled kernels, M tails), N, K = 128 and 4096 with odd N, K tails (K % 128 != 0, K % 16 != 0), unaligned
weights, bf16 / f16 / strided x, bias and accumulate, NaN activations, bad arguments. The activation
quantization must match the reference bit for bit. Skips without a CUDA GPU."""

import pytest
import torch

import normengine
from normengine import _C, errors
from normengine.ops.quant import QuantizedWeight, quantize_weight
from normengine.reference import quant as ref

from conftest import rel_err

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and normengine.cuda_available() and hasattr(_C, "quant_linear_cuda")),
    reason="no CUDA GPU visible (or a build without CUDA kernels)",
)

CODE = {"int8": 0, "int8-weight": 1, "int4": 2, "fp8": 3}
# (format, group_size, symmetric)
VARIANTS = [
    ("int8", None, True),
    ("int8-weight", None, True),
    ("int8-weight", 32, True),
    ("int8-weight", 16, True),
    ("int8-weight", 16, False),
    ("int4", 128, True),
    ("int4", 32, False),
    ("fp8", 128, True),
    ("fp8", 0, True),
]
VIDS = ["int8", "int8w", "int8w-g32", "int8w-g16", "int8w-g16-asym", "int4-g128", "int4-g32-asym", "fp8-block",
        "fp8-tensor"]
# fp32 sums of up to 4096 terms against float64: a few 1e-6 of max |y|
TOL = 2e-5


def run(x, qw, bias=None, out=None, accumulate=False):
    N, K = qw.shape
    if out is None:
        out = torch.full((x.shape[0], N), float("nan"), dtype=torch.float32, device=x.device)
    g = qw.group_size
    _C.quant_linear_cuda(x, CODE[qw.format], qw.data, qw.scale, qw.zero, g, N, K, bias, out, accumulate,
                         torch.cuda.current_stream().cuda_stream)
    return out


def make(gen, M, N, K, fmt, group, sym, scale_rows=True):
    x = torch.randn(M, K, generator=gen)
    if scale_rows:  # rows of very different magnitude: per-token scales matter
        x = x * torch.logspace(-2, 2, M)[:, None]
    w = torch.randn(N, K, generator=gen) / K**0.5
    if fmt == "int8-weight" and not sym:  # zero points (GGUF's Q5_K / Q2_K blocks): codes 0..31, w = (q - z) s
        q = quantize_weight(w, fmt, group)
        data = torch.randint(0, 32, (N, K), generator=gen, dtype=torch.int8)
        z = torch.rand(N, K // group, generator=gen) * 31
        return x.cuda(), QuantizedWeight(fmt, (N, K), data, q.scale, z, group).to("cuda")
    qw = quantize_weight(w.cuda(), fmt, group, symmetric=sym)
    return x.cuda(), qw


@pytest.mark.parametrize("fmt,group,sym", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("M", [1, 3, 17, 200])
@pytest.mark.parametrize("N,K", [(128, 128), (257, 4096), (4096, 4096)])
def test_against_reference(gen, fmt, group, sym, M, N, K):
    x, qw = make(gen, M, N, K, fmt, group, sym)
    bias = torch.randn(N, generator=gen).cuda()
    got = run(x, qw, bias)
    want = ref.quantized_linear(x, qw, bias, dtype=torch.float64)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < TOL, (fmt, M, N, K)
    # and the CPU kernels, on the same packed weight
    cpu = torch.empty(M, N)
    qc = qw.to("cpu")
    _C.quant_linear(x.cpu(), CODE[fmt], qc.data, qc.scale, qc.zero, qc.group_size,
                    N, K, bias.cpu(), cpu)
    assert rel_err(got, cpu) < TOL


# int4 needs K % group == 0: K = 96 with groups of 32; the others also take K % 16 != 0
K_TAILS = [(f, g, s, K) for (f, g, s) in VARIANTS if f != "int4" and not (f == "int8-weight" and g)
           for K in (96, 144, 100, 1)] + \
          [("int4", 32, True, 96), ("int4", 32, False, 96), ("int8-weight", 32, True, 96)]


@pytest.mark.parametrize("fmt,group,sym,K", K_TAILS)
@pytest.mark.parametrize("M", [1, 17, 131])
def test_k_tails(gen, fmt, group, sym, K, M):
    """K % 128 != 0 (zero-filled K tail of the tensor-core tile), K % 16 != 0 (GEMV fallback for every M)."""
    N = 131
    x, qw = make(gen, M, N, K, fmt, group, sym)
    got = run(x, qw)
    want = ref.quantized_linear(x, qw, None, dtype=torch.float64)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("fmt,group,sym", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("M", [2, 40])
def test_unaligned_weight(gen, fmt, group, sym, M):
    """A weight whose data pointer is not 16-byte aligned takes the GEMV path (any M) and stays exact."""
    N, K = 67, 256
    x, qw = make(gen, M, N, K, fmt, group, sym)
    buf = torch.empty(qw.data.numel() + 1, dtype=qw.data.dtype, device="cuda")
    shifted = buf[1:].view(qw.data.shape)
    shifted.copy_(qw.data)
    assert shifted.data_ptr() % 16 != 0
    qw2 = QuantizedWeight(qw.format, qw.shape, shifted, qw.scale, qw.zero, qw.group_size)
    got = run(x, qw2)
    want = ref.quantized_linear(x, qw, None, dtype=torch.float64)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("fmt,group,sym", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 33])
def test_half_inputs_and_strides(gen, fmt, group, sym, xdtype, M):
    N, K = 129, 512
    x, qw = make(gen, M, N, K, fmt, group, sym)
    wide = torch.zeros(M, K + 40, dtype=xdtype, device="cuda")
    wide[:, 8:8 + K] = x.to(xdtype)
    xs = wide[:, 8:8 + K]  # row stride K + 40, offset 8
    assert xs.stride(0) == K + 40 and xs.storage_offset() == 8
    got = run(xs, qw)
    want = ref.quantized_linear(xs.float(), qw, None, dtype=torch.float64)
    assert rel_err(got, want) < TOL
    # output with a row stride, accumulate
    base = torch.randn(M, N + 5, generator=gen).cuda()
    out = base.clone()
    run(xs, qw, out=out[:, :N], accumulate=True)
    assert rel_err(out[:, :N], base[:, :N].double() + want) < TOL
    assert torch.equal(out[:, N:], base[:, N:])


@pytest.mark.parametrize("M,K", [(1, 128), (5, 1000), (300, 4096), (7, 1)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_bit_exact(gen, M, K, xdtype):
    x = (torch.randn(M, K, generator=gen) * torch.logspace(-3, 3, M)[:, None]).to(xdtype).cuda()
    x[0, 0] = 0.0
    if M > 2:
        x[1] = 0.0  # an all-zero row: scale 0, codes 0
    stream = torch.cuda.current_stream().cuda_stream
    q = torch.empty(M, K, dtype=torch.int8, device="cuda")
    s = torch.empty(M, 1, dtype=torch.float32, device="cuda")
    _C.quant_activations_cuda(x, 0, q, s, stream)
    q_ref, s_ref = ref.quantize_activations_int8(x)
    assert torch.equal(s.double(), s_ref)
    assert torch.equal(q.double(), q_ref)
    kb = -(-K // 128)
    q8 = torch.empty(M, K, dtype=torch.uint8, device="cuda")
    s8 = torch.empty(M, kb, dtype=torch.float32, device="cuda")
    _C.quant_activations_cuda(x, 3, q8, s8, stream)
    xq_ref, s8_ref = ref.quantize_activations_fp8(x)
    assert torch.equal(s8.double(), s8_ref)
    got = q8.view(torch.float8_e4m3fn).double()
    assert torch.equal(got, xq_ref)


def test_nan_activation_matches_cpu(gen):
    """A NaN in x: int8 ignores it in the row maximum and codes it -127 (as the CPU kernels do); fp8 makes
    its row NaN."""
    M, N, K = 20, 64, 256
    for fmt in ("int8", "fp8"):
        x, qw = make(gen, M, N, K, fmt, 128 if fmt == "fp8" else None, True)
        x[3, 7] = float("nan")
        got = run(x, qw)
        cpu = torch.empty(M, N)
        qc = qw.to("cpu")
        _C.quant_linear(x.cpu(), CODE[fmt], qc.data, qc.scale, None, qc.group_size if fmt == "fp8" else 0, N, K, None,
                        cpu)
        ok = torch.ones(M, dtype=torch.bool)
        ok[3] = False
        assert rel_err(got[ok], cpu[ok]) < TOL
        if fmt == "int8":
            assert torch.isfinite(got[3]).all() and rel_err(got[3], cpu[3]) < TOL
        else:
            assert torch.isnan(got[3]).all() and torch.isnan(cpu[3]).all()


def test_large_k_blocks_and_m0(gen):
    # fp8 128 x 128 blocks with a partial last block in N and K, M spanning three row tiles
    x, qw = make(gen, 300, 300, 1040, "fp8", 128, True)
    assert rel_err(run(x, qw), ref.quantized_linear(x, qw, None)) < TOL
    # M = 0: nothing to do, no launch error
    out = torch.empty(0, 300, device="cuda")
    run(x[:0], qw, out=out)


def test_bad_arguments(gen):
    x, qw = make(gen, 4, 64, 128, "int8", None, True)
    out = torch.empty(4, 64, device="cuda")
    s = torch.cuda.current_stream().cuda_stream
    g = 0

    def call(**kw):
        a = dict(x=x, format=0, data=qw.data, scale=qw.scale, zero=None, group=g, N=64, K=128, bias=None, out=out,
                 accumulate=False, stream=s)
        a.update(kw)
        _C.quant_linear_cuda(**a)

    call()
    with pytest.raises(errors.DeviceError, match="x"):
        call(x=x.cpu())
    with pytest.raises(errors.DeviceError, match="qweight.scale"):
        call(scale=qw.scale.cpu())
    with pytest.raises(errors.DTypeError, match="x"):
        call(x=x.double())
    with pytest.raises(errors.DTypeError, match="qweight.data"):
        call(data=qw.data.view(torch.uint8))
    with pytest.raises(errors.ShapeError, match="x"):
        call(x=x[:, :100])
    with pytest.raises(errors.ShapeError, match="x"):
        call(x=x.t().contiguous().t())  # column stride != 1
    with pytest.raises(errors.ShapeError, match="out"):
        call(out=torch.empty(4, 63, device="cuda"))
    with pytest.raises(errors.DTypeError, match="out"):
        call(out=torch.empty(4, 64, device="cuda", dtype=torch.float16))
    with pytest.raises(errors.ShapeError, match="qweight.scale"):
        call(scale=qw.scale[:10])
    with pytest.raises(errors.ShapeError, match="bias"):
        call(bias=torch.zeros(63, device="cuda"))
    with pytest.raises(errors.ArgumentError, match="format"):
        call(format=7)
    with pytest.raises(errors.ArgumentError, match="zero"):
        call(zero=torch.zeros(64, device="cuda"))
    q4 = quantize_weight(torch.randn(64, 128, device="cuda"), "int4", 64)
    with pytest.raises(errors.ArgumentError, match="group"):
        call(format=2, data=q4.data, scale=q4.scale, group=48)
    with pytest.raises(errors.ShapeError, match="K"):
        call(format=2, data=q4.data, scale=q4.scale, group=64, K=96, x=x[:, :96])
    with pytest.raises(errors.ArgumentError, match="format"):
        _C.quant_activations_cuda(x, 1, torch.empty(4, 128, dtype=torch.int8, device="cuda"),
                                  torch.empty(4, 1, device="cuda"), s)


@pytest.mark.parametrize("fmt,group,sym", VARIANTS, ids=VIDS)
def test_ops_quantized_linear_runs_the_kernel(gen, fmt, group, sym):
    """normengine.ops.quantized_linear on CUDA tensors (3-D x, a strided view, bias, out=) agrees with
    the CPU op on the same packed weight."""
    from normengine.ops import quantized_linear

    x, qw = make(gen, 2 * 5, 96, 256, fmt, group, sym)
    x3 = x.view(2, 5, 256)
    bias = torch.randn(96, generator=gen).cuda()
    got = quantized_linear(x3, qw, bias)
    want = quantized_linear(x3.cpu(), qw.to("cpu"), bias.cpu())
    assert got.shape == (2, 5, 96) and got.is_cuda
    assert rel_err(got.cpu(), want) < TOL
    wide = torch.randn(10, 512, generator=gen).cuda()[:, ::2]  # column stride 2: copied, not misread
    assert rel_err(quantized_linear(wide, qw).cpu(), quantized_linear(wide.cpu(), qw.to("cpu"))) < TOL
    out = torch.empty(2, 5, 96, device="cuda")
    assert quantized_linear(x3, qw, bias, out=out) is out
    assert rel_err(out.cpu(), want) < TOL


# ------------------------------------------------------------------ Hopper: wgmma kernels (quant_gemm_sm90)
def _hopper_wgmma():
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and hasattr(_C, "quant_linear_cuda") and _C.sm90_gemm_compiled())


hopper = pytest.mark.skipif(not _hopper_wgmma(), reason="needs a compute capability 9.0 GPU and the sm_90a kernels")


def _both_paths(x, qw, bias=None):
    """(wgmma result, mma.sync result, whether the wgmma kernels took the call)."""
    calls = _C.sm90_gemm_calls()
    a = run(x, qw, bias)
    took = _C.sm90_gemm_calls() > calls
    _C.set_sm90_gemm(False)
    try:
        b = run(x, qw, bias)
    finally:
        _C.set_sm90_gemm(True)
    return a, b, took


SM90_VARIANTS = [("int8", None), ("fp8", 128), ("fp8", 0)]


@hopper
@pytest.mark.parametrize("fmt,group", SM90_VARIANTS, ids=["int8", "fp8-block", "fp8-tensor"])
@pytest.mark.parametrize("M,N,K", [(9, 128, 128), (17, 4096, 4096), (200, 260, 1040), (1000, 4100, 144),
                                   (128, 384, 4096), (2049, 1024, 2048)])
def test_sm90_against_reference_and_mma(gen, fmt, group, M, N, K):
    """The wgmma kernels against the float64 reference, and against the mma.sync kernel on the same
    quantized operands: M / N / K tails (TMA zero fill, clipped stores), both fp8 weight scalings, bias."""
    assert _C.sm90_gemm_enabled()
    x, qw = make(gen, M, N, K, fmt, group, True)
    bias = torch.randn(N, generator=gen).cuda()
    got, mma, took = _both_paths(x, qw, bias)
    assert took, "the wgmma kernels declined an aligned problem"
    assert torch.isfinite(got).all()  # every element written (run() poisons the output with NaN)
    want = ref.quantized_linear(x, qw, bias, dtype=torch.float64)
    assert rel_err(got, want) < TOL
    # int32 sums are exact, so int8 differs from mma.sync at most by the epilogue's rounding (fused multiply-add)
    assert rel_err(got, mma) < (1e-6 if fmt == "int8" else TOL)


@hopper
@pytest.mark.parametrize("fmt,group", SM90_VARIANTS, ids=["int8", "fp8-block", "fp8-tensor"])
def test_sm90_accumulate_and_strided_out(gen, fmt, group):
    """y += x W^T into an output with a row stride (the source-reading instantiation), no bias."""
    M, N, K = 300, 512, 1024
    x, qw = make(gen, M, N, K, fmt, group, True)
    base = torch.randn(M, N + 12, generator=gen).cuda()
    calls = _C.sm90_gemm_calls()
    out = base.clone()
    run(x, qw, out=out[:, :N], accumulate=True)
    assert _C.sm90_gemm_calls() == calls + 1
    want = ref.quantized_linear(x, qw, None, dtype=torch.float64)
    assert rel_err(out[:, :N], base[:, :N].double() + want) < TOL
    assert torch.equal(out[:, N:], base[:, N:])


@hopper
def test_sm90_declines_what_tma_cannot_address(gen):
    """Output rows TMA cannot address (a contiguous y with N % 4 != 0: 16-byte row stride missed; a y whose
    base is 4 bytes off): the mma.sync kernel runs, exact. A bias 4 bytes off is fine (read per element)."""
    M, K = 64, 256
    for N, offset in ((257, 0), (256, 1)):
        x, qw = make(gen, M, N, K, "int8", None, True)
        buf = torch.full((M, N + 4), float("nan"), device="cuda")
        out = buf[:, offset:offset + N] if offset else torch.full((M, N), float("nan"), device="cuda")
        calls = _C.sm90_gemm_calls()
        run(x, qw, out=out)
        assert _C.sm90_gemm_calls() == calls
        assert rel_err(out, ref.quantized_linear(x, qw, None, dtype=torch.float64)) < TOL
    x, qw = make(gen, M, 256, K, "int8", None, True)
    bias = torch.randn(257, generator=gen).cuda()[1:]
    assert bias.data_ptr() % 16 != 0
    calls = _C.sm90_gemm_calls()
    got = run(x, qw, bias)
    assert _C.sm90_gemm_calls() == calls + 1
    assert rel_err(got, ref.quantized_linear(x, qw, bias, dtype=torch.float64)) < TOL


@hopper
def test_sm90_nan_row_and_switch(gen):
    """A NaN activation in fp8 makes its row NaN on both paths; int8 ignores it as the CPU does."""
    M, N, K = 40, 128, 256
    for fmt, group in (("int8", None), ("fp8", 128)):
        x, qw = make(gen, M, N, K, fmt, group, True)
        x[5, 9] = float("nan")
        got, mma, took = _both_paths(x, qw)
        assert took
        ok = torch.ones(M, dtype=torch.bool)
        ok[5] = False
        assert rel_err(got[ok], mma[ok]) < TOL
        if fmt == "fp8":
            assert torch.isnan(got[5]).all()
        else:
            assert rel_err(got[5], mma[5]) < TOL


def test_sm90_switch_exists():
    """Every build answers whether it has the wgmma kernels; a CUDA build can switch them."""
    assert isinstance(_C.sm90_gemm_compiled(), bool)
    if hasattr(_C, "set_sm90_gemm"):
        _C.set_sm90_gemm(False)
        assert not _C.sm90_gemm_enabled()
        _C.set_sm90_gemm(True)
        assert _C.sm90_gemm_enabled()
