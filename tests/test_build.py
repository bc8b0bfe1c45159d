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
    # and the Hopper wgmma GEMMs (cuda/quant_gemm_sm90*.cu, CUTLASS from third_party/), unless switched off
    if os.environ.get("NORMENGINE_SM90_GEMM", "ON").upper() != "OFF":
        assert _C.sm90_gemm_compiled(), "a CUDA build without the sm_90a wgmma GEMMs (NORMENGINE_SM90_GEMM)"


def test_cuda_availability_is_consistent():
    if not _C.built_with_cuda():
        assert not ne.cuda_available()
        assert not _C.sm90_gemm_compiled()
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


_TOGGLE_WHILE_RUNNING = r"""
import threading, time, torch, normengine as ne
m = ne.load()
ids = list(range(1, 120))
want = m.logits(ids)
x, w = torch.randn(512, 1000), torch.randn(1000)
ref = ne.ops.layer_norm(x, w)
stop, bad, done = False, [], [0, 0]
def model():
    while not stop:
        bad.extend(["logits"] if (m.logits(ids) - want).abs().max() > 1e-3 else [])
        done[0] += 1
def norm():
    while not stop:
        bad.extend([] if torch.allclose(ne.ops.layer_norm(x, w), ref, atol=1e-5) else ["norm"])
        done[1] += 1
ts = [threading.Thread(target=model), threading.Thread(target=norm)]
for t in ts: t.start()
t0, k = time.time(), 0
while time.time() - t0 < 3 or min(done) < 3:
    ne.set_num_threads(1 + k % 4); k += 1
    time.sleep(0.001)
stop = True
for t in ts: t.join()
print("OK", k, done, bad)
"""


def test_set_num_threads_while_other_threads_compute():
    """set_num_threads() from one thread while others run kernels (a model's forward, a norm): the
    pool a running job uses stays alive until the job ends. (Deleting it under the job deadlocked.)
    Run in a subprocess with a time limit, so that a regression fails instead of hanging the suite."""
    r = subprocess.run([sys.executable, "-c", _TOGGLE_WHILE_RUNNING], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("OK") and r.stdout.rstrip().endswith("[]"), r.stdout


def test_no_march_native_in_build():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        text = f.read()
    assert "-march=native" not in text.replace("No -march=native", "")
