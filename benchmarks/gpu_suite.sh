#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build normengine with the CUDA kernels, run the test suite (the
# CUDA backend of every op test runs there) and the CUDA benchmarks against torch / transformers:
# norms, L-Mul, linear attention, quantized GEMMs, and generation with the CUDA runner (dense and
# quantized weights).
#
#   benchmarks/gpu_suite.sh            # logs to $OUT if set, else ./gpu_results
#   NE_GPU_BUILD=cmake benchmarks/gpu_suite.sh
#   NE_GPU_TESTS=all NE_GPU_BENCH=runner,quant benchmarks/gpu_suite.sh
#
# Build: `pip install --no-build-isolation -v .` with NORMENGINE_CUDA=ON when scikit-build-core and
# pybind11 are importable (no network needed), else plain CMake into build/gpu with the package staged
# in build/gpu/pkg (NE_GPU_BUILD=pip|cmake forces one). NE_GPU_BUILD=prebuilt stages the _C*.so found in
# build/gpu-prebuilt (benchmarks/gpu_prebuild.sh, on a machine with nvcc; carried to a lent GPU machine to
# save its minutes) when it was built from these very sources, and falls back to building when it was not,
# or does not import there, or has no usable CUDA.
#
# Before the tests, benchmarks/sass_summary.py records the kernels' machine-instruction mix (sass_summary.md).
# Tests: NE_GPU_TESTS=gpu (default) runs the tests whose names say cuda (every op's CUDA backend, the
# CUDA runner, the GPU-only tests) except the emulator ones, which CI runs without a GPU; all: the whole
# suite; none. Benchmarks: NE_GPU_BENCH, a comma list of norm, lmul, attention, quant, runner, forms, loss
# (linear_cross_entropy, the gated activations and rotary embedding against torch / transformers) (default all). Each step runs under a time limit (NE_GPU_STEP_TIMEOUT seconds, default 420) and a failing step
# does not stop the later ones: the summary at the end lists the failures and the exit status is
# non-zero if there was any. A build failure stops the suite.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The hash of what the extension module is built from (C++ / CUDA sources, build files): a prebuilt
# module (benchmarks/gpu_prebuild.sh) runs only on a tree with the same hash.
sources_hash() {
  (cd "$ROOT" && find cpp cuda third_party CMakeLists.txt pyproject.toml -type f | LC_ALL=C sort |
     while read -r f; do printf '%s\n' "$f"; cat "$f"; done | sha256sum | cut -d' ' -f1)
}
if [ "${1:-}" = "--sources-hash" ]; then sources_hash; exit 0; fi
OUT_DIR="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
exec > >(tee -a "$OUT_DIR/gpu_suite.log") 2>&1
cd "$ROOT"
export NORMENGINE_CUDA=ON  # the build must have CUDA kernels; tests/test_build.py reads it too
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null || PY=python3

step() { echo; echo "==== $* ($(date -u +%Y-%m-%dT%H:%M:%SZ))"; }
LIMIT="${NE_GPU_STEP_TIMEOUT:-420}"
FAILED=()
# run NAME LOG CMD...: CMD under the time limit in $RUN_DIR, its output into $OUT_DIR/LOG; a failure is noted
run() {
  local name="$1" log="$2"; shift 2
  CURRENT="$name"; step "$name"
  (cd "$RUN_DIR" && timeout "$LIMIT" "$@") 2>&1 | tee "$OUT_DIR/$log"
  local rc=${PIPESTATUS[0]} why
  if [ "$rc" -ne 0 ]; then
    why="exit $rc"; [ "$rc" -eq 124 ] && why="time limit of $LIMIT s"
    FAILED+=("$name ($why)")
  fi
}
die() { echo; echo "gpu_suite: FAILED during: $*; logs in $OUT_DIR"; exit 1; }

CURRENT="machine"; step "$CURRENT"
nvidia-smi || die "nvidia-smi"
command -v nvcc >/dev/null && nvcc --version || echo "nvcc not on PATH (CMake may still find it via CUDA_HOME / CUDACXX)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')" || die "torch sees no GPU"

CURRENT="build"; step "$CURRENT"
mode="${NE_GPU_BUILD:-auto}"
stage() {  # the package with the _C*.so in $1 staged under $2 (PYTHONPATH)
  rm -rf "$2" && mkdir -p "$2"
  cp -r python/normengine "$2/"
  find "$2/normengine" -maxdepth 1 -name '_C*.so' -delete  # a local link to a CPU build
  cp "$1"/_C*.so "$2/normengine/"
}
usable() {  # the staged / installed normengine imports and has CUDA
  mkdir -p "$OUT_DIR/run"
  (cd "$OUT_DIR/run" && "$PY" -c "
import normengine, sys
print('normengine from', normengine.__file__, '| cpu isa', normengine.cpu_isa(), '| cuda', normengine.cuda_available())
sys.exit(0 if normengine.cuda_available() else 'this normengine build has no usable CUDA kernels')")
}
RUN_DIR="$OUT_DIR/run"
if [ "$mode" = prebuilt ]; then
  mode=auto
  if ls "$ROOT"/build/gpu-prebuilt/_C*.so >/dev/null 2>&1 &&
     [ "$(cat "$ROOT/build/gpu-prebuilt/SOURCES" 2>/dev/null)" = "$(sources_hash)" ]; then
    ORIG_PYTHONPATH="${PYTHONPATH:-}"
    stage "$ROOT/build/gpu-prebuilt" "$ROOT/build/gpu-prebuilt/pkg"
    export PYTHONPATH="$ROOT/build/gpu-prebuilt/pkg${ORIG_PYTHONPATH:+:$ORIG_PYTHONPATH}"
    if usable; then mode=prebuilt; else echo "the prebuilt module is not usable here: building"; export PYTHONPATH="$ORIG_PYTHONPATH"; fi
  else
    echo "no build/gpu-prebuilt/_C*.so built from these sources (benchmarks/gpu_prebuild.sh): building"
  fi
fi
if [ "$mode" = auto ]; then
  if "$PY" -c "import scikit_build_core, pybind11" 2>/dev/null; then mode=pip; else mode=cmake; fi
fi
echo "build mode: $mode"
if [ "$mode" = pip ]; then
  "$PY" -m pip install --no-build-isolation -v . 2>&1 | tee "$OUT_DIR/build.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "build (pip)"  # RUN_DIR is outside the repo: `import normengine` is the installed one
elif [ "$mode" = cmake ]; then
  BUILD="$ROOT/build/gpu"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  { cmake -S . -B "$BUILD" "${gen[@]}" -DNORMENGINE_CUDA="$NORMENGINE_CUDA" -DNORMENGINE_PYTHON=ON -DNORMENGINE_BENCHMARKS=ON \
          -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
    cmake --build "$BUILD" -j"$(nproc)"; } 2>&1 | tee "$OUT_DIR/build.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "build (cmake)"
  stage "$BUILD" "$BUILD/pkg"
  export PYTHONPATH="$BUILD/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
[ "$mode" = prebuilt ] || usable || die "import check"
# which matrix instructions the kernels compiled to (HMMA / IMMA / QMMA, Hopper's HGMMA / QGMMA) and any
# local-memory traffic, from the module's SASS (cuobjdump): seconds, no GPU time
run "sass" sass_summary.md "$PY" "$ROOT/benchmarks/sass_summary.py"

case "${NE_GPU_TESTS:-gpu}" in
  gpu) run "tests (cuda)" pytest_cuda.log "$PY" -m pytest "$ROOT/tests" -q -rs -p no:cacheprovider --rootdir "$ROOT" \
         --maxfail=50 -k "cuda and not emu" ;;
  all) run "tests (all)" pytest.log "$PY" -m pytest "$ROOT/tests" -q -rs -p no:cacheprovider --rootdir "$ROOT" --maxfail=50 ;;
esac

BENCH=",${NE_GPU_BENCH:-norm,lmul,attention,quant,runner,forms,loss},"
[[ $BENCH == *,norm,* ]] && run "bench norm" compare_norm_torch_cuda.md "$PY" "$ROOT/benchmarks/compare_norm_torch.py" --device cuda
[[ $BENCH == *,lmul,* ]] && run "bench lmul" compare_lmul_cuda.md "$PY" "$ROOT/benchmarks/compare_lmul.py" --device cuda
[[ $BENCH == *,attention,* ]] && run "bench attention" compare_attention_cuda.md "$PY" "$ROOT/benchmarks/compare_attention_cuda.py"
[[ $BENCH == *,quant,* ]] && run "bench quant" compare_quant_cuda.md "$PY" "$ROOT/benchmarks/compare_quant_cuda.py"
[[ $BENCH == *,runner,* ]] && run "bench runner" compare_runner_cuda.md "$PY" "$ROOT/benchmarks/compare_runner_cuda.py"
[[ $BENCH == *,forms,* ]] && run "bench norm forms" compare_norm_forms_cuda.md "$PY" "$ROOT/benchmarks/compare_norm_forms.py" \
  --device cuda --rounds 5 --repeats 25
[[ $BENCH == *,loss,* ]] && run "bench loss" compare_cross_entropy_cuda.md "$PY" "$ROOT/benchmarks/compare_cross_entropy.py" \
  --device cuda --tokens 4096,16384 --repeats 5
[[ $BENCH == *,loss,* ]] && run "bench activations" compare_activation_cuda.md "$PY" \
  "$ROOT/benchmarks/compare_activation.py" --device cuda --shapes 16384x8192,8192x14336 --repeats 21
[[ $BENCH == *,loss,* ]] && run "bench rotary" compare_rotary_cuda.md "$PY" "$ROOT/benchmarks/compare_rotary.py" \
  --device cuda --batch 8 --seq 4096 --heads 32 --kv-heads 8 --head-dim 128 --repeats 21

if [ "${#FAILED[@]}" -eq 0 ]; then
  step "gpu_suite: all steps passed; logs in $OUT_DIR"
else
  step "gpu_suite: ${#FAILED[@]} step(s) failed: ${FAILED[*]}; logs in $OUT_DIR"
  exit 1
fi
