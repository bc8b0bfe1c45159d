#!/usr/bin/env bash
# Build the CUDA extension module here (a machine with nvcc, no GPU needed) for a later, short GPU loan:
# benchmarks/gpu_suite.sh with NE_GPU_BUILD=prebuilt then stages build/gpu-prebuilt/_C*.so instead of
# spending the loan's minutes on the build (carry build/gpu-prebuilt with the device command).
# build/gpu-prebuilt/SOURCES records the hash of the sources it was built from (sources_hash below);
# gpu_suite.sh builds afresh when the tree it runs on hashes differently (a stale module never runs).
#
#   bash benchmarks/gpu_prebuild.sh        # build dir: build/gpu-prebuilt-build (or $NE_PREBUILD_DIR)
#
# The module is built for one Python: $PYTHON (default python3). It must be the device's: the lent
# machines' python3 is 3.12 (/work/.library/device/KINDS.md, 2026-11), so on a machine whose python3 is
# another version pass a 3.12 interpreter, e.g. PYTHON=~/.pyenv/versions/3.12.1/bin/python3.12 (its
# headers are all it needs; pybind11's headers come from python3 where that interpreter has none).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$(command -v "${PYTHON:-python3}")"
BUILD="${NE_PREBUILD_DIR:-$ROOT/build/gpu-prebuilt-build}"
PYBIND11_DIR="$("$PY" -m pybind11 --cmakedir 2>/dev/null || python3 -m pybind11 --cmakedir)"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B "$BUILD" "${gen[@]}" -DNORMENGINE_CUDA=ON -DNORMENGINE_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$PYBIND11_DIR"
cmake --build "$BUILD" -j"$(nproc)"
mkdir -p build/gpu-prebuilt
rm -f build/gpu-prebuilt/_C*.so
cp "$BUILD"/_C*.so build/gpu-prebuilt/
bash benchmarks/gpu_suite.sh --sources-hash > build/gpu-prebuilt/SOURCES
echo "build/gpu-prebuilt: $(ls build/gpu-prebuilt) (sources $(cat build/gpu-prebuilt/SOURCES))"
