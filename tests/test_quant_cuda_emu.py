"""cuda/quant_gemm.cu RUN without a GPU: the quantized-GEMM kernels and their launchers (the source the
nvcc build compiles; launches and `extern __shared__` rewritten for the host, -DNE_CUDA_EMU routing the
file's cp.async / ldmatrix / mma.sync wrappers to the emulator) run on the CPU through the SIMT emulator
of tests/cuda_emu/cuda_emu.h, built by g++ into a ctypes library (tests/cuda_emu/quant_emu.cpp).

Checked: the activation quantization (int8 per token, FP8 E4M3 per token and 128 channels) bit for bit
against the CPU's formulas (normengine.reference.quant, what cpp/ops/quant_gemm.cpp computes); every
format (int8 W8A8, int8-weight per row, g16 / g32 / g128 and with zero points, int4 g32/64/128 symmetric and
with zero points, fp8 per tensor and 128 x 128 blocks) for M in {1, 3, 8, 9, 16, 33, 130} (GEMV and tile
kernels), odd N and K where the format allows, bias, accumulate, strided x / y with guard regions, against
the CPU kernel (normengine._C.quant_linear: int8 bit for bit, the fp32-summing formats within fp32 summation error of
the terms) and a float64 reference; the GEMV fallbacks of the 8-bit formats (K % 16 != 0, unaligned W);
schedules and deferred cp.async landing for the tensor-core tiles; and that every kernel of the file ran.

What the emulator cannot show: timing, occupancy, the memory model, nvcc's fma contraction, and the
GPU's (unspecified) fp32 accumulation order inside an e4m3 mma: results may differ from a real GPU in
the last bits of fp32 sums, which the tolerances below (relative to the sum of |terms|) leave room for."""

import ctypes
import os

import pytest
import torch

from normengine import _C
from normengine.ops.quant import _CODE, quantize_weight
from normengine.reference import quant as rq

from conftest import quant_term_scale as term_scale
from cuda_emu.emu_build import CXX, EMU, ROOT, build, launch_names, ptr, quant_emu_source
from cuda_emu.emu_build import one_torch_thread  # noqa: F401 (an autouse fixture: applies to this module)
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found (the emulator harness is built with it)")

XDT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SENTINEL = -123.0
ORDERS = {"forward": 0, "reverse": 1, "eager": 2}
CP_ASYNC = {"immediate": 0, "deferred": 1}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantemu")
    src = d / "quant.emu.cu"
    src.write_text(quant_emu_source(os.path.join(ROOT, "cuda", "quant_gemm.cu")))
    L = build(d / "libquantemu.so", [os.path.join(EMU, "quant_emu.cpp")],
              ["-DNE_CUDA_EMU", "-DNE_WITH_CUDA", f'-DNE_EMU_QUANT_SOURCE="{src}"'],
              prefix="ne_qemu")
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    L.ne_qemu_configure.argtypes = [ci, ci, ci]
    L.ne_qemu_kernels.argtypes = [ctypes.c_char_p, ci]
    L.ne_qemu_quant_linear.argtypes = [i64, vp, ci, i64, ci, vp, vp, vp, i64, i64, i64, vp, vp, i64, ci]
    L.ne_qemu_quant_activations.argtypes = [i64, i64, vp, ci, i64, ci, vp, i64, vp, i64]
    L.ne_qemu_e4m3.argtypes = [vp, i64, ci, vp, vp]
    L.ne_qemu_bf16_linear.argtypes = [i64, i64, i64, vp, i64, vp, i64, vp, vp, i64, ci, vp, vp, vp, vp]
    L.ne_qemu_configure(0, 0, 90)
    return L


@pytest.fixture
def device_cfg(lib):
    def set_(order="forward", cp_async="immediate", cc=90):
        lib.ne_qemu_configure(ORDERS[order], CP_ASYNC[cp_async], cc)
    yield set_
    lib.ne_qemu_configure(0, 0, 90)


def check(lib, rc):
    assert rc == 0, lib.ne_qemu_error().decode()


def launches(lib):
    return launch_names(lib.ne_qemu_launches)


def all_kernels(lib):
    buf = ctypes.create_string_buffer(1 << 14)
    lib.ne_qemu_kernels(buf, len(buf))
    return set(buf.value.decode().split())


def group_of(qw):
    return qw.group_size


# ---------------------------------------------------------------------------- E4M3 conversions

def test_e4m3_conversions_match_torch(lib, gen):
    """The shimmed cuda_fp8.h: float -> E4M3 round to nearest even (ties, subnormals, the 448 edge,
    saturation), E4M3 -> f16 -> float exact, as torch.float8_e4m3fn (the CPU's round_e4m3)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float()
    finite = vals[~vals.isnan()]
    mids = (finite.sort().values[1:] + finite.sort().values[:-1]) / 2  # exact ties
    v = torch.cat([finite, mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(-float("inf"))),
                   torch.randn(2000, generator=gen) * 50, torch.randn(500, generator=gen) * 1e-2,
                   torch.tensor([0.0, -0.0, 447.9, 448.0, 463.9, 464.0, 464.1, 1e6, -1e6, 2.0 ** -10, 2.0 ** -9 * 0.5,
                                 -2.0 ** -9 * 1.5])]).contiguous()
    bits = torch.empty(v.numel(), dtype=torch.uint8)
    back = torch.empty(v.numel())
    lib.ne_qemu_e4m3(v.data_ptr(), v.numel(), 1, bits.data_ptr(), back.data_ptr())
    want = v.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(bits, want)
    assert torch.equal(back, want.view(torch.float8_e4m3fn).float())
    # every code decodes exactly; NaN codes to NaN; NaN encodes to 0x7f; without saturation > 464 is NaN
    c = vals.contiguous()
    bits2, back2 = torch.empty(256, dtype=torch.uint8), torch.empty(256)
    lib.ne_qemu_e4m3(c.data_ptr(), 256, 1, bits2.data_ptr(), back2.data_ptr())
    assert torch.equal(back2.isnan(), vals.isnan()) and torch.equal(back2[~vals.isnan()], vals[~vals.isnan()])
    assert (bits2[vals.isnan()] == 0x7f).all()
    big = torch.tensor([465.0, -500.0, float("inf")])
    b3, f3 = torch.empty(3, dtype=torch.uint8), torch.empty(3)
    lib.ne_qemu_e4m3(big.data_ptr(), 3, 0, b3.data_ptr(), f3.data_ptr())
    assert b3.tolist() == [0x7f, 0xff, 0x7f]


# ---------------------------------------------------------------------------- activations

def emu_activations(lib, x, fmt):
    M, K = x.shape
    ldx = K + 3
    xb = torch.zeros(M, ldx, dtype=x.dtype)
    xb[:, :K] = x
    KB = -(-K // 128)
    ldq, lds = K + 16, (1 if fmt == "int8" else KB) + 2
    q = torch.full((M, ldq), 0x5a, dtype=torch.uint8)
    s = torch.full((M, lds), SENTINEL)
    check(lib, lib.ne_qemu_quant_activations(M, K, xb.data_ptr(), XDT[x.dtype], ldx, _CODE[fmt], q.data_ptr(), ldq,
                                             s.data_ptr(), lds))
    assert (q[:, K:] == 0x5a).all() and (s[:, (1 if fmt == "int8" else KB):] == SENTINEL).all(), "wrote past K"
    return q[:, :K], s[:, :(1 if fmt == "int8" else KB)], launches(lib)


@pytest.mark.parametrize("K", [1, 37, 128, 200, 300])
@pytest.mark.parametrize("xdt", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quant_activations_bitexact(lib, fmt, xdt, K, gen):
    """quant_activations: q and s bit for bit the CPU's (reference.quant: s = max|x| / 127, q = rne(x * fl(1/s));
    FP8 s = max|x[block]| / 448, q = e4m3(x / s)); a zero row gives s = 0, q = 0; rows of mixed
    magnitude; bf16 / f16 x read exactly."""
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[xdt]
    M = 5
    x = torch.randn(M, K, generator=gen) * torch.tensor([1.0, 1e-3, 30.0, 0.0, 1.0])[:, None]
    if K > 130:
        x[4, 128:] = 0  # FP8: an all-zero second block
    x = x.to(dtype)
    q, s, names = emu_activations(lib, x, fmt)
    if fmt == "int8":
        wq, ws = rq.quantize_activations_int8(x.float())
        assert torch.equal(s.double(), ws), (s, ws)
        assert torch.equal(q.view(torch.int8).double(), wq)
        assert names == [f"quant_int8_rows<{xdt}>"]
    else:
        wq, ws = rq.quantize_activations_fp8(x.float())
        assert torch.equal(s.double(), ws)
        assert torch.equal(q.view(torch.float8_e4m3fn).double(), wq)
        assert names == [f"quant_fp8_blocks<{xdt}>"]


def test_quant_activations_nan(lib):
    """As quant_gemm.cu's comment says (the CPU's std::max / std::min behaviour): the row max ignores a
    NaN, and the NaN element itself quantizes to -127."""
    x = torch.tensor([[1.0, float("nan"), -2.54, 0.5]])
    q, s, _ = emu_activations(lib, x, "int8")
    assert s.item() == pytest.approx(2.54 / 127, rel=1e-7)
    assert q.view(torch.int8).tolist() == [[50, -127, -127, 25]]


# ---------------------------------------------------------------------------- quant_linear

def make_weight(fmt, group, sym, N, K, gen):
    w = torch.randn(N, K, generator=gen) * 0.5
    if fmt == "int8-weight" and not sym:  # zero points (GGUF's Q5_K / Q2_K blocks): codes 0..31, w = (q - z) s
        q = quantize_weight(w, fmt, group)
        data = torch.randint(0, 32, (N, K), generator=gen, dtype=torch.int8)
        return type(q)(fmt, (N, K), data, q.scale, torch.rand(N, K // group, generator=gen) * 31, group)
    return quantize_weight(w, fmt, group if fmt != "int8" else None, sym)


def sentinel_out(M, N, ldy, y0):
    """y [M, N] at row stride ldy inside a buffer of SENTINELs (yb), with the mask of y's elements in
    it; y holds y0, or NaN (must be overwritten)."""
    yb = torch.full((M * ldy + 8,), SENTINEL)
    y = yb[:M * ldy].view(M, ldy)[:, :N]
    inside = torch.zeros_like(yb, dtype=torch.bool)
    inside[:M * ldy].view(M, ldy)[:, :N] = True
    if y0 is not None:
        y.copy_(y0)
    else:
        y.fill_(float("nan"))
    return yb, y, inside


def run_emu(lib, x, qw, bias, y0, w_offset=0):
    """y from the emulated quant_linear; x at row stride K + 5 and y at N + 3 (M > 1) inside sentinel
    buffers whose gaps must come back untouched. w_offset: W's bytes start that far past a 16-byte boundary."""
    M, K = x.shape
    N = qw.shape[0]
    ldx = K + 5 if M > 1 else K
    xb = torch.zeros(M, ldx, dtype=x.dtype)
    xb[:, :K] = x
    ldy = N + 3 if M > 1 else N
    yb, y, inside = sentinel_out(M, N, ldy, y0)
    data = qw.data
    if w_offset:
        raw = torch.empty(data.numel() * data.element_size() + 32, dtype=torch.uint8)
        base = (-raw.data_ptr()) % 16 + w_offset
        raw[base:base + data.numel()].copy_(data.reshape(-1).view(torch.uint8))
        data_ptr = raw.data_ptr() + base
    else:
        data_ptr = data.data_ptr()
    check(lib, lib.ne_qemu_quant_linear(M, xb.data_ptr(), XDT[x.dtype], ldx, _CODE[qw.format], data_ptr,
                                        qw.scale.data_ptr(), None if qw.zero is None else qw.zero.data_ptr(),
                                        group_of(qw), N, K, None if bias is None else bias.data_ptr(),
                                        y.data_ptr(), ldy, int(y0 is not None)))
    assert (yb[~inside] == SENTINEL).all(), "a kernel wrote outside y's rows"
    return y.clone(), launches(lib)


def run_cpu(x, qw, bias, y0):
    M, K = x.shape
    N = qw.shape[0]
    y = y0.clone() if y0 is not None else torch.empty(M, N)
    _C.quant_linear(x.float().contiguous(), _CODE[qw.format], qw.data, qw.scale, qw.zero, group_of(qw), N, K, bias,
                    y, y0 is not None)
    return y


def expected_gemm(fmt, M, K, aligned=True):
    if M <= 8:
        mr = 1 if M <= 1 else 2 if M <= 2 else 4 if M <= 4 else 8
        return f"gemv_kernel<{ {'int8': 'int8', 'int8-weight': 'int8w', 'int4': 'int4', 'fp8': 'fp8'}[fmt]},{mr}>"
    if fmt in ("int8", "fp8"):
        return f"mma_kernel<{fmt}>" if K % 16 == 0 and aligned else f"gemv_kernel<{fmt},8>"
    return "fma_kernel<" + ("int8w" if fmt == "int8-weight" else "int4") + ">"


def check_case(lib, fmt, group, sym, M, N, K, gen, bias_on=True, acc=False, xdtype=torch.float32, w_offset=0):
    qw = make_weight(fmt, group, sym, N, K, gen)
    x = (torch.randn(M, K, generator=gen) * 2).to(xdtype)
    if M > 2:
        x[1] *= 1e-3  # rows of different magnitude (per-token scales)
    bias = torch.randn(N, generator=gen) if bias_on else None
    y0 = torch.randn(M, N, generator=gen) * 3 if acc else None
    y, names = run_emu(lib, x, qw, bias, y0, w_offset)
    cy = run_cpu(x, qw, bias, y0)
    want = rq.quantized_linear(x.float(), qw, bias)
    if y0 is not None:
        want = want + y0.double()
    S = term_scale(x, qw, bias, y0)
    assert not y.isnan().any()
    # float64 reference (with the format's activation quantization): fp32 summation error only
    err = ((y.double() - want).abs() / S.clamp_min(1e-30)).max().item()
    assert err <= 1e-5, f"vs float64 reference: {err:.3g} of the terms' sum"
    if fmt == "int8":
        # exact int32 dots, then the same fp32 epilogue as the CPU: bit for bit
        assert torch.equal(y, cy), f"int8 vs CPU: max diff {(y - cy).abs().max().item():.3g}"
    else:
        err = ((y.double() - cy.double()).abs() / S.clamp_min(1e-30)).max().item()
        assert err <= 2e-5, f"vs CPU kernel: {err:.3g} of the terms' sum"
    want_act = {"int8": "quant_int8_rows", "fp8": "quant_fp8_blocks"}.get(fmt, "to_f32_rows")
    xn = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[xdtype]
    assert names == [f"{want_act}<{xn}>", expected_gemm(fmt, M, K, w_offset == 0)], names
    return names


FORMATS = [("int8", 0, True), ("int8-weight", 0, True), ("int8-weight", 32, True), ("int8-weight", 128, True),
           ("int8-weight", 16, True), ("int8-weight", 16, False), ("int8-weight", 32, False),
           ("int4", 32, True), ("int4", 64, False),
           ("int4", 128, True), ("int4", 128, False), ("fp8", 0, True), ("fp8", 128, True)]
MS = [1, 3, 8, 9, 16, 33, 130]


def shape_for(fmt, group, M):
    """Odd N (a partial column tile / GEMV block); K odd where the format allows (int8-weight), else not a
    multiple of 128 (a partial K tile) but K % 16 == 0 (8-bit: the tensor-core path) or a multiple of the
    int4 group."""
    N = 150 if M > 8 else 37
    if fmt == "int8-weight":
        K = 203 if group == 0 else 3 * group  # (grouped: whole groups)
    elif fmt == "int4":
        K = 3 * group if group < 128 else 256
    else:
        K = 272
    return N, K


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("fmt,group,sym", FORMATS, ids=lambda v: str(v))
def test_quant_linear(lib, fmt, group, sym, M, gen):
    N, K = shape_for(fmt, group, M)
    check_case(lib, fmt, group, sym, M, N, K, gen, bias_on=M % 2 == 1, acc=M in (3, 16))


@pytest.mark.parametrize("xdt", ["bf16", "f16"])
@pytest.mark.parametrize("fmt,group,sym", FORMATS, ids=lambda v: str(v))
def test_quant_linear_half_inputs(lib, fmt, group, sym, xdt, gen):
    """bf16 / f16 activations (read and converted by the kernels themselves), a GEMV and a tile size."""
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[xdt]
    for M in (2, 17):
        N, K = shape_for(fmt, group, M)
        check_case(lib, fmt, group, sym, M, N, K, gen, xdtype=dtype)


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("fp8", 0), ("fp8", 128)])
@pytest.mark.parametrize("M", [4, 9, 40])
def test_eight_bit_gemv_fallbacks(lib, fmt, group, M, gen):
    """8-bit weights the tensor-core kernel cannot stream run the GEMV for every M: K % 16 != 0 (odd K,
    unaligned rows: byte loads), and a W that is not 16-byte aligned."""
    N = 33
    check_case(lib, fmt, group, True, M, N, 131, gen)
    check_case(lib, fmt, group, True, M, N, 200, gen, acc=True)
    check_case(lib, fmt, group, True, M, N, 256, gen, w_offset=4)


def test_many_tiles(lib, gen):
    """More than 8 row tiles (the mma kernel's grouped rasterization: a last, smaller group) and several
    column tiles, K of 5 tiles."""
    check_case(lib, "int8", 0, True, 1100, 260, 640, gen)


@pytest.mark.parametrize("cp_async", ["immediate", "deferred"])
@pytest.mark.parametrize("order", ["forward", "reverse", "eager"])
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("fp8", 128)])
def test_tiles_schedules(lib, device_cfg, fmt, group, order, cp_async, gen):
    """The cp.async pipeline and barriers of the mma kernel: copies landing at the cp.async (a stage
    overwritten while others still read it would show) or only at the wait_group that retires them (a
    stage read before its wait would read the 0xff-filled or previous tile); fibers in thread order,
    reversed, or eagerly (warp 0 as far ahead as the barriers let it). Bit for bit the same result."""
    N, K, M = 150, 528, 130  # K: 4 full tiles + a partial one, more tiles than pipeline stages
    qw = make_weight(fmt, group, True, N, K, gen)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    base, _ = run_emu(lib, x, qw, bias, None)
    device_cfg(order=order, cp_async=cp_async)
    y, names = run_emu(lib, x, qw, bias, None)
    assert names[-1] == f"mma_kernel<{fmt}>"
    assert torch.equal(y, base)
    want = rq.quantized_linear(x, qw, bias)
    assert ((y.double() - want).abs() / term_scale(x, qw, bias, None)).max().item() <= 1e-5


def test_fp8_needs_sm89(lib, device_cfg, gen):
    """FP8 on a device below compute capability 8.9 is refused before any launch."""
    device_cfg(cc=80)
    qw = make_weight("fp8", 0, True, 8, 64, gen)
    x = torch.randn(2, 64)
    y = torch.empty(2, 8)
    rc = lib.ne_qemu_quant_linear(2, x.data_ptr(), 0, 64, 3, qw.data.data_ptr(), qw.scale.data_ptr(), None, 0, 8, 64,
                                  None, y.data_ptr(), 8, 0)
    assert rc == -1 and "8.9" in lib.ne_qemu_error().decode()
    assert launches(lib) == []


def test_every_kernel_ran(lib, gen):
    """Every kernel instantiation of quant_gemm.cu runs in these cases (the launchers' own choices)."""
    seen = set()
    for fmt, group, sym in FORMATS:
        for M in (1, 2, 4, 8, 9):
            N, K = shape_for(fmt, group, M)
            seen.update(check_case(lib, fmt, group, sym, M, 12, K, gen))
    for xdtype in (torch.bfloat16, torch.float16):
        for fmt, group in (("int8", 0), ("int8-weight", 0), ("fp8", 0)):
            seen.update(check_case(lib, fmt, group, True, 3, 12, 272 if fmt != "int8-weight" else 203, gen,
                                   xdtype=xdtype))
    for M in (3, 20):  # bf16_linear (M > 8 in the runner; the entry itself takes any M)
        _, names = run_bf16(lib, torch.randn(M, 64, generator=gen), torch.randn(12, 64, generator=gen), None, None)
        seen.update(names)
    kernels = all_kernels(lib)
    assert len(kernels) == 9 + 16 + 4 + 2
    assert kernels <= seen, sorted(kernels - seen)


# ---------------------------------------------------------------------------- bf16_linear (tensor cores)

def run_bf16(lib, x, w, bias, y0, ldw_pad=0, w_offset=0, norm=(None, None, None)):
    """y from the emulated bf16_linear (x float32 at row stride K + 5, W bfloat16 at row stride K + ldw_pad,
    its first byte w_offset past a 16-byte boundary, y at N + 3 inside a sentinel buffer; norm: the fused
    norm's per-row (shift, shift_lo, scale), None for a step skipped); returns y (None when the entry
    declined) and the launches."""
    M, K = x.shape
    N = w.shape[0]
    ldx, ldw, ldy = K + 5, K + ldw_pad, N + 3
    xb = torch.zeros(M, ldx)
    xb[:, :K] = x
    raw = torch.zeros(N * ldw + 64, dtype=torch.bfloat16)
    base = ((-raw.data_ptr()) % 16 + w_offset) // 2
    wv = raw[base:base + N * ldw].view(N, ldw)
    wv[:, :K] = w.to(torch.bfloat16)
    yb, y, inside = sentinel_out(M, N, ldy, y0)
    ran = ctypes.c_int(-1)
    check(lib, lib.ne_qemu_bf16_linear(M, N, K, xb.data_ptr(), ldx, wv.data_ptr(), ldw,
                                       None if bias is None else bias.data_ptr(), y.data_ptr(), ldy,
                                       int(y0 is not None), *(ptr(t) for t in norm), ctypes.byref(ran)))
    assert torch.equal(yb[~inside], torch.full_like(yb[~inside], SENTINEL)), "bf16_linear wrote outside y"
    return (y.clone() if ran.value else None), launches(lib)


def bf16_want(x, w, bias, y0):
    """float64 of bf16(x) W^T (+ bias) (+ y0), and the sum of |terms| per output."""
    xb, wb = x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double()
    want, S = xb @ wb.t(), xb.abs() @ wb.abs().t()
    for t in (bias, y0):
        if t is not None:
            want, S = want + t.double(), S + t.double().abs()
    return want, S


@pytest.mark.parametrize("M,N,K", [(9, 33, 40), (130, 150, 264), (300, 260, 1024), (17, 12, 8)])
@pytest.mark.parametrize("extra", ["plain", "bias_acc", "padded_rows"])
def test_bf16_linear(lib, M, N, K, extra, gen):
    """matmul_precision "medium" on the GPU's tensor cores: x rounded to bfloat16, products exact, fp32 sums;
    against float64 of the same rounded operands, per output within 1e-5 of its terms' sum: M and N tails,
    K tails (K a multiple of 8, not of the 64-element tile), several tiles and pipeline stages, bias and
    accumulate, weight rows with padding. A rounding of x other than to nearest even, or a fragment
    mispairing, is far outside that."""
    x = torch.randn(M, K, generator=gen) * 3
    w = torch.randn(N, K, generator=gen)
    bias = torch.randn(N, generator=gen) if extra == "bias_acc" else None
    y0 = torch.randn(M, N, generator=gen) if extra == "bias_acc" else None
    y, names = run_bf16(lib, x, w, bias, y0, ldw_pad=8 if extra == "padded_rows" else 0)
    assert y is not None and names[-1] == "mma_kernel<bf16>" and "to_bf16_rows" in names, names
    want, S = bf16_want(x, w, bias, y0)
    assert ((y.double() - want).abs() / S).max().item() <= 1e-5
    # the rounding of x matters: products of unrounded x are much further off than the sums' rounding
    exact = x.double() @ w.to(torch.bfloat16).double().t() + (0 if bias is None else bias.double()) + \
        (0 if y0 is None else y0.double())
    assert ((exact - want).abs() / S).max().item() > 1e-4


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_bf16_linear_fused_norm(lib, kind, gen):
    """The CUDA runner's fused norms under "medium": bf16_linear normalizes x's rows as it rounds them,
    bf16(((x - hi) - lo) * rstd), LayerNorm's mean as the statistics kernel's pair (hi = x[0], lo =
    mean(x - x[0])), RMSNorm's scale alone; on rows of 1e4 + N(0, 1) (LayerNorm) and ordinary ones. Against
    float64 of the same rounded operands (the rounding applied to the float32 normalized row, as the
    kernel computes it), within 1e-5 of the terms' sum; a dropped shift or scale is far off."""
    M, N, K = 37, 45, 96
    x = torch.randn(M, K, generator=gen)
    if kind == "layer":
        x[1::2] += 1e4
        hi = x[:, 0].clone()
        lo = (x.double() - hi.double()[:, None]).mean(1).float()
        mean = x.double().mean(1)
        rstd = (1 / ((x.double() - mean[:, None]).pow(2).mean(1) + 1e-5).sqrt()).float()
        xn = ((x - hi[:, None]) - lo[:, None]) * rstd[:, None]  # float32, in the kernel's order
        norm = (hi, lo, rstd)
    else:
        rstd = (1 / (x.double().pow(2).mean(1) + 1e-6).sqrt()).float()
        xn = x * rstd[:, None]
        norm = (None, None, rstd)
    w, bias = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    y, names = run_bf16(lib, x, w, bias, None, norm=norm)
    assert y is not None and names[-1] == "mma_kernel<bf16>", names
    want, S = bf16_want(xn, w, bias, None)
    assert ((y.double() - want).abs() / S).max().item() <= 1e-5
    # the normalized rows are what went in: un-normalized x (or x without its shift) is nowhere near
    for bad in (x, x * rstd[:, None]) if kind == "layer" else (x,):
        assert ((bf16_want(bad, w, bias, None)[0] - want).abs() / S).max().item() > 1e-2


def test_bf16_linear_declines(lib, device_cfg, gen):
    """Where the tile kernel cannot stream W (K or the row stride not a multiple of 8 elements, W not
    16-byte aligned) or the GPU has no bf16 MMA (before sm_80), bf16_linear does nothing and says so."""
    x, w = torch.randn(20, 44, generator=gen), torch.randn(10, 44, generator=gen)
    assert run_bf16(lib, x[:, :42], w[:, :42], None, None) == (None, [])  # K % 8
    assert run_bf16(lib, x[:, :40], w[:, :40], None, None, ldw_pad=4) == (None, [])  # row stride 44
    assert run_bf16(lib, x[:, :40], w[:, :40], None, None, w_offset=8) == (None, [])
    device_cfg(cc=75)
    assert run_bf16(lib, x[:, :40], w[:, :40], None, None) == (None, [])


@pytest.mark.parametrize("cp_async", ["immediate", "deferred"])
@pytest.mark.parametrize("order", ["reverse", "eager"])
def test_bf16_tiles_schedules(lib, device_cfg, order, cp_async, gen):
    """The bf16 tiles under other fiber orders and deferred cp.async landings: bit for bit the same."""
    x, w = torch.randn(140, 520, generator=gen), torch.randn(135, 520, generator=gen)
    base, _ = run_bf16(lib, x, w, None, None)
    device_cfg(order=order, cp_async=cp_async)
    y, names = run_bf16(lib, x, w, None, None)
    assert names[-1] == "mma_kernel<bf16>" and torch.equal(y, base)
