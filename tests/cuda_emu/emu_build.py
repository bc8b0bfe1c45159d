"""Building the CUDA emulator harnesses (tests/cuda_emu/*_emu.cpp) for the tests: a .cu file rewritten
for the emulator, and one g++ invocation into a shared library loaded with ctypes."""

import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
CXX = shutil.which("g++")
# the emulator's shims first (cuda_runtime.h & co.), then the engine's headers
INCLUDES = [os.path.join(EMU, "shim"), EMU, os.path.join(ROOT, "cuda"), os.path.join(ROOT, "cpp", "include"),
            os.path.join(ROOT, "cpp")]
# IEEE arithmetic as written (no contraction into fma: nvcc's fusing is the tests' tolerance), warnings on
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall", "-Wextra",
         "-Wno-unknown-pragmas"]


def emu_source(path, device_paths=False):
    """A .cu file as the emulator compiles it (line numbers kept): launches `k<<<cfg>>>(args)` ->
    `k << ::ne_emu::launch_config(cfg)(args)`; `extern __shared__ [__align__(n)] T name[];` ->
    `T* name = ::ne_emu::dynamic_shared<T>();`; with device_paths, code that runs only under
    __CUDA_ARCH__ runs in the emulator too (its g++ build is the device build)."""
    with open(path) as f:
        src = f.read()
    out = re.sub(r"<<<(.*?)>>>", lambda m: " << ::ne_emu::launch_config(" + m.group(1) + ")", src, flags=re.S)
    out = re.sub(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;",
                 r"\1* \2 = ::ne_emu::dynamic_shared<\1>();", out)
    if device_paths:
        out = out.replace("defined(__CUDA_ARCH__)", "(defined(__CUDA_ARCH__) || defined(NE_CUDA_EMU))")
    return f'#line 1 "{path}"\n' + out


def quant_emu_source(path):
    """cuda/quant_gemm.cu as the emulator compiles it (line numbers kept): launches `k<<<cfg>>>(args)` ->
    `k << ::ne_emu::launch_config(cfg)(args)`; `extern __shared__ [__align__(n)] T name[];` ->
    `T* name = ::ne_emu::dynamic_shared<T>();`; plus ne::check_qweight, which the launcher calls, taken
    verbatim from cpp/ops/quant_gemm.cpp (the rest of that file is the CPU kernels)."""
    out = emu_source(path)
    cpp_path = os.path.join(ROOT, "cpp", "ops", "quant_gemm.cpp")
    with open(cpp_path) as f:
        cpp = f.read()
    m = re.search(r"^void check_qweight\(const QWeight& w\) \{.*?^\}$", cpp, flags=re.S | re.M)
    assert m, "check_qweight not found in cpp/ops/quant_gemm.cpp"
    line = cpp[:m.start()].count("\n") + 1
    return (out + f'\nnamespace ne {{\n#line {line} "{cpp_path}"\n' + m.group(0) +
            "\n}  // namespace ne\n")


def build(out_so, inputs, defines=(), extra=(), prefix=None):
    """g++ FLAGS + defines + INCLUDES + inputs (+ NE_EMU_CXXFLAGS from the environment, e.g.
    -DNE_EMU_UCONTEXT or -fsanitize=undefined) -> out_so, warning-free; returns the loaded library,
    with the harness's `{prefix}_error` / `{prefix}_launches` entry points typed (tests/cuda_emu/harness.h)."""
    cmd = [CXX] + FLAGS + list(defines) + [f"-I{i}" for i in INCLUDES] + list(inputs) + list(extra)
    cmd += ["-o", str(out_so)] + os.environ.get("NE_EMU_CXXFLAGS", "").split()
    r = subprocess.run(["nice", "-n", "19"] + cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    lib = ctypes.CDLL(str(out_so))
    if prefix:
        getattr(lib, prefix + "_error").restype = ctypes.c_char_p
        getattr(lib, prefix + "_launches").argtypes = [ctypes.c_char_p, ctypes.c_int]
    return lib


def launch_names(launches_fn):
    """The kernel names of the last call's launches, from a harness's *_launches entry point."""
    buf = ctypes.create_string_buffer(1 << 14)
    launches_fn(buf, len(buf))
    return [ln.split()[0] for ln in buf.value.decode().splitlines()]


def ptr(t):
    """A tensor's data pointer for ctypes (None for None)."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors of the emulator tests are small and the emulator runs on one core: torch's intra-op
    threads only contend with it (on a busy 2-core machine they make each small op ~20x slower).
    Imported by each emulator test module, where it applies to the whole module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
