#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build normengine with the CUDA kernels, run the test suite (the
# CUDA backend of every op test runs there) and the CUDA benchmarks against torch / transformers:
# norms, L-Mul, linear attention, quantized GEMMs, and generation with the CUDA runner (dense and
# quantized weights).
#
#   benchmarks/gpu_suite.sh            # logs to $OUT if set, else ./gpu_results
#   NE_GPU_BUILD=cmake benchmarks/gpu_suite.sh
#
# Build: `pip install --no-build-isolation -v .` with NORMENGINE_CUDA=ON when scikit-build-core and
# pybind11 are importable (no network needed), else plain CMake into build/gpu with the package staged
# in build/gpu/pkg (NE_GPU_BUILD=pip|cmake forces one). Exits non-zero at the first failing step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee -a "$OUT_DIR/gpu_suite.log") 2>&1
cd "$ROOT"
export NORMENGINE_CUDA=ON  # the build must have CUDA kernels; tests/test_build.py reads it too
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null || PY=python3

step() { echo; echo "==== $* ($(date -u +%Y-%m-%dT%H:%M:%SZ))"; }
trap 'rc=$?; echo; echo "gpu_suite: FAILED (exit $rc) during: ${CURRENT:-setup}; logs in $OUT_DIR"' ERR

CURRENT="machine"; step "$CURRENT"
nvidia-smi
command -v nvcc >/dev/null && nvcc --version || echo "nvcc not on PATH (CMake may still find it via CUDA_HOME / CUDACXX)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')"

CURRENT="build"; step "$CURRENT"
mode="${NE_GPU_BUILD:-auto}"
if [ "$mode" = auto ]; then
  if "$PY" -c "import scikit_build_core, pybind11" 2>/dev/null; then mode=pip; else mode=cmake; fi
fi
echo "build mode: $mode"
if [ "$mode" = pip ]; then
  "$PY" -m pip install --no-build-isolation -v . 2>&1 | tee "$OUT_DIR/build.log"
  RUN_DIR="$OUT_DIR/run"  # run from outside the repo so `import normengine` is the installed one
else
  BUILD="$ROOT/build/gpu"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  { cmake -S . -B "$BUILD" "${gen[@]}" -DNORMENGINE_CUDA="$NORMENGINE_CUDA" -DNORMENGINE_PYTHON=ON -DNORMENGINE_BENCHMARKS=ON \
          -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
    cmake --build "$BUILD" -j"$(nproc)"; } 2>&1 | tee "$OUT_DIR/build.log"
  rm -rf "$BUILD/pkg" && mkdir -p "$BUILD/pkg"
  cp -r python/normengine "$BUILD/pkg/"
  find "$BUILD/pkg/normengine" -maxdepth 1 -name '_C*.so' -delete  # a local link to a CPU build
  cp "$BUILD"/_C*.so "$BUILD/pkg/normengine/"
  export PYTHONPATH="$BUILD/pkg${PYTHONPATH:+:$PYTHONPATH}"
  RUN_DIR="$OUT_DIR/run"
fi
mkdir -p "$RUN_DIR"
(cd "$RUN_DIR" && "$PY" -c "
import normengine, sys
print('normengine from', normengine.__file__, '| cpu isa', normengine.cpu_isa(), '| cuda', normengine.cuda_available())
sys.exit(0 if normengine.cuda_available() else 'this normengine build has no usable CUDA kernels')")

CURRENT="tests"; step "$CURRENT"
(cd "$RUN_DIR" && "$PY" -m pytest "$ROOT/tests" -q -x -rs -p no:cacheprovider --rootdir "$ROOT") 2>&1 | tee "$OUT_DIR/pytest.log"

CURRENT="benchmark"; step "$CURRENT"
(cd "$RUN_DIR" && "$PY" "$ROOT/benchmarks/compare_norm_torch.py" --device cuda) 2>&1 | tee "$OUT_DIR/compare_norm_torch_cuda.md"
(cd "$RUN_DIR" && "$PY" "$ROOT/benchmarks/compare_lmul.py" --device cuda) 2>&1 | tee "$OUT_DIR/compare_lmul_cuda.md"
(cd "$RUN_DIR" && "$PY" "$ROOT/benchmarks/compare_attention_cuda.py") 2>&1 | tee "$OUT_DIR/compare_attention_cuda.md"
(cd "$RUN_DIR" && "$PY" "$ROOT/benchmarks/compare_quant_cuda.py") 2>&1 | tee "$OUT_DIR/compare_quant_cuda.md"
(cd "$RUN_DIR" && "$PY" "$ROOT/benchmarks/compare_runner_cuda.py") 2>&1 | tee "$OUT_DIR/compare_runner_cuda.md"

CURRENT="done"; step "gpu_suite: all steps passed; logs in $OUT_DIR"
