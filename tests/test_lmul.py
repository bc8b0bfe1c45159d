"""L-Mul ops (normengine.ops.lmul): bit-exact products against the pure-torch definition, GEMM and
attention against float64 references of the same products, the paper's fidelity claims against fp8
multiplies, special values one by one, straight-through gradients, bad arguments."""

import importlib
import math

import pytest
import torch

import normengine
from normengine import _C
from normengine.errors import ArgumentError, DeviceError, DTypeError, ShapeError
L = importlib.import_module("normengine.ops.lmul")  # the module (normengine.ops.lmul is also the function)
from normengine.reference import lmul as R

BITS = [1, 2, 3, 4, 5, 7, 10, 23]
GPU = torch.cuda.is_available() and normengine.cuda_available()


def bits_of(t):
    return t.detach().to(torch.float32).cpu().contiguous().view(torch.int32)


def loguniform(n, g, lo=-2.0, hi=2.0):
    """sign * 2^U(lo, hi): every operand and product in the normal range of the fp8 formats."""
    mag = (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).exp2()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (mag * sign).float()


# ------------------------------------------------------------------------------------------ products
@pytest.mark.parametrize("bits", BITS)
def test_lmul_bit_exact(device, gen, bits):
    a = torch.randn(4099, generator=gen) * torch.rand(4099, generator=gen).mul(60).sub(30).exp2()
    b = torch.randn(4099, generator=gen) * torch.rand(4099, generator=gen).mul(60).sub(30).exp2()
    got = L.lmul(a.to(device), b.to(device), bits)
    assert torch.equal(bits_of(got), bits_of(R.lmul(a, b, bits)))


def test_lmul_matches_formula_without_carry(gen):
    # (1 + x_m + y_m + 2^-l) 2^(e_x + e_y) exactly when x_m + y_m + 2^-l < 1 (no mantissa carry)
    for bits in (2, 3, 4, 6):
        l = bits if bits <= 3 else (3 if bits == 4 else 4)
        a, b = loguniform(20000, gen), loguniform(20000, gen)
        ma, ea = torch.frexp(a.double().abs())  # |a| = ma 2^ea, ma in [0.5, 1)
        mb, eb = torch.frexp(b.double().abs())
        fa = torch.floor((2 * ma - 1) * 2**bits) / 2**bits  # truncated mantissa fractions
        fb = torch.floor((2 * mb - 1) * 2**bits) / 2**bits
        s = fa + fb + 2.0**-l
        want = (1 + s) * torch.pow(2.0, (ea - 1 + eb - 1).double()) * torch.sign(a.double() * b.double())
        got = L.lmul(a, b, bits).double()
        nc = s < 1
        assert nc.sum() > 1000 and (~nc).sum() > 100
        assert torch.equal(got[nc], want[nc])
        # with a carry (the bit-level behaviour): the field sum s spills floor(s) into the exponent,
        # 2^(e + floor(s)) (1 + s - floor(s)); s >= 2 happens for l < m
        c = torch.floor(s)
        want_c = (1 + s - c) * torch.pow(2.0, ea - 2 + eb + c) * torch.sign(a.double() * b.double())
        assert torch.equal(got[~nc], want_c[~nc])


def test_lmul_broadcast_dtypes_noncontiguous(device, gen):
    a = torch.randn(3, 1, 5, generator=gen)
    b = torch.randn(7, 4, 5, generator=gen)[:, ::2].transpose(0, 1)  # [2, 7, 5], non-contiguous
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        ad, bd = a.to(dt).to(device), b[:1].to(dt).to(device)
        got = L.lmul(ad, bd)
        assert got.dtype == dt and got.shape == (3, 7, 5)
        want = R.lmul(ad.cpu().float(), bd.cpu().float(), 4).to(dt)
        assert torch.equal(got.cpu(), want)
    got = L.lmul(a.to(device), b.to(device)[:1])
    assert torch.equal(bits_of(got), bits_of(R.lmul(a, b[:1], 4)))
    assert L.lmul(torch.ones(1, device=device), torch.ones(1, device=device)).item() == 1.0 + 2**-3


SPECIAL = [
    # (a, b, expected) with 4 mantissa bits
    (0.0, 3.0, 0.0), (-0.0, 3.0, -0.0), (0.0, -3.0, -0.0), (1e-40, 3.0, 0.0), (-1e-40, 3.0, -0.0),
    (float("inf"), 2.0, float("inf")), (float("inf"), -2.0, float("-inf")), (float("-inf"), float("-inf"), float("inf")),
    (float("inf"), 0.0, float("nan")), (0.0, float("-inf"), float("nan")), (float("inf"), 1e-40, float("nan")),
    (float("nan"), 1.0, float("nan")), (1.0, float("nan"), float("nan")), (float("nan"), 0.0, float("nan")),
    (1e30, 1e30, float("inf")), (-1e30, 1e30, float("-inf")), (1e-30, 1e-30, 0.0), (-1e-30, 1e-30, -0.0),
    (3e38, 3e38, float("inf")), (1.0, 1.0, 1.125), (-1.5, 2.0, -(1 + 0.5 + 2**-3) * 2),
]


@pytest.mark.parametrize("a,b,want", SPECIAL, ids=[f"{a}*{b}" for a, b, _ in SPECIAL])
def test_special_values(device, a, b, want):
    x = torch.full((9,), a, device=device)  # 9: a vector and a scalar tail
    y = torch.full((9,), b, device=device)
    got = L.lmul(x, y).cpu()
    ref = R.lmul(x.cpu(), y.cpu(), 4)
    assert torch.equal(bits_of(got), bits_of(ref))
    if math.isnan(want):
        assert torch.isnan(got).all()
        assert (bits_of(got) == 0x7FC00000).all()  # canonical NaN
    else:
        negative = math.copysign(1.0, want) < 0
        assert (got == want).all() and (torch.signbit(got) == negative).all()


def test_nan_payload_survives_truncation(device):
    # NaN with a low payload bit only: truncating its mantissa must not turn it into Inf
    nan = torch.tensor([0x7F800001, 0xFF800001 - 2**32], dtype=torch.int32).view(torch.float32)
    for bits in (1, 4):
        got = L.lmul(nan.to(device), torch.full((2,), 2.0, device=device), bits)
        assert torch.isnan(got).all()


def test_exponent_edges(gen):
    # products straddling the underflow / overflow thresholds: exact against the definition
    e = torch.randint(-130, 130, (20000,), generator=gen).double()
    a = (torch.rand(20000, generator=gen, dtype=torch.float64) + 1) * torch.pow(2.0, e)
    b = (torch.rand(20000, generator=gen, dtype=torch.float64) + 1) * torch.pow(2.0, -e + torch.randint(-3, 4, (20000,), generator=gen) * 63)
    a, b = a.float(), b.float()
    got = L.lmul(a, b)
    assert torch.equal(bits_of(got), bits_of(R.lmul(a, b, 4)))
    assert torch.isinf(got).any() and (got == 0).any()


@pytest.mark.skipif(not GPU, reason="no CUDA GPU visible")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 23])
def test_cuda_matches_cpu_bitwise(gen, bits):
    a = torch.randn(100003, generator=gen) * torch.rand(100003, generator=gen).mul(300).sub(150).exp2()
    b = torch.randn(100003, generator=gen)
    a[::97] = float("inf")
    b[::89] = 0.0
    a[::101] = float("nan")
    cpu = L.lmul(a, b, bits)
    gpu = L.lmul(a.cuda(), b.cuda(), bits).cpu()
    assert torch.equal(bits_of(cpu), bits_of(gpu))
    # the GEMM too: same products, same k order
    x, w = torch.randn(67, 131, generator=gen), torch.randn(131, 45, generator=gen)
    assert torch.equal(bits_of(L.lmul_matmul(x, w, bits)), bits_of(L.lmul_matmul(x.cuda(), w.cuda(), bits)))


# ------------------------------------------------------------------------------------------ fidelity
def _fp8_mult(a, b, fmt):
    return (a.to(fmt).double() * b.to(fmt).double()).to(fmt).double()


@pytest.mark.parametrize("bits,fmt", [(4, torch.float8_e4m3fn), (3, torch.float8_e5m2)])
def test_fidelity_vs_fp8(gen, bits, fmt):
    # Luo & Sun: 4-bit-mantissa L-Mul as precise as an e4m3 multiply, 3-bit better than e5m2
    a, b = loguniform(200000, gen), loguniform(200000, gen)
    exact = a.double() * b.double()
    err_l = ((L.lmul(a, b, bits).double() - exact).abs() / exact.abs()).mean()
    err_8 = ((_fp8_mult(a, b, fmt) - exact).abs() / exact.abs()).mean()
    assert err_l <= err_8, (err_l.item(), err_8.item())
    # the same on Gaussian operands
    a, b = torch.randn(200000, generator=gen), torch.randn(200000, generator=gen)
    a, b = a[(a * b).abs() > 2**-6], b[(a * b).abs() > 2**-6]  # products in fp8's normal range
    exact = a.double() * b.double()
    err_l = ((L.lmul(a, b, bits).double() - exact).abs() / exact.abs()).mean()
    err_8 = ((_fp8_mult(a, b, fmt) - exact).abs() / exact.abs()).mean()
    assert err_l <= err_8, (err_l.item(), err_8.item())


# ------------------------------------------------------------------------------------------ matmul
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 3), (37, 300, 45), (4, 1031, 33), (130, 64, 70)])
def test_matmul_vs_reference(device, gen, shape):
    M, K, N = shape
    a, b = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
    got = L.lmul_matmul(a.to(device), b.to(device)).cpu()
    want = R.lmul_matmul(a, b)
    # only the accumulation differs (fp32 in k order vs fp64): a few ulps of the sum of |products|
    bound = 4 * K * 2.0**-24 * R.lmul(a.unsqueeze(-1), b).abs().double().sum(-2) + 1e-30
    assert ((got.double() - want).abs() <= bound).all()
    # and it is not the exact product
    if K > 3:
        assert (got - a @ b).abs().max() > 1e-4


def _layout(b, layout):
    """b [K, N] as stored: "kn" row-major (read in place, LmulArgs::w_kn on the CPU), "nk" the transpose of a
    row-major [N, K] (torch.nn.Linear's weight.t(): the [N, K] kernels)."""
    return b if layout == "kn" else b.t().contiguous().t()


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 300, 37), (9, 61, 70), (1, 300, 70), (1, 517, 64)])
def test_matmul_bitwise_k_order(device, gen, M, K, N, layout):
    # every output is the float32 sum of its L-Mul products in k order, bit for bit, on every path:
    # all-normal tiles (fast), rows with zeros / -0 / subnormals (fast, zero products skipped), rows with
    # Inf (checked), and exponents far apart (checked)
    a = torch.randn(M, K, generator=gen)
    b = torch.randn(K, N, generator=gen)
    a = torch.where(torch.rand(M, K, generator=gen) < 0.3, torch.zeros(()), a)
    if M > 2 and K > 3:
        a[1, :3] = torch.tensor([-0.0, 1e-40, -1e-41])
        a[2, 1] = float("inf")
        b[:, 0] *= 1e30
    want = torch.zeros(M, N)
    p = R.lmul(a.unsqueeze(-1), b, 4)  # [M, K, N]
    for k in range(K):
        want = want + p[:, k, :]
    got = L.lmul_matmul(a.to(device), _layout(b.to(device), layout)).cpu()
    assert torch.equal(bits_of(got), bits_of(want))


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("case", ["normal", "x_zeros", "w_zero", "w_inf", "w_nan", "w_huge", "w_tiny", "x_inf"])
def test_matvec_blocks_bitwise(device, gen, case, layout):
    # one row of x (the GEMV path: W read and transposed in registers, no packed copy): every output the
    # float32 sum of its products in k order, bit for bit, whether a K block of a panel keeps the fast
    # products or has to be done again with the checked ones (a zero / Inf / NaN w, exponents near the
    # ends) - here in the second K block (k >= 256) of the second panel only, the others staying fast
    K, N = 600, 80
    a = torch.randn(1, K, generator=gen)
    b = torch.randn(K, N, generator=gen)
    j = 40  # a column of the second panel on every ISA (panels of 16 or 32 columns)
    if case == "x_zeros":
        a[0, ::7] = 0.0
        a[0, 3] = -0.0
        a[0, 5] = 1e-40
    elif case == "w_zero":
        b[300, j] = 0.0
    elif case == "w_inf":
        b[301, j] = float("inf")
    elif case == "w_nan":
        b[302, j] = float("nan")
    elif case == "w_huge":
        b[260:270, j] *= 2.0 ** 120
    elif case == "w_tiny":
        b[260:270, j] *= 2.0 ** -120
    elif case == "x_inf":
        a[0, 10] = float("inf")
    want = torch.zeros(1, N)
    p = R.lmul(a.unsqueeze(-1), b, 4)
    for k in range(K):
        want = want + p[:, k, :]
    got = L.lmul_matmul(a.to(device), _layout(b.to(device), layout)).cpu()
    assert torch.equal(bits_of(got), bits_of(want)), (got - want).abs().nan_to_num().max()


@pytest.mark.parametrize("M,K,N", [(1, 4096, 256), (3, 70, 33), (17, 257, 96), (130, 64, 70)])
def test_matmul_layouts_same_bits(gen, M, K, N):
    # the right operand read in place as [K, N] (CPU) gives the bits of the [N, K] kernels, on the GEMV
    # and the GEMM paths, odd sizes, and a strided b (copied, then read as [K, N])
    a, b = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
    want = L.lmul_matmul(a, _layout(b, "nk"))
    assert torch.equal(bits_of(L.lmul_matmul(a, b)), bits_of(want))
    wide = torch.randn(K, 2 * N, generator=gen)
    assert torch.equal(bits_of(L.lmul_matmul(a, wide[:, ::2])), bits_of(L.lmul_matmul(a, wide[:, ::2].contiguous())))
    y = torch.empty(1, M, N)
    with pytest.raises(ShapeError, match=r"b: expected \[1, %d, N\]" % K):
        _C.lmul_bmm(a[None], b[None, 1:], y, 4, 0, True)


def test_matmul_batched_noncontiguous_specials(device, gen):
    a = torch.randn(2, 3, 9, 33, generator=gen)[:, :, ::2]  # [2, 3, 5, 33] non-contiguous
    b = torch.randn(45, 33, generator=gen).t()               # [33, 45] non-contiguous
    a[0, 1, 2, 3] = 0.0
    a[1, 0, 0, 7] = float("inf")
    b[5, 4] = float("nan")
    got = L.lmul_matmul(a.to(device), b.to(device)).cpu()
    assert got.shape == (2, 3, 5, 45)
    want = R.lmul_matmul(a, b)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert (~fin).any()
    assert rel_close(got[fin], want[fin], 33)


def rel_close(got, want, K):
    return ((got.double() - want).abs() <= 8 * K * 2.0**-24 * (want.abs() + 1)).all()


def test_matmul_degenerate_shapes(device):
    z = L.lmul_matmul(torch.randn(3, 0, device=device), torch.randn(0, 4, device=device))
    assert z.shape == (3, 4) and (z == 0).all()
    assert L.lmul_matmul(torch.randn(0, 5, device=device), torch.randn(5, 2, device=device)).shape == (0, 2)
    v = torch.randn(5)
    w = torch.randn(5, 2)
    got = L.lmul_matmul(v.to(device), w.to(device)).cpu()
    assert got.shape == (2,) and ((got.double() - R.lmul_matmul(v, w)).abs() < 1e-5).all()


def test_matmul_dtypes_and_threads(gen):
    a, b = torch.randn(20, 70, generator=gen), torch.randn(70, 150, generator=gen)
    for dt in (torch.bfloat16, torch.float16):
        got = L.lmul_matmul(a.to(dt), b.to(dt))
        assert got.dtype == dt
        want = R.lmul_matmul(a.to(dt).float(), b.to(dt).float())
        # rounding to the 16-bit output dominates: half an ulp of the output format
        assert ((got.double() - want).abs() <= (2.0**-8 if dt == torch.bfloat16 else 2.0**-11) * want.abs() + 1e-3).all()
    n = _C.num_threads()
    try:
        _C.set_num_threads(1)
        one = L.lmul_matmul(a, b)
        _C.set_num_threads(max(2, n))
        many = L.lmul_matmul(a, b)
    finally:
        _C.set_num_threads(n)
    assert torch.equal(bits_of(one), bits_of(many))


def test_matmul_isas_agree_bitwise(gen):
    # every output is a k-ordered sum of the same products: generic and SIMD builds give the same bits
    a, b = torch.randn(9, 517, generator=gen), torch.randn(517, 77, generator=gen)
    a[2, :5] = 0.0
    best = _C.cpu_isa()
    outs = []
    try:
        for isa in ("generic", best):
            _C.force_cpu_isa(isa)
            outs.append(L.lmul_matmul(a, b))
    finally:
        _C.force_cpu_isa(best)
    assert torch.equal(bits_of(outs[0]), bits_of(outs[1]))


# ------------------------------------------------------------------------------------------ attention
def attention_tol(q, k, v, causal=True, scale=None, bits=4, rel=1e-5):
    """Per output element [B, T, H, Dv], how far the kernels may be from R.lmul_attention: 1e-4, plus, for
    each probability p within `rel` (relative) of a truncation boundary of its `bits`-bit mantissa, up to
    2^-(bits-1) |p| |v|. The kernels' p (a float32 softmax of float32 sums) and the reference's (float64)
    differ by ulps, so such a p can truncate to the neighbouring value before its L-Mul with v: about one
    draw in 1500 of the shapes below has one (seen: errors of 2e-3 to 3e-2 where the rest agree to 1e-6)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    qk = R.lmul(q.permute(0, 2, 1, 3).unsqueeze(-2), k.permute(0, 2, 1, 3).unsqueeze(-3), bits)
    s = qk.double().sum(-1) * scale
    if causal:
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    p = torch.softmax(s, dim=-1)  # [B, H, T, S]
    _, e = torch.frexp(p)  # p = f 2^e, f in [0.5, 1): truncation boundaries every 2^(e - 1 - bits)
    step = torch.ldexp(torch.ones_like(p), e - 1 - bits)
    r = torch.remainder(p, step)
    near = (torch.minimum(r, step - r) <= rel * p) & (p < 1)  # p = 1 (a single key) is exact in both
    return 1e-4 + torch.einsum("bhts,bshd->bthd", near * p, v.double().abs()) * 2.0 ** (1 - bits)


def test_attention_tol_is_tight_unless_a_boundary_is_near():
    # the widening is local: a planted p on a boundary widens its own row only
    q = torch.zeros(1, 2, 1, 4)
    k = torch.zeros(1, 2, 1, 4)
    v = torch.ones(1, 2, 1, 4)
    tol = attention_tol(q, k, v, causal=True)  # row 0: p = [1, 0]; row 1: p = [0.5, 0.5], on a boundary
    assert torch.all(tol[0, 0] == 1e-4)
    assert torch.allclose(tol[0, 1], torch.full((1, 4), 1e-4 + 0.125, dtype=torch.float64))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_vs_reference(device, gen, causal):
    B, T, S, H, D = 2, 7, 7 if causal else 11, 3, 33
    q, k, v = (torch.randn(B, n, H, D, generator=gen) for n in (T, S, S))
    got = L.lmul_attention(q.to(device), k.to(device), v.to(device), causal=causal).cpu()
    want = R.lmul_attention(q, k, v, causal=causal)
    assert ((got.double() - want).abs() <= attention_tol(q, k, v, causal)).all()
    exact = L._attention_exact(q.double(), k.double(), v.double(), causal, D**-0.5)
    diff = (got.double() - exact).abs()
    assert diff.mean() < 0.06 and diff.max() > 1e-4  # close to exact attention on average, but not equal


def test_attention_scale_and_dtype(gen):
    q, k, v = (torch.randn(1, 5, 2, 8, generator=gen) for _ in range(3))
    got = L.lmul_attention(q, k, v, scale=0.3)
    assert ((got.double() - R.lmul_attention(q, k, v, scale=0.3)).abs() <= attention_tol(q, k, v, scale=0.3)).all()
    got16 = L.lmul_attention(q.half(), k.half(), v.half())
    assert got16.dtype == torch.float16


def test_cache_attention_entry_point(gen):
    # ne::lmul_cache_attention (the runner's raw entry): GQA, positions, L-Mul q.k and p.v products
    S, T, H, Hkv, D = 13, 5, 4, 2, 24
    q = torch.randn(T, H * D, generator=gen)
    k, v = torch.randn(S, Hkv * D, generator=gen), torch.randn(S, Hkv * D, generator=gen)
    pos = torch.tensor([0, 3, 7, 11, 12], dtype=torch.int32)
    out = torch.empty_like(q)
    _C.lmul_cache_attention(q, k, v, pos, out, H, Hkv, D**-0.5, 4)
    for t in range(T):
        for h in range(H):
            g = h // (H // Hkv)
            kk = k[: pos[t] + 1, g * D:(g + 1) * D]
            vv = v[: pos[t] + 1, g * D:(g + 1) * D]
            args = (q[t, h * D:(h + 1) * D].view(1, 1, 1, D), kk.view(1, -1, 1, D), vv.view(1, -1, 1, D))
            want = R.lmul_attention(*args, causal=False)
            tol = attention_tol(*args, causal=False).flatten()
            assert ((out[t, h * D:(h + 1) * D].double() - want.flatten()).abs() <= tol).all()
    with pytest.raises(ArgumentError, match="pos"):
        _C.lmul_cache_attention(q, k, v, pos + 5, out, H, Hkv, D**-0.5, 4)


@pytest.mark.parametrize("D", [24, 64])
def test_cache_attention_isas_agree_bitwise(gen, D):
    # the runner's L-Mul attention scores L keys at a time (L = 16 or 8: rows transposed, every lane
    # summing its products in d order) and the last few keys one at a time: every build gives the same
    # bits, zeros, subnormals and a huge key included
    S, H, Hkv = 70, 4, 2
    q = torch.randn(3, H * D, generator=gen)
    k, v = torch.randn(S, Hkv * D, generator=gen), torch.randn(S, Hkv * D, generator=gen)
    k[5, 3], k[17, 0], k[40, 1] = 0.0, 1e-41, 3e38
    pos = torch.tensor([16, 47, 69], dtype=torch.int32)
    best = _C.cpu_isa()
    outs = []
    try:
        for isa in ("generic", "avx2", best):
            _C.force_cpu_isa(isa)
            out = torch.empty_like(q)
            _C.lmul_cache_attention(q, k, v, pos, out, H, Hkv, D**-0.5, 4)
            outs.append(out)
    finally:
        _C.force_cpu_isa(best)
    for o in outs[1:]:
        assert torch.equal(bits_of(o), bits_of(outs[0]))


@pytest.mark.parametrize("D", [24, 64])
def test_cache_attention_blocks_equal_one_query_at_a_time(gen, cpu_isa, D):
    # the entry runs up to 32 consecutive queries of one cache as two L-Mul GEMMs (keys past a row's
    # position computed and masked); one query alone is a one-row GEMM; a block whose masked keys hold
    # an Inf in V falls back to the query-by-query definition (dots + axpy). All three give the same
    # bits, on every ISA, with zeros, subnormals and a huge value in the cache.
    S, T, H, Hkv = 80, 70, 4, 2
    q = torch.randn(T, H * D, generator=gen)
    k, v = torch.randn(S, Hkv * D, generator=gen), torch.randn(S, Hkv * D, generator=gen)
    k[5, 3], k[17, 0], k[40, 1], v[9, 2], v[30, 5], v[50, 0] = 0.0, 1e-41, 1e30, 0.0, 1e-40, -2e37
    q[3, 1] = 0.0
    pos = torch.arange(7, 7 + T, dtype=torch.int32)

    def run(vv, qq=q, pp=pos):
        out = torch.full_like(qq, float("nan"))
        _C.lmul_cache_attention(qq, k, vv, pp, out, H, Hkv, D**-0.5, 4)
        return out

    out = run(v)
    assert torch.isfinite(out).all()
    for t in (0, 1, 31, 32, 33, 63, 64, T - 1):  # a block's first / last rows, each block
        assert torch.equal(bits_of(run(v, q[t:t + 1], pos[t:t + 1])), bits_of(out[t:t + 1])), t
    # an Inf at the last key: rows that cannot see it (every row but the last) keep their bits, the
    # last block's through the fallback
    v_inf = v.clone()
    v_inf[pos[-1], D + 1] = float("inf")  # kv head 1 (query heads 2, 3)
    out_inf = run(v_inf)
    assert torch.equal(bits_of(out_inf[:-1]), bits_of(out[:-1]))
    assert torch.equal(bits_of(out_inf[-1, : 2 * D]), bits_of(out[-1, : 2 * D]))
    assert not torch.isfinite(out_inf[-1, 2 * D:]).all()


# ------------------------------------------------------------------------------------------ gradients
def test_lmul_straight_through_grad(gen):
    a = torch.randn(4, 1, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(4, 5, 6, dtype=torch.float64, generator=gen)
    ga, gb = torch.autograd.grad(L.lmul(a, b), (a, b), g)
    ea, eb = torch.autograd.grad(a * b, (a, b), g)
    assert torch.allclose(ga, ea, rtol=1e-12, atol=0) and torch.allclose(gb, eb, rtol=1e-12, atol=0)

    class Exact(torch.autograd.Function):  # exact forward + the op's backward: gradcheck'able
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(x, y)
            return x * y

        @staticmethod
        def backward(ctx, gr):
            return L._lmul_grads(*ctx.saved_tensors, gr)

    assert torch.autograd.gradcheck(Exact.apply, (a, b))


def test_matmul_straight_through_grad(gen):
    a = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    out = L.lmul_matmul(a, b)
    assert out.dtype == torch.float64
    ga, gb = torch.autograd.grad(out, (a, b), g)
    ea, eb = torch.autograd.grad(a @ b, (a, b), g)
    assert torch.allclose(ga, ea, rtol=1e-12) and torch.allclose(gb, eb, rtol=1e-12)

    class Exact(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(x, y)
            return x @ y

        @staticmethod
        def backward(ctx, gr):
            return L._matmul_grads(*ctx.saved_tensors, gr)

    assert torch.autograd.gradcheck(Exact.apply, (a, b))


def test_attention_straight_through_grad(gen):
    q, k, v = (torch.randn(1, 4, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 4, 2, 5, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(L.lmul_attention(q, k, v), (q, k, v), g)
    want = torch.autograd.grad(L._attention_exact(q, k, v, True, 5**-0.5), (q, k, v), g)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda *t: L._attention_exact(*t, True, 5**-0.5), (q, k, v))


# ------------------------------------------------------------------------------------------ errors
def test_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ArgumentError, match="mantissa_bits"):
        L.lmul(x, x, 0)
    with pytest.raises(ArgumentError, match="mantissa_bits"):
        L.lmul_matmul(x, x.t(), 24)
    with pytest.raises(DTypeError, match="a:"):
        L.lmul(x.int(), x)
    with pytest.raises(DTypeError, match="b:"):
        L.lmul(x, [1.0])
    with pytest.raises(ShapeError, match="b:"):
        L.lmul(x, torch.randn(5))
    with pytest.raises(ShapeError, match="b:"):
        L.lmul_matmul(x, torch.randn(5, 2))
    with pytest.raises(ShapeError, match="b:"):
        L.lmul_matmul(x, torch.randn(2, 4, 2))
    with pytest.raises(ShapeError, match="q:"):
        L.lmul_attention(x, x, x)
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ShapeError, match="k:"):
        L.lmul_attention(q, torch.randn(1, 3, 2, 5), q)
    with pytest.raises(ShapeError, match="v:"):
        L.lmul_attention(q, q, torch.randn(1, 4, 2, 4))
    with pytest.raises(DTypeError, match="k, v"):
        L.lmul_attention(q, q.half(), q)
    with pytest.raises(ArgumentError, match="scale"):
        L.lmul_attention(q, q, q, scale=float("nan"))
    # the raw bindings check too
    with pytest.raises(ShapeError, match="b:"):
        _C.lmul_bmm(torch.randn(1, 2, 3), torch.randn(1, 2, 4), torch.empty(1, 2, 2), 4)
    with pytest.raises(DTypeError, match="out"):
        _C.lmul_elementwise(x, x, torch.empty(3, 4, dtype=torch.float64), 4)
    if not torch.cuda.is_available():
        return
    with pytest.raises(DeviceError, match="b"):
        L.lmul(x, x.cuda())


def test_multiply_energy():
    e = L.multiply_energy(10**6, 4)
    assert e["baseline_pj_per_mult"] == 3.7 and e["lmul_pj_per_mult"] == 0.05  # 12-bit adder: int16 figure
    assert e["baseline_joules"] == pytest.approx(3.7e-6) and e["lmul_joules"] == pytest.approx(5e-8)
    assert "Horowitz" in e["source"] and "ISSCC 2014" in e["source"]
    assert L.multiply_energy(10, 3, "fp8")["lmul_op"] == "int8_add"
    assert L.multiply_energy(10, 23)["lmul_op"] == "int32_add"
    with pytest.raises(ArgumentError, match="baseline"):
        L.multiply_energy(10, 4, "fp64")
    with pytest.raises(ArgumentError, match="n_mults"):
        L.multiply_energy(-1, 4)


def test_cuda_product_definition_matches_cpu(tmp_path, gen):
    """The GPU's products come from cpp/ops/lmul_bits.h compiled by nvcc (cuda/lmul.cu); built here as
    host code by nvcc they must equal the CPU kernels bit for bit on random bit patterns (every
    exponent, NaN payloads, Inf, zeros, subnormals, signs) and every mantissa width. Skips without nvcc."""
    import ctypes
    import os
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lib = tmp_path / "liblmulbits.so"
    r = subprocess.run([nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", os.path.join(root, "cpp"),
                        os.path.join(root, "tests", "lmul_bits_host.cu"), "-o", str(lib)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    so = ctypes.CDLL(str(lib))
    so.lmul_bits_host.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    n = 1 << 16
    a = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    b = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0, 0x80000000, 1, 0x007fffff, 0x00800000, 0x7f7fffff, 0x7f800000, 0xff800000, 0x7fc00000,
                            0x7f800001, 0xffffffff, 0x3f800000, 0xbf800000, 0x1f800000, 0x5f800000],
                           dtype=torch.int64).to(torch.int32)
    a[: special.numel() ** 2] = special.repeat_interleave(special.numel())
    b[: special.numel() ** 2] = special.repeat(special.numel())
    for m in range(1, 24):
        out = torch.empty(n, dtype=torch.int32)
        assert so.lmul_bits_host(n, a.data_ptr(), b.data_ptr(), out.data_ptr(), m) == 0
        cpu = normengine.ops.lmul(a.view(torch.float32), b.view(torch.float32), mantissa_bits=m).view(torch.int32)
        assert torch.equal(out, cpu), m
