"""The Hopper wgmma GEMMs' dispatch rule against CUTLASS, without a GPU: tests/sm90_host.cu, built by nvcc for
the host, builds the very arguments cuda/quant_gemm_sm90*.cu launch with and asks CUTLASS's can_implement.
Every problem the dispatcher takes (sm90_tma_fits) must be implementable, or a GPU run would stop with
CUTLASS's "misaligned operand" error instead of falling back to the mma.sync kernel. Skips without nvcc."""

import ctypes
import itertools
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    lib = tmp_path_factory.mktemp("sm90") / "sm90_host.so"
    inc = [os.path.join(ROOT, d) for d in ("third_party/cutlass/include", "cpp", "cpp/include", "cuda")]
    cmd = [NVCC, "-std=c++17", "-O1", "-DNDEBUG", "--expt-relaxed-constexpr", "-shared", "-Xcompiler", "-fPIC",
           *[f"-I{d}" for d in inc], os.path.join(ROOT, "tests", "sm90_host.cu"), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    so = ctypes.CDLL(str(lib))
    so.sm90_check.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 7
    so.sm90_check.restype = ctypes.c_int
    return so


def test_every_accepted_problem_is_implementable(host):
    taken = declined = 0
    bad = []
    for fp8, acc in itertools.product((0, 1), (0, 1)):
        for M, N, K in itertools.product((1, 3, 9, 17, 127, 128, 200, 1000, 2049), (4, 128, 257, 260, 4100),
                                         (16, 96, 128, 144, 1000, 1040, 4096)):
            lda = (K + 127) // 128 * 128  # quant_linear's activation scratch rows
            for ldy, wg in itertools.product((N, N + 4, N + 1), (0, 128) if fp8 else (0,)):
                r = host.sm90_check(fp8, acc, M, N, K, lda, K, ldy, wg)
                taken += r & 1
                declined += not r & 1
                if r == 1:
                    bad.append(dict(fp8=fp8, accumulate=acc, M=M, N=N, K=K, ldy=ldy, group=wg))
    assert not bad, f"{len(bad)} problems taken but not implementable, e.g. {bad[:3]}"
    assert taken > 1000 and declined > 1000  # the sweep covers both sides of the rule


def test_rule_declines_what_cutlass_rejects(host):
    """The cases the rule exists for: CUTLASS rejects them too (the rule is not stricter for nothing)."""
    for fp8 in (0, 1):
        assert host.sm90_check(fp8, 0, 64, 257, 256, 256, 256, 257, 0) == 0   # N % 4: y's rows
        assert host.sm90_check(fp8, 0, 64, 256, 100, 128, 100, 256, 0) == 0   # K % 16: W's rows
        assert host.sm90_check(fp8, 1, 64, 256, 256, 256, 256, 256, 0) == 3   # accepted, both
    assert host.sm90_check(1, 0, 64, 256, 256, 256, 256, 256, 64) & 1 == 0    # fp8 groups are 0 or 128
