"""The build itself: CUDA compiled whenever nvcc was there, ISA detection, thread control."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import normengine as ne
from normengine import _C


def test_cuda_built_when_nvcc_present():
    """A machine with nvcc must produce CUDA kernels: a CUDA build failure never passes silently."""
    if os.environ.get("NORMENGINE_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("NORMENGINE_CUDA=OFF for this build")
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("no nvcc on this machine")
    assert _C.built_with_cuda(), "nvcc is installed but normengine was built without its CUDA kernels"


def test_cuda_availability_is_consistent():
    if not _C.built_with_cuda():
        assert not ne.cuda_available()
    if ne.cuda_available():
        assert torch.cuda.is_available()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_isa_detection_matches_cpu():
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}
    if avx512 | {"avx512_bf16"} <= flags:
        assert ne.cpu_isa() == "avx512bf16"
    elif avx512 <= flags:
        assert ne.cpu_isa() == "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        assert ne.cpu_isa() == "avx2"
    else:
        assert ne.cpu_isa() == "generic"


def test_isa_env_cap_in_fresh_process():
    code = "import normengine; print(normengine.cpu_isa())"
    env = dict(os.environ, NORMENGINE_ISA="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"


def test_force_isa_rejects_unknown_and_unsupported():
    with pytest.raises(ne.ArgumentError):
        _C.force_cpu_isa("sse9")
    if ne.cpu_isa() != "avx512bf16":
        with pytest.raises(ne.UnsupportedError):
            _C.force_cpu_isa("avx512bf16")


def test_set_num_threads():
    before = ne.num_threads()
    try:
        ne.set_num_threads(1)
        assert ne.num_threads() == 1
        ne.set_num_threads(3)
        assert ne.num_threads() == 3
        x = torch.randn(1000, 64)
        assert torch.allclose(ne.ops.rms_norm(x), ne.reference.rms_norm(x), atol=1e-5)
        ne.set_num_threads(0)
        assert ne.num_threads() >= 1
    finally:
        ne.set_num_threads(before)


def test_no_march_native_in_build():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        text = f.read()
    assert "-march=native" not in text.replace("No -march=native", "")
