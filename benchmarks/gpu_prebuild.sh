#!/usr/bin/env bash
# Build the CUDA extension module here (a machine with nvcc, no GPU needed) for a later, short GPU loan:
# benchmarks/gpu_suite.sh with NE_GPU_BUILD=prebuilt then stages build/gpu-prebuilt/_C*.so instead of
# spending the loan's minutes on the build (carry build/gpu-prebuilt with the device command).
# build/gpu-prebuilt/SOURCES records the hash of the sources it was built from (sources_hash below);
# gpu_suite.sh builds afresh when the tree it runs on hashes differently (a stale module never runs).
#
#   bash benchmarks/gpu_prebuild.sh        # build dir: build/gpu-prebuilt-build (or $NE_PREBUILD_DIR)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BUILD="${NE_PREBUILD_DIR:-$ROOT/build/gpu-prebuilt-build}"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B "$BUILD" "${gen[@]}" -DNORMENGINE_CUDA=ON -DNORMENGINE_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)"
cmake --build "$BUILD" -j"$(nproc)"
mkdir -p build/gpu-prebuilt
rm -f build/gpu-prebuilt/_C*.so
cp "$BUILD"/_C*.so build/gpu-prebuilt/
bash benchmarks/gpu_suite.sh --sources-hash > build/gpu-prebuilt/SOURCES
echo "build/gpu-prebuilt: $(ls build/gpu-prebuilt) (sources $(cat build/gpu-prebuilt/SOURCES))"
