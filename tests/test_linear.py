"""Dense linear (ne.ops.linear and the runner's raw contract ne::gemm_f32) against
normengine.reference.linear in float64, on every CPU ISA and on CUDA (cuda/gemm.cu) when a GPU is
visible: odd sizes on both kernel paths (GEMV for M <= 15 rows on the CPU, 16 on CUDA: decode of one
sequence or a batch, packed / tiled GEMMs above), 16-bit weights, bias, accumulate, strided inputs, NaN,
thread counts, and argument errors."""

import pytest
import torch
import torch.nn.functional as F

import normengine as ne
from normengine import _C
from normengine import reference as ref
from conftest import rel_err

WDTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@pytest.fixture
def cpu(device):
    """The CPU ISA variants of the `device` fixture (tests of the CPU's raw gemm_f32 hook)."""
    if device != "cpu":
        pytest.skip("a test of the CPU kernels' raw entry point")
    return device


def on(dev, *ts):
    """The tensors moved to the device under test (None stays None)."""
    return [None if t is None else t.to(dev) for t in ts]


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def err(y, x, w, want_):
    """max |y - want| relative to max |want|, with a floor at the size of the terms' sum of squares,
    max_mn sqrt(sum_k (x[m,k] w[n,k])^2): the magnitude of a sum of K random-sign terms. (A single
    output whose terms cancel to ~0 is held to fp32 accuracy on the terms, not on the result.)"""
    floor = ((x.double() ** 2).reshape(-1, x.size(-1)) @ (w.double() ** 2).T).sqrt().max().item()
    return rel_err(y, want_, floor=floor)


def want(x, w, b=None, y0=None):
    """The reference in float64 on exactly the values the kernel sees (16-bit weights upcast)."""
    r = ref.linear(x.double(), w.double(), None if b is None else b.double())
    return r if y0 is None else r + y0.double()


# ----------------------------------------------------------------------------------- values
@pytest.mark.parametrize("K", [1, 5, 31, 769, 4097])
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_odd_sizes(K, wdtype, device, gen):
    for M in (1, 3, 6, 8, 12, 15, 16, 17, 64):
        for N in (1, 7, 33, 257):
            x = randn(M, K, gen=gen)
            w = randn(N, K, gen=gen, dtype=WDTYPES[wdtype])
            b = randn(N, gen=gen)
            for bias in (b, None):
                y = ne.ops.linear(*on(device, x, w, bias)).cpu()
                assert y.shape == (M, N) and y.dtype == torch.float32
                assert err(y, x, w, want(x, w, bias)) <= 1e-5, (M, N, K, bias is None, gen.initial_seed())


@pytest.mark.parametrize("MNK", [(2, 2304, 768), (100, 800, 1030), (9, 3, 300), (130, 50, 64)])
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_blocked_shapes(MNK, wdtype, device, gen):
    """Several K blocks, panel groups and row tiles (and GPT-2's decode shape)."""
    M, N, K = MNK
    x, w, b = randn(M, K, gen=gen), randn(N, K, gen=gen, dtype=WDTYPES[wdtype]), randn(N, gen=gen)
    assert err(ne.ops.linear(*on(device, x, w, b)).cpu(), x, w, want(x, w, b)) <= 1e-5, gen.initial_seed()


def test_matches_torch(gen):
    x, w, b = randn(3, 5, 96, gen=gen), randn(40, 96, gen=gen), randn(40, gen=gen)
    assert rel_err(ne.ops.linear(x, w, b), F.linear(x.double(), w.double(), b.double())) <= 1e-5


@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 9, 17, 64])
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_accumulate(M, wdtype, cpu, gen):
    """ne::gemm_f32(..., accumulate=true): y += x W^T (+ bias), through the testing hook."""
    for N, K in ((7, 5), (33, 769), (257, 300)):
        x, w, b = randn(M, K, gen=gen), randn(N, K, gen=gen, dtype=WDTYPES[wdtype]), randn(N, gen=gen)
        for bias in (b, None):
            y0 = randn(M, N, gen=gen)
            y = y0.clone()
            _C.gemm_f32(x, w, bias, y, True)
            assert err(y, x, w, want(x, w, bias, y0)) <= 1e-5, (M, N, K, gen.initial_seed())
            _C.gemm_f32(x, w, bias, y, False)  # overwrites
            assert err(y, x, w, want(x, w, bias)) <= 1e-5, (M, N, K, gen.initial_seed())


@pytest.mark.parametrize("M", [1, 3, 17])
def test_strided(M, device, gen):
    K, N = 70, 45
    xb, wb, b = on(device, randn(M, K + 9, gen=gen), randn(N, K + 3, gen=gen, dtype=torch.bfloat16), randn(N, gen=gen))
    x = xb[:, 4 : 4 + K]  # column slice: rows K + 9 apart
    w = wb[:, :K]  # weight rows with a row stride
    ob = torch.full((M, N + 5), 7.0, device=device)
    out = ob[:, 2 : 2 + N]
    y = ne.ops.linear(x, w, b, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert err(out.cpu(), x.cpu(), w.cpu(), want(x.cpu(), w.cpu(), b.cpu())) <= 1e-5
    assert (ob[:, :2] == 7).all() and (ob[:, 2 + N :] == 7).all()  # nothing written outside out
    # leading dimensions, and a layout that needs a copy (transposed x)
    x3 = randn(2, M, K, gen=gen).to(device)
    assert err(ne.ops.linear(x3, w, b).cpu(), x3.cpu(), w.cpu(), want(x3.cpu(), w.cpu(), b.cpu())) <= 1e-5
    xt = randn(K, M, gen=gen).t().to(device)
    assert err(ne.ops.linear(xt, w).cpu(), xt.cpu(), w.cpu(), want(xt.cpu(), w.cpu())) <= 1e-5


@pytest.mark.parametrize("M", [1, 4, 17])
def test_nan_propagation(M, device, gen):
    K, N = 100, 60
    x, w = randn(M, K, gen=gen), randn(N, K, gen=gen)
    x[M // 2, 7] = float("nan")
    w[5, 99] = float("nan")
    y = ne.ops.linear(*on(device, x, w)).cpu()
    rows = torch.arange(M) == M // 2
    cols = torch.arange(N) == 5
    assert torch.isnan(y[rows]).all() and torch.isnan(y[:, cols]).all()
    assert torch.isfinite(y[~rows][:, ~cols]).all()


def test_threads_agree(gen):
    """Bitwise identical results for 1, 2 and 3 threads (the N split and the M split)."""
    before = ne.num_threads()
    cases = [(1, 2304, 768), (3, 500, 333), (64, 7, 4097), (100, 800, 1030), (17, 50257 // 16, 64)]
    data = [(randn(M, K, gen=gen), randn(N, K, gen=gen, dtype=torch.bfloat16), randn(N, gen=gen)) for M, N, K in cases]
    try:
        results = []
        for t in (1, 2, 3):
            ne.set_num_threads(t)
            results.append([ne.ops.linear(x, w, b) for x, w, b in data])
        for r in results[1:]:
            for a, b in zip(results[0], r):
                assert torch.equal(a, b)
    finally:
        ne.set_num_threads(before)


# ----------------------------------------------------------------------------------- errors
def test_errors():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ne.ShapeError, match="in_features"):
        ne.ops.linear(x, torch.randn(6, 9))
    with pytest.raises(ne.ShapeError, match="weight"):
        ne.ops.linear(x, torch.randn(6, 8, 1))
    with pytest.raises(ne.ShapeError, match=r"bias.*\(6,\)"):
        ne.ops.linear(x, w, torch.randn(5))
    with pytest.raises(ne.DTypeError, match="weight"):
        ne.ops.linear(x, torch.ones(6, 8, dtype=torch.int8))
    with pytest.raises(ne.DTypeError, match="x"):
        ne.ops.linear(x.double(), w)
    with pytest.raises(ne.DTypeError, match="x"):
        ne.ops.linear(torch.ones(4, 8, dtype=torch.int32), w)
    with pytest.raises(ne.DeviceError, match="weight"):
        ne.ops.linear(x, torch.randn(6, 8, device="meta"))
    with pytest.raises(ne.DeviceError, match="bias"):
        ne.ops.linear(x, w, torch.randn(6, device="meta"))
    with pytest.raises(ne.DeviceError, match="x"):
        ne.ops.linear(torch.randn(4, 8, device="meta"), w)
    with pytest.raises(ne.ShapeError, match="out"):
        ne.ops.linear(x, w, out=torch.empty(4, 7))
    with pytest.raises(ne.DTypeError, match="out"):
        ne.ops.linear(x, w, out=torch.empty(4, 6, dtype=torch.float64))


def test_native_checks():
    """The C++ entry point validates on its own (what the Python wrapper normally catches first)."""
    x, w, y = torch.randn(4, 8), torch.randn(6, 8), torch.empty(4, 6)
    with pytest.raises(ne.ShapeError, match="x.*in_features"):
        _C.linear(x, torch.randn(6, 9), None, y)
    with pytest.raises(ne.DTypeError, match="weight"):
        _C.linear(x, torch.ones(6, 8, dtype=torch.int32), None, y)
    with pytest.raises(ne.ShapeError, match="bias"):
        _C.linear(x, w, torch.randn(7), y)
    with pytest.raises(ne.DTypeError, match="bias"):
        _C.linear(x, w, torch.randn(6, dtype=torch.float64), y)
    with pytest.raises(ne.ShapeError, match="out"):
        _C.linear(x, w, None, torch.empty(4, 5))
    with pytest.raises(ne.DTypeError, match="x"):
        _C.linear(x.double(), w, None, y)
    with pytest.raises(ne.ShapeError, match="weight"):
        _C.linear(x, torch.randn(8, 6).t(), None, y)  # not unit stride along in_features
    with pytest.raises(ne.ShapeError, match="out"):
        _C.gemm_f32(x, w, None, torch.empty(3, 6), True)


@pytest.mark.skipif(not (torch.cuda.is_available() and ne.cuda_available()), reason="no CUDA GPU visible")
@pytest.mark.parametrize("M", [3, 40])
def test_cuda_medium_bf16_weights(M, gen):
    """matmul_precision="medium" on CUDA: bfloat16 weights with more than 16 rows take the tensor cores
    (x rounded to bf16, fp32 sums: cuda::bf16_linear); fewer rows, the fp32 GEMV."""
    K, N = 200, 70
    x, w, b = randn(M, K, gen=gen), randn(N, K, gen=gen, dtype=torch.bfloat16), randn(N, gen=gen)
    y = ne.ops.linear(*on("cuda", x, w, b), matmul_precision="medium").cpu()
    ref_ = bf16_want(x, w, b) if M > 16 else want(x, w, b)
    assert err(y, x, w, ref_) <= 1e-5
    if M > 16:
        assert err(y, x, w, want(x, w, b)) > 1e-4  # x was rounded


# --------------------------------------- matmul precision "medium" (AMX-BF16, or AVX512-BF16 dot products)
def bf16_want(x, w, b=None, y0=None):
    """The "medium" contract: x and W rounded to bfloat16, products and sums exact (float64)."""
    return want(x.bfloat16(), w.bfloat16(), b, y0)


@pytest.mark.parametrize("wdtype", ["f32", "bf16", "f16"])
def test_medium_precision_bf16_products(wdtype, gen):
    """matmul_precision="medium" on 16+ rows: bf16-rounded operands, fp32 sums, when the CPU has
    AMX-BF16 or AVX512-BF16 (and the weight is f32 / bf16); elsewhere exactly the "highest" result."""
    amx = _C.bf16_products_available() and wdtype != "f16"
    for M, N, K in [(16, 32, 32), (17, 33, 40), (64, 257, 769), (100, 1, 3), (33, 50, 1), (16, 4097, 64), (3, 40, 64)]:
        x = randn(M, K, gen=gen)
        w = randn(N, K, gen=gen, dtype=WDTYPES[wdtype])
        b = randn(N, gen=gen)
        y = ne.ops.linear(x, w, b, matmul_precision="medium")
        if amx and M >= 16:
            assert err(y, x, w, bf16_want(x, w, b)) <= 1e-5, (M, N, K)
            assert err(y, x, w, want(x, w, b)) > 1e-5 or K == 1  # the rounding did happen
        else:
            assert torch.equal(y, ne.ops.linear(x, w, b)), (M, N, K)


def test_medium_precision_accumulate_strides_nan(gen):
    if not _C.bf16_products_available():
        pytest.skip("no bf16 products on this CPU (the medium path falls back to fp32: "
                    "test_medium_precision_bf16_products)")
    x = randn(40, 200, gen=gen)[:, 3:99]  # row stride 200
    w = randn(70, 130, gen=gen)[:, 10:106]  # row stride 130
    b = randn(70, gen=gen)
    y0 = randn(40, 80, gen=gen)
    out = y0.clone()[:, 5:75]
    _C.gemm_f32(x, w, b, out, True, True)
    assert err(out, x, w, bf16_want(x, w, b, y0[:, 5:75])) <= 1e-5
    x2 = x.clone()
    x2[7, 11] = float("nan")
    y = ne.ops.linear(x2, w, b, matmul_precision="medium")
    assert torch.isnan(y[7]).all() and torch.isfinite(y[torch.arange(40) != 7]).all()


def test_medium_precision_bad_argument():
    with pytest.raises(ne.errors.ArgumentError, match="matmul_precision"):
        ne.ops.linear(torch.randn(2, 3), torch.randn(4, 3), matmul_precision="low")
